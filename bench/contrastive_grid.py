"""The table of one or several contrastive grids (sweeps/contrastive-grid.yaml, sweeps/contrastive-strength.yaml,
sweeps/contrastive-balance.yaml): what the contrastive term does to the held-out figures, and what it costs,
against its gamma = 0 twin.

    csc sweep sweeps/contrastive-grid.yaml
    python bench/contrastive_grid.py runs/sweeps/contrastive-grid [more sweep directories]

Reads each sweep's trials.json and its spec (csc_sweep.json). A cell is a setting of the fields that vary between
the trials read (trainer.seed aside). Table 1: per cell, the mean and the sample standard deviation over seeds of
every held-out figure. Table 2: paired differences from the gamma = 0 trial of the same seed and the same other
fields (same initialisation, same batches, same held-out yardstick), mean +/- standard deviation over seeds: the
term's effect with the seed-to-seed variation of both arms removed. The twin may come from another directory. Both
tables twice: for reconstruction and the term's own figures (FIGURES), then for the figures of features
(FEATURE_FIGURES), whose twin may have another pairing rule or temperature (YARDSTICK).
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
"""(metric key in trials.json, column, decimals): reconstruction and the contrastive term's own figures."""

FEATURE_FIGURES = (("eval/l0", "L0", 1), ("eval/probe_seq_sae_top_1", "genre top-1", 3),
                   ("eval/probe_seq_sae_top_5", "genre top-5", 3), ("eval/probe_seq_random_top_5", "floor", 3),
                   ("eval/probe_letter_sae_top_1", "letter top-1", 3), ("eval/probe_letter_sae_top_5", "letter top-5", 3),
                   ("eval/probe_letter_random_top_5", "floor", 3), ("eval/context_locality", "locality", 2),
                   ("eval/context_locality_weighted", "locality (weighted)", 2),
                   ("eval/absorption_fraction", "absorption", 3), ("eval/absorption_full", "full abs.", 3))
"""The same for the figures of features (README, Metrics): sparse probing with its floor, locality, absorption."""

GAMMA, SEED = "trainer.gamma", "trainer.seed"
INERT_WITHOUT_TERM = ("trainer.balance", "trainer.balance_share", "trainer.nce_latents")
"""Fields that change nothing at gamma = 0: a twin is matched without them."""
YARDSTICK = ("activations.pairing", "trainer.temperature")
"""Fields that change nothing a gamma = 0 SAE learns, only its held-out InfoNCE and code cosines (measured with them):
a twin for the feature figures is matched without them as well."""


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
    for setting, metrics in trials:
        by_cell[tuple(setting.get(k) for k in fields)][setting[SEED]] = metrics
    order = sorted(by_cell, key=lambda c: tuple(repr(v) if not isinstance(v, (int, float)) else v for v in c))
    chance = statistics.fmean(m["eval/nce_chance"] for _, m in trials)
    print(f"held-out InfoNCE at chance (codes without information): {chance:.3f}\n")
    feature_twin_fields = [k for k in twin_fields if k not in YARDSTICK]
    for title, figures, paired, matched in (
            ("Reconstruction and the term's own figures", FIGURES, FIGURES[:-1], twin_fields),
            ("Features", FEATURE_FIGURES, FEATURE_FIGURES, feature_twin_fields)):
        print(f"## {title}\n")
        twins: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for setting, metrics in trials:
            if setting[GAMMA] == 0:
                twins[tuple(setting.get(k) for k in matched)].setdefault(setting[SEED], metrics)
        tables(fields, order, by_cell, twins, matched, figures, paired)


def tables(fields: list[str], order: list[tuple], by_cell: dict[tuple, dict[int, dict]],
           twins: dict[tuple, dict[int, dict]], twin_fields: list[str], figures: tuple, paired: tuple) -> None:
    """Per cell the mean ± spread over seeds of `figures`; then the paired differences from the twin of `paired`."""
    head = " | ".join(k.rsplit(".", 1)[-1] for k in fields)
    print(f"| {head} | seeds | " + " | ".join(c for _, c, _ in figures) + " |")
    print("|---" * len(fields) + "|---|" + "---|" * len(figures))
    for key in order:
        seeds = by_cell[key]
        values = [cell([m[k] for m in seeds.values() if k in m], d) for k, _, d in figures]
        print("| " + " | ".join(label(v) for v in key) + f" | {len(seeds)} | " + " | ".join(values) + " |")
    print("\nPaired differences from the gamma = 0 twin (same seed, same other fields):\n")
    print(f"| {head} | pairs | " + " | ".join(f"Δ {c}" for _, c, _ in paired) + " |")
    print("|---" * len(fields) + "|---|" + "---|" * len(paired))
    for key in order:
        setting = dict(zip(fields, key))
        if setting[GAMMA] == 0:
            continue
        twin = twins.get(tuple(setting[k] for k in twin_fields), {})
        pairs = [(m, twin[s]) for s, m in by_cell[key].items() if s in twin]
        values = [cell([m[k] - t[k] for m, t in pairs if k in m and k in t], d) for k, _, d in paired]
        print("| " + " | ".join(label(v) for v in key) + f" | {len(pairs)} | " + " | ".join(values) + " |")
    print()

if __name__ == "__main__":
    main()
