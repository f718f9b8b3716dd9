"""SAE training-step speed: csc's trainer (plain and contrastive) vs a straightforward PyTorch SAE step,
side by side in one run, with the contrastive term's measured overhead next to its arithmetic bound.

    python bench/sae_step.py                                   # embedded sizes: d=640, dictionary 2048, batch 1024
    python bench/sae_step.py --d 2304 --dict 2304              # the paper's shape (CPU is fine for the ratios)
    python bench/sae_step.py --d 2304 --dict 16384 --bf16       # on a GPU

Rows (tokens/s = anchor tokens per second, from the median time; higher is better), on the same random
batches, taking turns in each round; the ratios (to the plain PyTorch step, and the contrastive overhead over
csc gamma=0) are taken within each round and their median printed, with the rounds' range for the overhead:
  plain PyTorch   Linear encoder + ReLU + Linear decoder, MSE + L1, torch.optim.Adam: the floor of any SAE step
  csc, gamma=0    csc.sae.Trainer.update: pre-encoder LayerNorm, constrained Adam (tangent projection and
                  renormalisation of the decoder), gradient clipping, metrics of every step
  csc, gamma>0    the same plus InfoNCE, with partners in the batch (activations.batching contexts: no second
                  encoder pass), with encoded partners (tokens), and with --negatives sampled negatives
  SAELens         sae_lens.SAETrainer.step on a StandardTrainingSAE (decoder-norm-weighted L1, Adam, gradient
                  clipping, its firing statistics); shown when `pip install -e '.[bench]'` has installed SAELens

FLOPs. Both plain steps do 10·B·d·m (encoder and decoder forward 2+2, the decoder's weight and input gradients
2+2, the encoder's weight gradient 2; neither needs the encoder's input gradient: csc gets b_dec's gradient
without it). The contrastive term adds, with m' = the latents InfoNCE sees:
  similarity of all B anchors    4·B²·m'   (a @ a^T forward, one (g + g^T) @ a backward)
  similarity with N negatives    6·B·N·m'  (a @ a[N]^T forward, two matmuls backward)
  encoded partners (tokens)      4·B·d·m   (encoder forward and its weight gradient)
The arithmetic bound of a row's overhead is its added FLOPs / 10·B·d·m: what the step would cost more if
every FLOP ran as fast as the plain step's. The gradient-share metric (two extra backward passes) is measured
at the last step of each report (--log-every), so it adds its share of that. The peak is the best plain matmul
at the SAE's own shapes on the same device in the same run. The activations are random: speed does not depend
on their content.

The last table times the similarity alone, forward + backward, on codes with the L0 of --l0: dense (csc's
csc.sae.similarity, norms folded into the [B, B] result), with sampled negatives, and over sparse codes
(F.normalize, then CSR sparse x dense products, exact for ReLU and TopK codes): whether sparsity pays at
these shapes on this device.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from csc.sae.archs.relu import ReluConfig
from csc.sae.batch import ActivationBatch
from csc.sae.config import TrainerConfig
from csc.sae.similarity import CosineColumns, CosineGram
from csc.sae.trainer import Trainer

ANCHORS_PER_CONTEXT = 126  # context_length 128 less BOS and position 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]],
                rounds: int = 5, iters: int = 10) -> float:
    """Best FLOP/s of plain matmuls at the SAE's own shapes ([m, k] @ [k, n]), best round of each."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        for _ in range(rounds):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            sync(device)
            best = max(best, 2 * m * k * n * iters / (time.perf_counter() - t0))
    return best


class PlainSAE(torch.nn.Module):
    def __init__(self, d: int, m: int):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(d, m), torch.nn.Linear(m, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(self.enc(x))
        return self.dec(z), z


def batches(d: int, batch: int, n: int, device: torch.device, in_batch: bool) -> list[ActivationBatch]:
    """Batches of whole contexts in a row, as `activations.batching: contexts` cuts them: each anchor's partner is
    another anchor of its context (in_batch), or its activation travels with it (not in_batch)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d, generator=g)  # scaled activations have norm about sqrt(d), as these
        seq = torch.arange(batch) // ANCHORS_PER_CONTEXT
        pos = torch.arange(batch) % ANCHORS_PER_CONTEXT + 2
        if in_batch:
            start = seq * ANCHORS_PER_CONTEXT
            other = (torch.arange(batch) - start + torch.randint(1, ANCHORS_PER_CONTEXT, (batch,), generator=g))
            rows = start + other % ANCHORS_PER_CONTEXT
            b = ActivationBatch(x, None, seq, pos, partner_index=torch.where(rows < batch, rows, -1))
        else:
            b = ActivationBatch(x, torch.randn(batch, d, generator=g), seq, pos)
        out.append(b.to(device))
    return out


def sparse_similarity(a: torch.Tensor) -> torch.Tensor:
    """a @ a^T of unit codes with CSR sparse x dense products forward and backward (the backward keeps the
    gradient at the codes' non-zeros only, where ReLU and TopK pass it on)."""

    class SparseGram(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a.to_sparse_csr() @ a.T

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return (a.T.contiguous().to_sparse_csr() @ (g + g.T).T).T

    return SparseGram.apply(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=640, help="activation width (640: the embedded model)")
    p.add_argument("--dict", type=int, default=2048, help="dictionary size")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=7,
                   help="rounds; rows take turns within each; the median is shown, of ratios taken within each round")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--negatives", type=int, default=256, help="trainer.negatives of the sampled-negatives row")
    p.add_argument("--log-every", type=int, default=100, help="trainer.log_every (the default)")
    p.add_argument("--l0", type=int, default=70, help="L0 of the codes in the similarity table")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA); the peak is measured in bf16 too")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    B, d, m, N = a.batch, a.d, a.dict, min(a.negatives, a.batch)
    in_batch, encoded = batches(d, B, a.steps, device, True), batches(d, B, a.steps, device, False)

    def csc_runner(gamma: float, **fields):
        cfg = TrainerConfig(steps=10 ** 9, batch_size=B, lr_warmup_steps=0, beta_warmup_steps=0,
                            gamma_warmup_steps=0, gamma=gamma, device=str(device), log_every=a.log_every,
                            autocast="bf16" if a.bf16 else "fp32", **fields)
        trainer = Trainer(ReluConfig(d_in=d, dict_size=m), cfg)
        return lambda b: trainer.update(trainer.step, b)

    def plain_runner():
        torch.manual_seed(0)
        model = PlainSAE(d, m).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)

        def step(b: ActivationBatch) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
                x_hat, z = model(b.anchors)
            loss = (b.anchors - x_hat.float()).pow(2).sum(-1).mean() + 0.04 * z.float().abs().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def saelens_runner():
        from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=1.0, device=str(device)))
        cfg = SAETrainerConfig(total_training_samples=10 ** 12, train_batch_size_samples=B, lr=3e-4,
                               lr_end=3e-4, device=str(device), autocast=a.bf16)
        trainer = SAETrainer(cfg, sae, data_provider=iter(()))
        return lambda b: trainer.step(b.anchors)

    unit = 10 * B * d * m  # a plain step's FLOPs
    g = f"gamma={a.gamma:g}"
    # name: (run, batches, added FLOPs of the contrastive term or None)
    rows = {"plain PyTorch SAE step": (plain_runner(), in_batch, None),
            "csc trainer, gamma=0": (csc_runner(0.0), in_batch, None),
            f"csc trainer, {g}, partners in the batch": (csc_runner(a.gamma), in_batch, 4 * B * B * m),
            f"csc trainer, {g}, encoded partners": (csc_runner(a.gamma), encoded, 4 * B * B * m + 4 * B * d * m),
            f"csc trainer, {g}, partners in the batch, {N} negatives": (
                csc_runner(a.gamma, negatives=N), in_batch, 6 * B * N * m)}
    if importlib.util.find_spec("sae_lens") is not None:
        rows["SAELens SAETrainer.step (standard SAE)"] = (saelens_runner(), in_batch, None)
    else:
        print("SAELens is not installed (pip install -e '.[bench]'): its row is left out")
    for run, data, _ in rows.values():  # warm-up: allocator, kernels, the first step's b_dec initialisation
        for b in data[:3]:
            run(b)

    def one_round(run, data) -> float:
        """Seconds per batch of one pass of `run` over `data`."""
        sync(device)
        t0 = time.perf_counter()
        for b in data:
            run(b)
        sync(device)
        return (time.perf_counter() - t0) / len(data)

    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(a.rounds):
        for name, (run, data, _) in rows.items():
            times[name].append(one_round(run, data))
    peak = matmul_peak(device, torch.bfloat16 if a.bf16 else torch.float32,
                       [(B, d, m), (B, m, d), (d, B, m), (m, B, d), (2048, 2048, 2048)])

    t = {name: statistics.median(ts) for name, ts in times.items()}

    # Ratios within each round (the rows ran seconds apart), then their median: a shared machine's speed drifts
    # between rounds more than within one.
    def ratio(name: str, to: str) -> list[float]:
        return sorted(x / y for x, y in zip(times[name], times[to]))

    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"d={d} dictionary={m} batch={B} {'bf16' if a.bf16 else 'fp32'} on {name_dev}; median of {a.rounds} rounds "
          f"x {a.steps} steps; log_every {a.log_every}; matmul peak {peak / 1e9:,.1f} GFLOP/s")
    print("| step | tokens/s | vs plain PyTorch | FLOPs / 10·B·d·m | GFLOP/s | of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, _, extra) in rows.items():
        flops = unit + (extra or 0)
        print(f"| {name} | {B / t[name]:,.0f} | {1 / statistics.median(ratio(name, 'plain PyTorch SAE step')):.2f}x | "
              f"{flops / unit:.2f} | "
              f"{flops / t[name] / 1e9:,.1f} | {flops / t[name] / peak:.0%} |")
    for name, (_, _, extra) in rows.items():
        if extra is not None:
            r = ratio(name, "csc trainer, gamma=0")
            print(f"{name}: contrastive overhead: {(statistics.median(r) - 1) * 100:.0f}% "
                  f"(arithmetic bound: {extra / unit * 100:.0f}%); "
                  f"rounds {(r[0] - 1) * 100:.0f} to {(r[-1] - 1) * 100:.0f}%")

    # The similarity alone, on codes of the asked L0.
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(B, m, generator=gen)
    z = torch.where(pre >= pre.topk(min(a.l0, m), dim=1).values[:, -1:], pre.relu(), 0.0).to(device)
    cols = torch.randperm(B, generator=gen)[:N].to(device)

    def timed(fn) -> float:
        fn()
        runs = []
        for _ in range(a.rounds):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            sync(device)
            runs.append((time.perf_counter() - t0) / 5)
        return statistics.median(runs)

    def grad_of(similarity):
        def run():
            similarity(z.clone().requires_grad_()).sum().backward()
        return run

    parts = {"dense, all B (csc)": (grad_of(CosineGram.apply), 4 * B * B * m),
             f"dense, {N} sampled negatives (csc)": (grad_of(lambda u: CosineColumns.apply(u, cols)), 6 * B * N * m),
             "sparse codes, all B (CSR x dense)": (
                 grad_of(lambda u: sparse_similarity(torch.nn.functional.normalize(u, dim=-1, eps=1e-8))),
                 4 * B * B * min(a.l0, m))}
    if device.type != "cpu" and a.bf16:
        del parts["sparse codes, all B (CSR x dense)"]  # CSR products have no bf16 autocast path
    print(f"| similarity of [B, dictionary] codes at L0 {min(a.l0, m)}, forward + backward | ms | "
          f"share of a csc gamma=0 step | its FLOPs / 10·B·d·m |")
    print("|---|---:|---:|---:|")
    for name, (run, flops) in parts.items():
        s = timed(run)
        print(f"| {name} | {s * 1e3:.1f} | {s / t['csc trainer, gamma=0']:.0%} | {flops / unit:.0%} |")


if __name__ == "__main__":
    main()
