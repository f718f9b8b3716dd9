"""The table of one or several contrastive grids (sweeps/contrastive-grid.yaml, sweeps/contrastive-strength.yaml,
sweeps/contrastive-balance.yaml): what the contrastive term does to the held-out figures, and what it costs,
against its gamma = 0 twin.

    csc sweep sweeps/contrastive-grid.yaml
    python bench/contrastive_grid.py runs/sweeps/contrastive-grid [more sweep directories]

Reads each sweep's trials.json and its spec (csc_sweep.json). A cell is a setting of the fields that vary between
the trials read (trainer.seed aside). Table 1: per cell, the mean and the sample standard deviation over seeds of
every held-out figure. Table 2: paired differences from the gamma = 0 trial of the same seed and the same other
fields (same initialisation, same batches, same held-out yardstick), mean +/- standard deviation over seeds: the
term's effect with the seed-to-seed variation of both arms removed. The twin may come from another directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

FIGURES = (("eval/l0", "L0", 1), ("eval/explained_variance", "EV", 3), ("eval/delta_ce", "delta CE (nats)", 3),
           ("eval/kl_spliced", "KL", 3), ("eval/ce_loss_recovered", "CE rec.", 3), ("eval/nce", "held-out nce", 3),
           ("eval/code_sim_positive", "code cos +", 3), ("eval/code_sim_negative", "code cos -", 3),
           ("nce_grad_share", "nce grad share", 2))
"""(metric key in trials.json, column, decimals)."""

GAMMA, SEED = "trainer.gamma", "trainer.seed"
INERT_WITHOUT_TERM = ("trainer.balance", "trainer.balance_share", "trainer.nce_latents")
"""Fields that change nothing at gamma = 0: a twin is matched without them."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load(sweep_dir: Path) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """(the trial's full setting, its metrics) for every finished trial of one sweep."""
    base = flatten(json.loads((sweep_dir / "csc_sweep.json").read_text())["spec"])
    base = {k: v for k, v in base.items() if not k.startswith("sweep.")}
    rows = json.loads((sweep_dir / "trials.json").read_text())
    return [({**base, **r["params"]}, r["metrics"]) for r in rows if r["outcome"] == "finished"]


def cell(values: list[float], decimals: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}"


def label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", type=Path, nargs="+")
    a = p.parse_args()
    trials = [t for d in a.sweep_dirs for t in load(d)]
    if not trials:
        raise SystemExit(f"no finished trials in {', '.join(map(str, a.sweep_dirs))}")
    print(f"$ python bench/contrastive_grid.py {' '.join(map(str, a.sweep_dirs))}\n{len(trials)} finished trials\n")
    fields = [GAMMA] + [k for k in trials[0][0]
                        if k not in (GAMMA, SEED) and len({repr(s.get(k)) for s, _ in trials}) > 1]
    twin_fields = [k for k in fields if k != GAMMA and k not in INERT_WITHOUT_TERM]
    by_cell: dict[tuple, dict[int, dict]] = defaultdict(dict)
    twins: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for setting, metrics in trials:
        by_cell[tuple(setting.get(k) for k in fields)][setting[SEED]] = metrics
        if setting[GAMMA] == 0:
            twins[tuple(setting.get(k) for k in twin_fields)].setdefault(setting[SEED], metrics)
    order = sorted(by_cell, key=lambda c: tuple(repr(v) if not isinstance(v, (int, float)) else v for v in c))
    chance = statistics.fmean(m["eval/nce_chance"] for _, m in trials)
    print(f"held-out InfoNCE at chance (codes without information): {chance:.3f}\n")
    head = " | ".join(k.rsplit(".", 1)[-1] for k in fields)
    print(f"| {head} | seeds | " + " | ".join(c for _, c, _ in FIGURES) + " |")
    print("|---" * len(fields) + "|---|" + "---|" * len(FIGURES))
    for key in order:
        seeds = by_cell[key]
        values = [cell([m[k] for m in seeds.values() if k in m], d) for k, _, d in FIGURES]
        print("| " + " | ".join(label(v) for v in key) + f" | {len(seeds)} | " + " | ".join(values) + " |")
    print("\nPaired differences from the gamma = 0 twin (same seed, same other fields):\n")
    deltas = FIGURES[:-1]
    print(f"| {head} | pairs | " + " | ".join(f"Δ {c}" for _, c, _ in deltas) + " |")
    print("|---" * len(fields) + "|---|" + "---|" * len(deltas))
    for key in order:
        setting = dict(zip(fields, key))
        if setting[GAMMA] == 0:
            continue
        twin = twins.get(tuple(setting[k] for k in twin_fields), {})
        pairs = [(m, twin[s]) for s, m in by_cell[key].items() if s in twin]
        values = [cell([m[k] - t[k] for m, t in pairs], d) for k, _, d in deltas]
        print("| " + " | ".join(label(v) for v in key) + f" | {len(pairs)} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
