"""The CE/KL evaluation's cost per SAE: the runs without an SAE made once (csc.pipeline.evaluate.CleanRuns) against
the former evaluation, which ran them again for every SAE; side by side in one run.

    python bench/eval_cost.py                                   # embedded Gemma 3 270M, layer 12, 32 contexts
    python bench/eval_cost.py --model gemma2-2b-shape --layer 19 --dict 16384   # random Gemma-2-2B-shaped (GPU)

Rows (seconds for --contexts random contexts of --context tokens, BOS first, each row's best of --rounds rounds, the
rows taking turns in every round):
  former, per SAE     what splice_scores did for each SAE before: four full forwards (clean, spliced, both
                      ablations) and four unembeddings with log-softmax (clean and the three others)
  now, per SAE        spliced_scores against the kept clean runs: one run from layer L + 1 on
                      (csc.activations.capture.run_from_layer) and two unembeddings (clean again, spliced)
  now, once           clean_runs: one full forward (its resid_post(L) kept), both ablations from layer L + 1 on,
                      three unembeddings
  now, one SAE alone  splice_scores (`csc train`, `csc eval`): the clean forward, three runs from layer L + 1 on,
                      four unembeddings

The ratio former / now per SAE sits beside its arithmetic bound from multiply-adds per token: a decoder layer's
weights b (its parameters: one multiply-add each per token; attention's T-long products left out), N layers, and the
unembedding's V x h, so former = 4 (N b + V h) and now = (N - L - 1) b + 2 V h. A sweep of K SAEs spends
K former against once + K now (K = 1: one SAE alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from csc.activations.capture import decoder_layers
from csc.activations.models import load_language_model, resolve_device
from csc.config import ModelSpec, default_cache_dir
from csc.pipeline.evaluate import _final_hidden, _log_probs, clean_runs, splice_scores, spliced_scores
from csc.sae.archs import build_sae
from csc.sae.archs.relu import ReluConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from producer_throughput import gemma2_2b_shaped  # noqa: E402


@torch.inference_mode()
def former_per_sae(model, sae, contexts: torch.Tensor, layer: int, batch: int, chunk: int) -> None:
    """The former splice_scores' LM work for one SAE (no special token but BOS: no SAEBench spliced run)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype

    def through_sae(x: torch.Tensor) -> torch.Tensor:
        return sae(x.reshape(-1, x.shape[-1]).float()).x_hat.to(dtype).reshape(x.shape)

    for ids in contexts.split(batch):
        ids = ids.to(device)
        bos = torch.zeros_like(ids, dtype=torch.bool)
        bos[:, 0] = True
        runs = {"spliced": (through_sae, bos), "ablated": (torch.zeros_like, bos),
                "sb_ablated": (torch.zeros_like, torch.zeros_like(bos))}
        hidden = [_final_hidden(model, ids, layer)] + [_final_hidden(model, ids, layer, *r) for r in runs.values()]
        hidden = [h.reshape(-1, h.shape[-1]) for h in hidden]
        for s in range(0, hidden[0].shape[0], chunk):
            for h in hidden:
                _log_probs(model, h[s:s + chunk])


def macs_per_token(model, layer: int) -> tuple[float, float]:
    """(former, now) multiply-adds per token per SAE (the module docstring)."""
    layers = decoder_layers(model)
    b = sum(p.numel() for p in layers[0].parameters())
    head = model.get_output_embeddings().weight
    vh = head.shape[0] * head.shape[1]
    n = len(layers)
    return 4 * (n * b + vh), (n - layer - 1) * b + 2 * vh


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | tiny-gemma2 | gemma2-2b-shape | a HF id/folder")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--contexts", type=int, default=32, help="held-out contexts, as eval.ce_contexts (default 32)")
    p.add_argument("--context", type=int, default=128, help="tokens per context")
    p.add_argument("--dict", type=int, default=2048, help="the SAE's dictionary size")
    p.add_argument("--batch", type=int, default=8, help="contexts per LM batch (eval.lm_batch_size)")
    p.add_argument("--chunk", type=int, default=128, help="tokens per unembedding (eval.chunk_tokens)")
    p.add_argument("--rounds", type=int, default=3, help="timings per row; the best counts")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    print(f"$ python bench/eval_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")

    device = resolve_device(a.device)
    if a.model == "gemma2-2b-shape":
        model = gemma2_2b_shaped(device)
    else:
        model = load_language_model(ModelSpec(name=a.model, device=a.device), Path(default_cache_dir())).model
    text = model.config.get_text_config()
    contexts = torch.randint(4, text.vocab_size, (a.contexts, a.context), generator=torch.Generator().manual_seed(0))
    contexts[:, 0] = 2
    sae = build_sae(ReluConfig(d_in=text.hidden_size, dict_size=a.dict)).to(device).eval()
    layer = a.layer

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    kept = {}

    def once():
        kept["clean"] = clean_runs(model, contexts, layer, {2}, a.batch, a.chunk)

    rows = {"former, per SAE": lambda: former_per_sae(model, sae, contexts, layer, a.batch, a.chunk),
            "now, once (clean_runs)": once,
            "now, per SAE (spliced_scores)": lambda: spliced_scores(model, sae, kept["clean"], 1.0, a.chunk),
            "now, one SAE alone (splice_scores)": lambda: splice_scores(model, sae, contexts, layer, 1.0, {2}, a.batch,
                                                                        a.chunk)}
    best = {name: float("inf") for name in rows}
    for _ in range(a.rounds):
        for name, fn in rows.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t)

    former, now = macs_per_token(model, layer)
    tokens = contexts.numel()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    where = f"{device.type}" + (f", {threads} threads" if threads else f", {torch.cuda.get_device_name(device)}")
    print(f"{a.model}, layer {layer} of {len(decoder_layers(model))}, {a.contexts} contexts x {a.context} tokens, "
          f"dictionary {a.dict}, {where}, best of {a.rounds} rounds\n")
    print("| row | seconds | ms per token |")
    print("|---|---:|---:|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {1e3 * s / tokens:.3f} |")
    per_sae = best["former, per SAE"] / best["now, per SAE (spliced_scores)"]
    print(f"\nper SAE, former / now: {per_sae:.2f}x (arithmetic bound {former / now:.2f}x: "
          f"{former / 1e6:.4g}M against {now / 1e6:.4g}M multiply-adds per token)")
    for k in (1, 8, 24):
        total = best["now, one SAE alone (splice_scores)"] if k == 1 else \
            best["now, once (clean_runs)"] + k * best["now, per SAE (spliced_scores)"]
        print(f"{k} SAE{'s' if k > 1 else ''}: {k * best['former, per SAE']:.1f} s former, {total:.1f} s now "
              f"({k * best['former, per SAE'] / total:.2f}x)")


if __name__ == "__main__":
    main()
