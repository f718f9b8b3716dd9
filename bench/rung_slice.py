"""How large must the held-out slice of the rung figures be (eval.rung_contexts), and what does measuring it cost?

    python bench/rung_slice.py                      # 18 SAEs of the quickstart's search space, ~20 min on 2 cores
    python bench/rung_slice.py --configs 8 --json out.json [--spec SWEEP.yaml]

SAEs: the quickstart's two given points and `--configs` - 2 configurations drawn uniformly (seed 0) from its search
space (beta, gamma, temperature, dictionary size), each trained on the quickstart's batches. At each step of
`--at` (the quickstart's rung, 60, and its last step, 160) every SAE's rung figures (csc.pipeline.rung) are measured
on the first C held-out contexts for each C of `--slices`, and on a reference of `--reference` contexts (the
quickstart holds out 64; the reference reads more of the same held-out stream, so it is also a check of the
quickstart's own final figures).

Table 1: per figure and slice size, Kendall's tau between the SAEs' order on the slice and on the reference (1: the
same order), at each step. Table 2: the trials a synchronous rung keeps (the top third, by MO-ASHA's order on the
quickstart's rung figures: normalised MSE, L0, context locality, csc.sweep.halving.rank) on the slice that the
reference keeps too, and each slice's cost: seconds per measurement against seconds per training step, both
measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from csc.activations.source import Activations
from csc.pipeline.rung import FIGURES, PREFIX, HeldOutSlice
from csc.pipeline.run import training_stream
from csc.sae.trainer import Hook, Trainer
from csc.spec_loader import load_spec
from csc.sweep.halving import rank
from csc.sweep.spec import SweepSpec

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
MO_FIGURES = (("normalized_mse", "min"), ("l0", "min"), ("context_locality", "max"))


def draw(spec: SweepSpec, n: int, seed: int) -> list[dict]:
    """The spec's points, then uniform draws (log-uniform where the range is) from its search space."""
    rng, out = random.Random(seed), [dict(p) for p in spec.sweep.points_to_evaluate]
    while len(out) < n:
        point = {}
        for key, p in spec.sweep.search.items():
            if p.type == "choice":
                point[key] = rng.choice(p.values)
            elif p.type == "loguniform":
                point[key] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                point[key] = rng.uniform(p.low, p.high)
        out.append(point)
    return out[:n]


class Measure(Hook):
    """At the steps `at`: the rung figures on every slice (and their wall time), and the training steps' time."""

    def __init__(self, at: list[int], slices: dict[int, HeldOutSlice]):
        self.at, self.slices, self.figures, self.step_seconds = set(at), slices, {}, []
        self._t = time.perf_counter()

    def on_step(self, trainer, metrics):
        now = time.perf_counter()
        self.step_seconds.append(now - self._t)
        if trainer.step in self.at:
            self.figures[trainer.step] = {c: s.figures(trainer.model) for c, s in self.slices.items()}
        self._t = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=int, default=18)
    ap.add_argument("--at", type=int, nargs="+", default=[60, 160])
    ap.add_argument("--slices", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--reference", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    ap.add_argument("--spec", type=Path, default=SPEC, help="a sweep spec: its model, data and search space")
    args = ap.parse_args()
    torch.set_num_threads(2)
    context = load_spec(SweepSpec, args.spec).activations.context_length
    spec = load_spec(SweepSpec, args.spec, [f"activations.eval_tokens={args.reference * context}",
                                            f"trainer.steps={max(args.at)}"])
    acts = Activations(spec.trial({}))
    sizes = sorted(set(args.slices) | {args.reference})
    rows = []
    for n, point in enumerate(draw(spec, args.configs, seed=0)):
        trial = spec.trial(point)
        slices = {c: HeldOutSlice(trial.model_copy(update={"eval": trial.eval.model_copy(
            update={"rung_contexts": c})}), acts) for c in sizes}
        trainer = Trainer(trial.sae.model_copy(update={"d_in": acts.d_model}), trial.trainer)
        hook = Measure(args.at, slices)
        trainer.fit(training_stream(acts, trial.trainer.batch_size, spec.trainer.seed), [hook])
        rows.append({"point": point, "figures": hook.figures, "step_seconds": statistics.median(hook.step_seconds)})
        ref = hook.figures[max(args.at)][args.reference]
        print(f"[{n + 1}/{args.configs}] {point}: held-out EV {ref[PREFIX + 'explained_variance']:.3f}, "
              f"L0 {ref[PREFIX + 'l0']:.1f}, step {rows[-1]['step_seconds']:.3f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    print(f"Kendall's tau between the order of {len(rows)} SAEs on the first C held-out contexts and on "
          f"{args.reference} contexts\n")
    print("| figure | step | " + " | ".join(f"C = {c}" for c in args.slices) + " |")
    print("|---|---:|" + "---:|" * len(args.slices))
    for key in FIGURES:
        for step in args.at:
            ref = [r["figures"][step][args.reference][PREFIX + key] for r in rows]
            taus = [kendalltau([r["figures"][step][c][PREFIX + key] for r in rows], ref).statistic
                    for c in args.slices]
            print(f"| {key} | {step} | " + " | ".join(f"{t:.3f}" for t in taus) + " |")

    keep = math.ceil(len(rows) / 3)

    def kept(step: int, c: int) -> set[int]:
        points = [[r["figures"][step][c][PREFIX + k] * (1 if m == "min" else -1) for k, m in MO_FIGURES]
                  for r in rows]
        return set(rank(points)[0][:keep])

    step_s = statistics.median(r["step_seconds"] for r in rows)
    print(f"\nThe top {keep} of {len(rows)} by MO-ASHA's order (epsilon-net) on "
          f"{', '.join(k for k, _ in MO_FIGURES)}: how many the reference keeps too; the cost of one measurement "
          f"(median over SAEs and steps) against the median training step ({step_s:.3f} s)\n")
    print("| C | " + " | ".join(f"kept, step {s}" for s in args.at) + " | seconds | x training step |")
    print("|---:|" + "---:|" * (len(args.at) + 2))
    for c in sizes:
        secs = statistics.median(r["figures"][s][c][PREFIX + "seconds"] for r in rows for s in args.at)
        agree = [f"{len(kept(s, c) & kept(s, args.reference))} of {keep}" for s in args.at]
        print(f"| {c} | " + " | ".join(agree) + f" | {secs:.3f} | {secs / step_s:.2f} |")


if __name__ == "__main__":
    main()
