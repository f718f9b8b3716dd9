"""The scale study's picture and summary (bench/README.md section 11): held-out figures against training tokens, one
line per setting (architecture, gamma, tau, pairing), mean and spread over seeds.

    csc sweep sweeps/embedded-scale.yaml            # and its smaller budgets, and embedded-scale-contrastive.yaml
    python bench/scale_study.py runs/sweeps/embedded-scale runs/sweeps/embedded-scale-82k ... [--plot bench/scale_study.png]

Reads each sweep's trials.json and spec (bench/contrastive_grid.py's `load`). A trial's budget is the anchors it trained
on (trainer.steps x trainer.batch_size). Prints, per setting and budget, the mean ± sample standard deviation over
seeds of delta CE (nats), KL, EV, L0, held-out InfoNCE, locality and dead fraction, then the paired difference from the
gamma = 0 twin of the same architecture, budget and seed (held-out InfoNCE only where the twin was measured with the
same pairing rule and temperature: "-" otherwise); draws delta CE, locality and InfoNCE against tokens (log scale).
The tables with every feature figure come from bench/contrastive_grid.py on the same folders.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_grid import cell, load  # noqa: E402

SETTING = ("sae.architecture", "trainer.gamma", "trainer.temperature", "activations.pairing")
"""What a line of the study is; trainer.seed varies within it, the budget along it."""
FIGURES = (("eval/delta_ce", "delta CE (nats)", 3), ("eval/kl_spliced", "KL", 3),
           ("eval/explained_variance", "EV", 3), ("eval/l0", "L0", 1), ("eval/nce", "held-out nce", 3),
           ("eval/context_locality", "locality", 3), ("eval/dead_fraction", "dead", 3))
YARDSTICK = ("eval/nce",)
"""Figures measured with the trial's own pairing rule and temperature: paired only with a twin measured the same way."""
PLOTTED = (("eval/delta_ce", "delta CE (nats)"), ("eval/context_locality", "context locality"),
           ("eval/nce", "held-out InfoNCE (nats)"))


def budget(setting: dict[str, Any]) -> int:
    return int(setting["trainer.steps"]) * int(setting["trainer.batch_size"])


def name(key: tuple) -> str:
    arch, gamma, tau, pairing = key
    return arch if not gamma else f"{arch}, gamma {gamma:g}, tau {tau:g}, {pairing}"


def collect(dirs: list[Path]) -> dict[tuple, dict[int, dict[int, dict[str, Any]]]]:
    """setting -> budget -> seed -> metrics (with the trial's yardstick, its tau and pairing, under "yardstick"); a
    gamma = 0 trial's tau and pairing are not part of its setting (they change nothing it learns)."""
    out: dict[tuple, dict[int, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    origin: dict[tuple, Path] = {}
    for d in dirs:
        for setting, metrics, _ in load(d):
            key = tuple(setting.get(k) for k in SETTING)
            yardstick = key[2:]
            if not key[1]:
                key = (key[0], 0.0, None, None)
            cell = (key, budget(setting), int(setting["trainer.seed"]))
            if cell in origin:  # e.g. a variant sweep of the same setting (another recipe) given beside it
                raise SystemExit(f"{origin[cell]} and {d} both hold {name(key)} at {cell[1]:,} tokens, seed {cell[2]}: "
                                 f"give the sweeps of one study only")
            origin[cell] = d
            out[key][cell[1]][cell[2]] = {**metrics, "yardstick": yardstick}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", type=Path, nargs="+")
    p.add_argument("--plot", type=Path, default=None, help="write the figure here (PNG)")
    a = p.parse_args(argv)
    data = collect(a.sweep_dirs)
    if not data:
        raise SystemExit(f"no finished trials in {', '.join(map(str, a.sweep_dirs))}")
    order = sorted(data, key=lambda k: (k[0], k[1], -(k[2] or 0), str(k[3])))
    print(f"$ python bench/scale_study.py {' '.join(map(str, a.sweep_dirs))}\n")
    print("| setting | tokens | seeds | " + " | ".join(c for _, c, _ in FIGURES) + " |")
    print("|---|---|---|" + "---|" * len(FIGURES))
    for key in order:
        for tokens, seeds in sorted(data[key].items()):
            values = [cell([m[f] for m in seeds.values() if f in m], d) for f, _, d in FIGURES]
            print(f"| {name(key)} | {tokens:,} | {len(seeds)} | " + " | ".join(values) + " |")
    print("\nPaired differences from the gamma = 0 twin (same architecture, budget and seed):\n")
    print("| setting | tokens | pairs | " + " | ".join(f"Δ {c}" for _, c, _ in FIGURES) + " |")
    print("|---|---|---|" + "---|" * len(FIGURES))
    for key in order:
        if not key[1]:
            continue
        for tokens, seeds in sorted(data[key].items()):
            twin = data.get((key[0], 0.0, None, None), {}).get(tokens, {})
            pairs = [(m, twin[s]) for s, m in seeds.items() if s in twin]
            values = [cell([m[f] - t[f] for m, t in pairs if f in m and f in t
                            and (f not in YARDSTICK or m["yardstick"] == t["yardstick"])], d) for f, _, d in FIGURES]
            print(f"| {name(key)} | {tokens:,} | {len(pairs)} | " + " | ".join(values) + " |")
    if a.plot:
        plot(data, order, a.plot)
        print(f"\nplot written: {a.plot}")


def plot(data: dict, order: list[tuple], path: Path) -> None:
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5.2 * len(PLOTTED), 4.4))
    for ax, (metric, title) in zip(axes, PLOTTED):
        for key in order:
            points = [(t, [m[metric] for m in s.values() if metric in m]) for t, s in sorted(data[key].items())]
            points = [(t, v) for t, v in points if v]
            if not points:
                continue
            xs = [t for t, _ in points]
            ys = [statistics.fmean(v) for _, v in points]
            err = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linestyle="-" if not key[1] else "--",
                        label=name(key))
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (anchors)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Embedded model, layer 12, dictionary 2048, matched L0: mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
