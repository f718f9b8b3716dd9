"""Where an SAE starts and what gamma does, before and after csc's scale and start changes (issue 13).

    python bench/start_and_scales.py                 # quickstart spec (embedded Gemma 3 270M, layer 12), its budget
    python bench/start_and_scales.py --steps 80

Rows, every one a ReLU SAE with the pre-encoder LayerNorm, dictionary and budget of the quickstart, gamma 0.1,
tau 1, the same batches in the same order:
  summed MSE, tied start    csc before: squared error summed over d (alpha = d) and the L1 not divided by
                            sqrt(d) (beta = 0.04 * sqrt(d), the same penalty), tied random encoder, b_dec at
                            the first batch's mean
  summed MSE, data start    the same losses, csc's data start (b_enc at the init_l0 quantile, least-squares
                            code scale)
  per-dim MSE, tied start   today's losses (beta 0.04), the old start
  per-dim MSE, data start   today's defaults
Columns: training L0 and EV of step 0's batch (before its update), the report after the warm-ups, the last
report; nce_grad_share (InfoNCE's share of the gradient on the anchors' pre-activations, mean over the steps
after the warm-ups that measure it: the last of each report); held-out EV, L0 and InfoNCE (chance is about ln of the batch size).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

from csc.activations.source import Activations, shard_batches
from csc.config import TrainRunSpec
from csc.spec_loader import load_spec
from csc.pipeline.evaluate import reconstruction_scores
from csc.pipeline.run import training_stream
from csc.sae.archs import build_sae
from csc.sae.trainer import Hook, Trainer
from csc.sweep.spec import SweepSpec

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"


class Steps(Hook):
    def __init__(self):
        self.steps: list[dict] = []

    def on_step(self, trainer, metrics):
        self.steps.append(metrics)


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {dev}; torch {torch.__version__}"


def run(spec: TrainRunSpec, acts: Activations, summed: bool, data_start: bool) -> dict[str, float]:
    d = acts.d_model
    cfg = spec.sae.model_copy(update={"d_in": d, "architecture": "relu"})
    tr = spec.trainer.model_copy(update={"gamma": 0.1, "temperature": 1.0, "device": "cpu", "data_init": data_start,
                                         **({"alpha": float(d), "beta": 0.04 * d ** 0.5} if summed else {})})
    model = build_sae(cfg, seed=tr.seed)
    stream = training_stream(acts, tr.batch_size, tr.seed)
    if not data_start:  # csc before: the tied random start with b_dec at the first batch's mean
        first = next(training_stream(acts, tr.batch_size, tr.seed))
        with torch.no_grad():
            model.b_dec.copy_(model.normalise(first.anchors)[0].mean(0))
    trainer = Trainer(cfg, tr, model=model)
    rec = Steps()
    trainer.fit(stream, [rec])
    warm = max(tr.warmup(w) for w in ("lr_warmup_steps", "beta_warmup_steps", "gamma_warmup_steps"))
    after = [m for m in rec.steps if m["step"] > warm]
    held, _ = reconstruction_scores(trainer.model.eval(), shard_batches(acts, "eval", tr.batch_size, drop_last=False),
                                    temperature=tr.temperature, hard_negatives=tr.hard_negatives)
    s0, sw, sl = rec.steps[0], rec.steps[warm - 1], rec.steps[-1]
    return {"l0_0": s0["l0"], "ev_0": s0["ev"], "l0_w": sw["l0"], "ev_w": sw["ev"], "l0_end": sl["l0"], "ev_end": sl["ev"],
            "share": statistics.fmean(m["nce_grad_share"] for m in after if "nce_grad_share" in m), "warm": warm,
            "ho_ev": held["explained_variance"], "ho_l0": held["l0"], "ho_nce": held["nce"],
            "ho_chance": held["nce_chance"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(SPEC))
    p.add_argument("--steps", type=int, default=None, help="default: the spec's trainer.steps")
    a = p.parse_args()
    print(f"$ python {' '.join(shlex.quote(x) for x in sys.argv)}\n{machine()}\n")
    overrides = ["trainer.device=cpu"] + ([f"trainer.steps={a.steps}"] if a.steps else [])
    spec = load_spec(TrainRunSpec, a.spec, overrides, part_of=SweepSpec)
    acts = Activations(spec)
    for split in ("train", "eval"):
        acts.build(split)
    rows = []
    for summed in (True, False):
        for data_start in (False, True):
            name = f"{'summed' if summed else 'per-dim'} MSE, {'data' if data_start else 'tied'} start"
            r = run(spec, acts, summed, data_start)
            print(f"{name}: {r}", flush=True)
            rows.append((name, r))
    warm = rows[0][1]["warm"]
    print(f"\n| losses, start | step 0 L0 | step 0 EV | step {warm} L0 | step {warm} EV | step {spec.trainer.steps} L0 "
          f"| step {spec.trainer.steps} EV | nce_grad_share | held-out EV | held-out L0 | held-out nce (chance) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['l0_0']:.0f} | {r['ev_0']:.3f} | {r['l0_w']:.0f} | {r['ev_w']:.3f} | {r['l0_end']:.0f} | "
              f"{r['ev_end']:.3f} | {r['share']:.3f} | {r['ho_ev']:.3f} | {r['ho_l0']:.1f} | "
              f"{r['ho_nce']:.3f} ({r['ho_chance']:.3f}) |")


if __name__ == "__main__":
    main()
