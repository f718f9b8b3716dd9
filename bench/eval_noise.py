"""How much of a delta CE or KL figure is the evaluation's own noise? Per held-out context, the CE/KL evaluation of
csc (csc.pipeline.evaluate.splice_scores, one context at a time) for the finished trials of one or several sweeps; then
the standard error of each trial's figure over the contexts, and of the paired difference between two trials on the
same contexts, at the spec's eval.ce_contexts and at larger counts (SE ~ sd / sqrt(n)), beside the seed-to-seed spread
of the same figure. The evaluation is precise enough when its standard error is small against that spread.

    python bench/eval_noise.py runs/sweeps/embedded-scale [--paired runs/sweeps/embedded-scale-contrastive/trial_01 ...]
        [--contexts 64]

Each path is what `csc eval` reads (a sweep folder: its finished trials; a trial; a `csc train` run folder). The
positional ones hold seeds of one setting (e.g. the gamma = 0 twins); each SAE under --paired is paired with the twin
of its trainer.seed.

The per-context mean equals the pooled figure of `csc eval` when every context predicts the same number of tokens
(127 here: no padding in the cache's contexts).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from csc.activations.source import Activations
from csc.pipeline.evaluate import special_token_ids, splice_scores
from csc.sae.export import load_sae
from csc.sweep.saved import saved_saes

FIGURES = ("delta_ce", "kl_spliced")


def per_context(spec, sae, acts: Activations, n: int) -> dict[str, list[float]]:
    S = spec.activations.contexts_per_shard
    contexts = torch.cat([acts.shard("eval", i).tokens for i in range(-(-n // S))])[:n]
    special = special_token_ids(acts.lm)
    out: dict[str, list[float]] = {f: [] for f in FIGURES}
    for ids in contexts.split(1):
        scores = splice_scores(acts.lm.model, sae, ids, spec.activations.layer, acts.scale, special,
                               lm_batch_size=1, chunk_tokens=spec.eval.chunk_tokens)
        for f in FIGURES:
            out[f].append(scores[f])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("twins", type=Path, nargs="+", help="SAEs of one setting, one per seed (e.g. the gamma = 0 twins)")
    p.add_argument("--paired", type=Path, nargs="*", default=[],
                   help="SAEs each paired with the twin of its trainer.seed")
    p.add_argument("--contexts", type=int, default=64, help="held-out contexts evaluated one by one (default 64)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    paired = f" --paired {' '.join(map(str, a.paired))}" if a.paired else ""
    print(f"$ python bench/eval_noise.py {' '.join(map(str, a.twins))}{paired} --contexts {a.contexts}\n")
    acts: Activations | None = None
    twins: dict[int, dict[str, list[float]]] = {}
    others: list[tuple[int, dict[str, list[float]]]] = []
    for d in (*a.twins, *a.paired):
        for saved in saved_saes(d):
            acts = acts or Activations(saved.spec)
            sae, _ = load_sae(saved.sae_dir)
            row = per_context(saved.spec, sae.eval(), acts, a.contexts)
            if d in a.twins:
                twins.setdefault(saved.spec.trainer.seed, row)
            else:
                others.append((saved.spec.trainer.seed, row))
            print(f"{saved.name} (seed {saved.spec.trainer.seed}): " + ", ".join(
                f"{f} {statistics.fmean(row[f]):.4f} (per-context sd {statistics.stdev(row[f]):.3f})" for f in FIGURES),
                flush=True)
    if len(twins) < 2:
        raise SystemExit("fewer than 2 seeds among the twins; the seed spread needs at least 2")
    counts = sorted({16, 32, a.contexts})
    print(f"\n| figure | sd over the {len(twins)} seeds of the twins | SE of one SAE's figure at "
          f"{' / '.join(map(str, counts))} contexts | SE of a paired difference at {' / '.join(map(str, counts))} |")
    print("|---|---|---|---|")
    for f in FIGURES:
        spread = statistics.stdev([statistics.fmean(r[f]) for r in twins.values()])
        one = statistics.fmean([statistics.stdev(r[f]) for r in twins.values()])
        diffs = [statistics.stdev([x - y for x, y in zip(r[f], twins[s][f])]) for s, r in others if s in twins]
        pair = " / ".join(f"{statistics.fmean(diffs) / math.sqrt(k):.4f}" for k in counts) if diffs else "-"
        print(f"| {f} | {spread:.4f} | " + " / ".join(f"{one / math.sqrt(k):.4f}" for k in counts) + f" | {pair} |")


if __name__ == "__main__":
    main()
