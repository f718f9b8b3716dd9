"""Rung figures: what a sweep trial measures of its SAE at every report, on a fixed held-out slice, so that the
scheduler's rungs compare trials on tokens none of them trained on (training-batch averages favour whatever
fits the training batches, and every contrastive term costs reconstruction there by construction).

The slice is the first `eval.rung_contexts` held-out contexts, read once and kept in memory. On it the trial
measures, with no LM, exactly what the final evaluation measures on every held-out token (`held_out_scores`,
the same functions on a smaller set): reconstruction (explained variance, normalised MSE), L0, dead fraction,
held-out InfoNCE at the trial's own temperature, pairing rule and negatives, the code cosines of positive and
other-sequence pairs, and context locality. They are reported as `heldout/<key>` beside the training figures,
with `heldout/seconds`, what measuring them took (bench/README.md section 10 states the cost and how large the
slice must be for a stable ranking).
"""

from __future__ import annotations

import time

import torch

from csc.activations.source import Shard, ShardSource
from csc.config import TrainRunSpec
from csc.pipeline.run import held_out_scores
from csc.sae.model import SparseAutoencoder

PREFIX = "heldout/"
FIGURES: dict[str, str] = {
    "explained_variance": "max", "normalized_mse": "min", "l0": "min", "dead_fraction": "min", "nce": "min",
    "code_sim_positive": "max", "code_sim_negative": "min", "context_locality": "max",
    "context_locality_weighted": "max",
}
"""The rung figures (keys of `csc eval`, defined in its metrics table) and which way is better. On one slice,
explained variance and normalised MSE rank SAEs alike: both are 1 - or + the same squared error over a fixed
denominator."""
NAMES: tuple[str, ...] = tuple(PREFIX + key for key in FIGURES)
"""What every report of a sweep trial carries besides the training metrics."""
SECONDS = PREFIX + "seconds"
"""Wall time of one measurement of the rung figures, in seconds (reported beside them)."""


class HeldOutSlice:
    """The first `spec.eval.rung_contexts` held-out contexts of `acts` (all there are, if fewer) as a ShardSource of
    one held-out shard, and the rung figures of an SAE on it."""

    def __init__(self, spec: TrainRunSpec, acts: ShardSource):
        per_shard = spec.activations.contexts_per_shard
        wanted = min(spec.eval.rung_contexts, acts.n_shards["eval"] * per_shard)
        shards = [acts.shard("eval", i) for i in range(-(-wanted // per_shard))]
        rules = shards[0].partners
        self._shard = Shard(index=0, acts=torch.cat([s.acts for s in shards])[:wanted],
                            partners={r: torch.cat([s.partners[r] for s in shards])[:wanted] for r in rules},
                            tokens=torch.cat([s.tokens for s in shards])[:wanted],
                            seq_id=torch.cat([s.seq_id for s in shards])[:wanted])
        self.spec = spec.model_copy(update={"activations": spec.activations.model_copy(
            update={"contexts_per_shard": wanted})})
        self.n_shards = {"train": 0, "eval": 1}
        self.scale = acts.scale
        self.contexts = wanted

    def shard(self, split: str, i: int) -> Shard:
        if (split, i) != ("eval", 0):
            raise IndexError(f"the held-out slice has one shard, ('eval', 0), not {(split, i)}")
        return self._shard

    def figures(self, sae: SparseAutoencoder) -> dict[str, float]:
        """The rung figures of `sae` (as inference computes its codes: eval mode, restored after), and SECONDS."""
        start, was_training = time.perf_counter(), sae.training
        sae.eval()
        try:
            scores, _ = held_out_scores(self.spec, sae, self)
        finally:
            sae.train(was_training)
        return {**{PREFIX + key: scores[key] for key in FIGURES}, SECONDS: time.perf_counter() - start}
