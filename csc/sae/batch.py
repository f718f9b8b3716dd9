"""The unit of SAE training data."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationBatch:
    """B anchor tokens, each with its sequence-aware positive partner, given one of two ways:

    - `partner_index` (batches of whole contexts, `activations.batching: contexts`): the partner is itself an
      anchor of the batch, at row partner_index[i], so its code is the one the batch's forward pass computes;
    - `partners` (batches of tokens, `activations.batching: tokens`): the partner's activation travels with its
      anchor and the contrastive term encodes it separately.

    All activations are already multiplied by the dataset's normalisation scale. Anchors of one batch come from
    several sequences, so the codes of the other sequences in the batch serve as InfoNCE negatives.
    """

    anchors: torch.Tensor
    """[B, d] residual-stream activations of the anchor tokens."""
    partners: torch.Tensor | None
    """[B, d] activations of each anchor's positive partner: a token of the same sequence chosen by the data's
    pairing rule (csc.activations.pairing); None when `partner_index` is given."""
    seq_id: torch.Tensor
    """[B] int64 global id of the context (sequence) each anchor comes from."""
    position: torch.Tensor
    """[B] int64 position of the anchor inside its context (BOS is position 0 and never appears)."""
    partner_index: torch.Tensor | None = None
    """[B] int64 row of each anchor's partner in this batch, -1 where the partner is not in it (position 1,
    which is no anchor, or the part of a context that another batch holds); None when `partners` is given."""

    def __post_init__(self) -> None:
        if (self.partners is None) == (self.partner_index is None):
            raise ValueError("an ActivationBatch has either partner activations or partner rows, exactly one")

    def __len__(self) -> int:
        return self.anchors.shape[0]

    def to(self, device: torch.device | str) -> ActivationBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return ActivationBatch(move(self.anchors), move(self.partners), move(self.seq_id), move(self.position),
                               move(self.partner_index))
