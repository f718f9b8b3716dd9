"""SAE training-step speed: csc's trainer (plain and contrastive) vs a straightforward PyTorch SAE step,
side by side in one run, with achieved FLOP/s as a fraction of this machine's measured matmul peak.

    python bench/sae_step.py                                   # embedded sizes: d=640, dictionary 2048, batch 1024
    python bench/sae_step.py --d 2304 --dict 16384 --bf16       # the paper's sizes on a GPU

Rows (tokens/s = anchor tokens per second; higher is better):
  plain PyTorch   Linear encoder + ReLU + Linear decoder, MSE + L1, torch.optim.Adam: the floor of any SAE step
  csc, gamma=0    csc.sae.Trainer.update: pre-encoder LayerNorm, constrained Adam (tangent projection and
                  renormalisation of the decoder), gradient clipping, metrics of every step
  csc, gamma>0    the same plus the partner encode and the InfoNCE term over other-sequence negatives
  SAELens         sae_lens.SAETrainer.step on a StandardTrainingSAE (decoder-norm-weighted L1, Adam, gradient
                  clipping, its firing statistics); shown when `pip install -e '.[bench]'` has installed SAELens
SAE FLOPs per step are counted as 12*B*d*m (6 x parameters x tokens: both matmuls forward, and backward for
weights and inputs), the same for every row, so "of peak" compares like with like. The plain PyTorch step
skips the encoder's input gradient (10*B*d*m), and the contrastive row does more than the count (the partner
encode and the B x B similarity). The peak is the best plain matmul at the SAE's own shapes on this device.
The activations are random: speed does not depend on their content.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from csc.sae.batch import ActivationBatch
from csc.sae.archs import build_sae
from csc.sae.archs.relu import ReluConfig
from csc.sae.config import TrainerConfig
from csc.sae.losses import info_nce_loss
from csc.sae.trainer import Trainer


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


def batches(d: int, batch: int, n: int, device: torch.device) -> list[ActivationBatch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d, generator=g)  # scaled activations have norm about sqrt(d), as these
        out.append(ActivationBatch(x, torch.randn(batch, d, generator=g), torch.arange(batch) // 16,
                                   torch.randint(2, 128, (batch,), generator=g)).to(device))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=640, help="activation width (640: the embedded model)")
    p.add_argument("--dict", type=int, default=2048, help="dictionary size")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; rows take turns within each, the median is shown")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA); the peak is measured in bf16 too")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    data = batches(a.d, a.batch, a.steps, device)

    def csc_runner(gamma: float):
        cfg = TrainerConfig(steps=10 ** 9, batch_size=a.batch, lr_warmup_steps=0, beta_warmup_steps=0,
                            gamma_warmup_steps=0, gamma=gamma, device=str(device),
                            autocast="bf16" if a.bf16 else "fp32")
        trainer = Trainer(ReluConfig(d_in=a.d, dict_size=a.dict), cfg)
        return lambda b: trainer.update(trainer.step, b)

    def plain_runner():
        torch.manual_seed(0)
        model = PlainSAE(a.d, a.dict).to(device)
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

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=a.d, d_sae=a.dict, l1_coefficient=1.0,
                                                            device=str(device)))
        cfg = SAETrainerConfig(total_training_samples=10 ** 12, train_batch_size_samples=a.batch, lr=3e-4,
                               lr_end=3e-4, device=str(device), autocast=a.bf16)
        trainer = SAETrainer(cfg, sae, data_provider=iter(()))
        return lambda b: trainer.step(b.anchors)

    rows = {"plain PyTorch SAE step": plain_runner(), "csc trainer, gamma=0": csc_runner(0.0),
            f"csc trainer, gamma={a.gamma:g} (contrastive)": csc_runner(a.gamma)}
    if importlib.util.find_spec("sae_lens") is not None:
        rows["SAELens SAETrainer.step (standard SAE)"] = saelens_runner()
    else:
        print("SAELens is not installed (pip install -e '.[bench]'): its row is left out")
    for run in rows.values():  # warm-up: allocator, kernels, the first step's b_dec initialisation
        for b in data[:3]:
            run(b)
    def one_round(run) -> float:
        """Seconds per batch of one pass of `run` over the data."""
        sync(device)
        t0 = time.perf_counter()
        for b in data:
            run(b)
        sync(device)
        return (time.perf_counter() - t0) / len(data)

    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(a.rounds):
        for name, run in rows.items():
            times[name].append(one_round(run))
    B, d, m = a.batch, a.d, a.dict
    peak = matmul_peak(device, torch.bfloat16 if a.bf16 else torch.float32,
                       [(B, d, m), (B, m, d), (d, B, m), (m, B, d), (2048, 2048, 2048)])

    flops = 12 * a.batch * a.d * a.dict
    base = statistics.median(times["plain PyTorch SAE step"])
    plain_csc = statistics.median(times["csc trainer, gamma=0"])
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"d={a.d} dictionary={a.dict} batch={a.batch} {'bf16' if a.bf16 else 'fp32'} on {name_dev}; "
          f"median of {a.rounds} rounds x {a.steps} steps; matmul peak {peak / 1e9:,.1f} GFLOP/s")
    print(f"| step | tokens/s | vs plain PyTorch | SAE GFLOP/s | of matmul peak |")
    print(f"|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {a.batch / t:,.0f} | {base / t:.2f}x | {flops / t / 1e9:,.1f} | {flops / t / peak:.0%} |")
    contrastive = statistics.median(times[f"csc trainer, gamma={a.gamma:g} (contrastive)"])
    print(f"contrastive term overhead: {(contrastive / plain_csc - 1) * 100:.0f}% per step over csc gamma=0")

    # Where the overhead goes: its two parts timed alone, as a share of the csc gamma=0 step.
    sae = build_sae(ReluConfig(d_in=d, dict_size=m), device=device)
    codes = [torch.relu(torch.randn(B, m, device=device)).requires_grad_() for _ in range(2)]

    def partner_encode(b: ActivationBatch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            z = sae.encode(b.partners)
        z.float().sum().backward()

    def info_nce(b: ActivationBatch) -> None:
        info_nce_loss(codes[0], codes[1], b.seq_id, 1.0).backward()

    parts = {"partner encode, forward + backward": (partner_encode, 6 * B * d * m),
             "InfoNCE over [B, dictionary] codes, forward + backward": (info_nce, 6 * B * B * m)}
    print("| part of the contrastive step | ms | share of a csc gamma=0 step | its FLOPs / 12*B*d*m |")
    print("|---|---:|---:|---:|")
    for name, (run, part_flops) in parts.items():
        one_round(run)  # warm-up
        t = statistics.median(one_round(run) for _ in range(a.rounds))
        print(f"| {name} | {t * 1e3:.1f} | {t / plain_csc:.0%} | {part_flops / flops:.0%} |")


if __name__ == "__main__":
    main()
