"""Figures of one training run: training curves and the feature-density histogram (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from csc.sae.metrics import DensityHistogram  # noqa: E402

CURVES = [("loss", "total loss"), ("mse", "MSE"), ("l1", "L1"), ("nce", "InfoNCE"), ("ev", "explained variance (batch)"),
          ("l0", "L0"), ("dead_frac", "dead fraction (window)"), ("gamma", "weights in force")]


def training_curves(rows: list[dict[str, float]], path: Path, title: str = "") -> None:
    """One panel per metric against the training step; the last panel shows beta and gamma in force."""
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(axes.flat, CURVES):
        if key == "gamma":
            for w in ("beta", "gamma"):
                ax.plot(steps, [r.get(w, float("nan")) for r in rows], label=w)
            ax.legend()
        elif any(key in r for r in rows):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def density_histogram(hist: DensityHistogram, path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    edges = hist.edges.tolist()
    ax.bar(edges[:-1], hist.counts.tolist(), width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
    ax.set_xlabel("log10 firing density on held-out tokens")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}  (never fired: {hist.n_never_fired})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
