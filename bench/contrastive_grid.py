"""The table of a gamma x pairing x seed grid (sweeps/contrastive-grid.yaml): what the contrastive term does
to the held-out figures, and what it costs, against its gamma = 0 twin.

    csc sweep sweeps/contrastive-grid.yaml
    python bench/contrastive_grid.py runs/sweeps/contrastive-grid

Reads the sweep's trials.json. Table 1: per (gamma, pairing) cell, the mean and the sample standard deviation
over seeds of every held-out figure. Table 2: paired differences from the gamma = 0 trial of the same pairing
and seed (same initialisation, same batches), mean +/- standard deviation over seeds: the term's effect with
the seed-to-seed variation of both arms removed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

FIGURES = (("eval/l0", "L0", 1), ("eval/explained_variance", "EV", 3), ("eval/delta_ce", "delta CE (nats)", 3),
           ("eval/kl_spliced", "KL", 3), ("eval/ce_loss_recovered", "CE rec.", 3), ("eval/nce", "held-out nce", 3),
           ("eval/code_sim_positive", "code cos +", 3), ("eval/code_sim_negative", "code cos -", 3),
           ("nce_grad_share", "nce grad share", 2))
"""(metric key in trials.json, column, decimals)."""


def cell(values: list[float], decimals: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    a = p.parse_args()
    rows = [r for r in json.loads((a.sweep_dir / "trials.json").read_text()) if r["outcome"] == "finished"]
    print(f"$ python bench/contrastive_grid.py {a.sweep_dir}\n{len(rows)} finished trials\n")
    by_cell: dict[tuple[float, str], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        p_ = r["params"]
        by_cell[(p_["trainer.gamma"], p_["activations.pairing"])][p_["trainer.seed"]] = r["metrics"]
    chance = statistics.fmean(r["metrics"]["eval/nce_chance"] for r in rows)
    print(f"held-out InfoNCE at chance (codes without information): {chance:.3f}\n")
    print("| gamma | pairing | seeds | " + " | ".join(c for _, c, _ in FIGURES) + " |")
    print("|---|---|---|" + "---|" * len(FIGURES))
    for (gamma, pairing), seeds in sorted(by_cell.items()):
        values = [cell([m[k] for m in seeds.values() if k in m], d) for k, _, d in FIGURES]
        print(f"| {gamma:g} | {pairing} | {len(seeds)} | " + " | ".join(values) + " |")
    print("\nPaired differences from the gamma = 0 twin (same pairing, same seed):\n")
    deltas = FIGURES[:-1]
    print("| gamma | pairing | pairs | " + " | ".join(f"Δ {c}" for _, c, _ in deltas) + " |")
    print("|---|---|---|" + "---|" * len(deltas))
    for (gamma, pairing), seeds in sorted(by_cell.items()):
        if gamma == 0:
            continue
        twins = by_cell.get((0.0, pairing), {})
        pairs = [(m, twins[s]) for s, m in seeds.items() if s in twins]
        values = [cell([m[k] - t[k] for m, t in pairs], d) for k, _, d in deltas]
        print(f"| {gamma:g} | {pairing} | {len(pairs)} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
