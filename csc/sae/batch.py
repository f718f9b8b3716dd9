"""The unit of SAE training data."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationBatch:
    """B anchor tokens, each with its sequence-aware positive partner.

    All activations are already multiplied by the dataset's normalisation scale.
    Anchors of one batch come from many different sequences, so the codes of other
    sequences in the batch serve as InfoNCE negatives.
    """

    anchors: torch.Tensor
    """[B, d] residual-stream activations of the anchor tokens."""
    partners: torch.Tensor
    """[B, d] activations of each anchor's positive partner: a token of the same sequence chosen by the data's
    pairing rule (csc.activations.pairing)."""
    seq_id: torch.Tensor
    """[B] int64 global id of the context (sequence) each anchor comes from."""
    position: torch.Tensor
    """[B] int64 position of the anchor inside its context (BOS is position 0 and never appears)."""

    def __len__(self) -> int:
        return self.anchors.shape[0]

    def to(self, device: torch.device | str) -> "ActivationBatch":
        return ActivationBatch(
            self.anchors.to(device, non_blocking=True),
            self.partners.to(device, non_blocking=True),
            self.seq_id.to(device, non_blocking=True),
            self.position.to(device, non_blocking=True),
        )
