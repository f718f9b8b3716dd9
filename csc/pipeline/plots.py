"""Figures of one training run: training curves and the feature-density histogram (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

from csc.headless import pyplot
from csc.sae.losses import WEIGHT_NAMES
from csc.sae.metrics import DensityHistogram
from csc.sae.trainer import TRAINING_METRICS

LABELS = {"loss": "total loss", "mse": "MSE", "prefix_mse": "MSE of the inner prefixes", "l1": "L1",
          "l0_penalty": "L0 penalty", "nce": "InfoNCE", "auxk": "AuxK", "ev": "explained variance (batch)", "l0": "L0",
          "dead_frac": "dead fraction (window)", "grad_norm": "gradient norm (before clipping)"}


def training_curves(rows: list[dict[str, float]], path: Path, title: str = "") -> None:
    """One panel per training metric the rows have (csc.sae.trainer.TRAINING_METRICS), and one of the
    terms' weights in force (alpha is constant and left out)."""
    keys = [k for k in TRAINING_METRICS if any(k in r for r in rows)]
    weights = [w for w in WEIGHT_NAMES if w != "alpha" and any(w in r for r in rows)]
    n = len(keys) + 1
    plt = pyplot()
    fig, axes = plt.subplots(-(-n // 4), 4, figsize=(16, 3.25 * -(-n // 4)), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(LABELS.get(key, key))
    ax = axes.flat[len(keys)]
    for w in weights:
        ax.plot(steps, [r.get(w, float("nan")) for r in rows], label=w)
    if weights:
        ax.legend()
    ax.set_title("weights in force")
    for ax in axes.flat[:n]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def density_histogram(hist: DensityHistogram, path: Path, title: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    edges = hist.edges.tolist()
    ax.bar(edges[:-1], hist.counts.tolist(), width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
    ax.set_xlabel("log10 firing density on held-out tokens")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}  (never fired: {hist.n_never_fired})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
