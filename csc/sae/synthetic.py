"""Toy activations with a known sparse structure, for tests and benchmarks without a language model.

x = c @ D with D a random dictionary of unit rows and c sparse non-negative codes. Each sequence has
a few "topic" features that all its tokens share, so an anchor and its partner (another token of
the same sequence) have overlapping codes while tokens of other sequences mostly do not: the
structure a contrastive SAE is meant to pick up.
"""

from collections.abc import Iterator

import torch

from csc.sae.batch import ActivationBatch


def sparse_dictionary_batches(d_in: int, n_features: int, batch_size: int, n_batches: int, *,
                              anchors_per_seq: int = 4, topic_features: int = 2,
                              other_features: int = 2, seed: int = 0) -> Iterator[ActivationBatch]:
    """Yield `n_batches` batches; the same arguments always yield the same stream.

    Activations are scaled by one constant so their average norm is about sqrt(d_in), like the
    normalised activations of the real pipeline.
    """
    if batch_size % anchors_per_seq:
        raise ValueError("batch_size must be a multiple of anchors_per_seq")
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d_in, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    n_seq = batch_size // anchors_per_seq
    scale = None

    def tokens(topics: torch.Tensor) -> torch.Tensor:
        # topics [n_seq, topic_features] -> codes [n_seq, anchors_per_seq, n_features]
        codes = torch.zeros(n_seq, anchors_per_seq, n_features)
        shared = topics[:, None, :].expand(-1, anchors_per_seq, -1)
        extra = torch.randint(0, n_features, (n_seq, anchors_per_seq, other_features), generator=gen)
        idx = torch.cat([shared, extra], dim=-1)
        mags = torch.rand(idx.shape, generator=gen) + 0.5
        return codes.scatter_add_(-1, idx, mags)

    for b in range(n_batches):
        topics = torch.stack([torch.randperm(n_features, generator=gen)[:topic_features]
                              for _ in range(n_seq)])
        anchors = tokens(topics).reshape(batch_size, n_features) @ dictionary
        partners = tokens(topics).reshape(batch_size, n_features) @ dictionary
        if scale is None:
            scale = d_in**0.5 / anchors.norm(dim=-1).mean()
        seq_id = (torch.arange(n_seq) + b * n_seq).repeat_interleave(anchors_per_seq)
        position = torch.randint(1, 128, (batch_size,), generator=gen)
        yield ActivationBatch(anchors * scale, partners * scale, seq_id, position)
