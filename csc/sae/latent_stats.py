"""Per-latent statistics for feature dashboards, streamed over batches of whole contexts in bounded memory.

Over the tokens given (contexts c, positions t), for latent j:

    fires_j       #{(c, t): z_j(c, t) != 0}                          its firing frequency is fires_j / tokens
    hist_j[b]     #{(c, t): z_j(c, t) > 0, log10 z_j(c, t) in bin b}  LOG10_BINS bins per decade over
                  [LOG10_MIN, LOG10_MAX]; values outside land in the first or last bin
    top contexts  the `k` contexts with the largest max_t z_j(c, t) > 0, each with that max and its position
                  (one example per context: a latent firing on many tokens of one context fills one slot)

Memory is O(dict_size * (k + bins)) whatever the number of tokens: every update folds a batch into the running
figures and keeps nothing of its codes.
"""

from __future__ import annotations

import torch

LOG10_MIN, LOG10_MAX, LOG10_BINS = -4.0, 4.0, 8
"""Bins of the activation histograms: 8 per decade from 1e-4 to 1e4 (codes of activations normalised to norm
sqrt(d) are O(1)), fixed so that one pass suffices."""


class LatentStats:
    def __init__(self, dict_size: int, k: int):
        self.tokens = 0
        self.fires = torch.zeros(dict_size, dtype=torch.int64)
        self.n_bins = int((LOG10_MAX - LOG10_MIN) * LOG10_BINS)
        self.hist = torch.zeros(dict_size, self.n_bins, dtype=torch.int64)
        self.top_value = torch.zeros(k, dict_size)
        """[k, dict] the largest per-context maxima, descending; 0 where fewer than k contexts fired."""
        self.top_context = torch.full((k, dict_size), -1, dtype=torch.int64)
        """[k, dict] the context index of each (-1: none)."""
        self.top_position = torch.full((k, dict_size), -1, dtype=torch.int64)
        """[k, dict] the position of each maximum within its context."""

    @property
    def bin_edges(self) -> torch.Tensor:
        """[bins + 1] edges of the histograms' bins, in activation units."""
        return torch.logspace(LOG10_MIN, LOG10_MAX, self.n_bins + 1, dtype=torch.float64)

    @torch.no_grad()
    def update(self, z: torch.Tensor, contexts: torch.Tensor) -> None:
        """z [n, T, dict]: the codes of n contexts (T of their positions); contexts [n]: their indices."""
        z = z.detach().float().cpu()
        n, T, F = z.shape
        self.tokens += n * T
        self.fires += (z != 0).sum(dim=(0, 1))
        t, j = (z > 0).reshape(n * T, F).nonzero(as_tuple=True)
        b = ((z.reshape(n * T, F)[t, j].log10() - LOG10_MIN) * LOG10_BINS).floor().long().clamp(0, self.n_bins - 1)
        self.hist.view(-1).index_add_(0, j * self.n_bins + b, torch.ones_like(b))
        peak, where = z.max(dim=1)  # [n, F]: each context's maximum and its position
        values = torch.cat([self.top_value, peak])
        ctx = torch.cat([self.top_context, contexts.long()[:, None].expand(n, F)])
        pos = torch.cat([self.top_position, where])
        k = self.top_value.shape[0]
        self.top_value, order = values.topk(k, dim=0)
        self.top_context, self.top_position = ctx.gather(0, order), pos.gather(0, order)

    def top(self, latent: int) -> list[tuple[float, int, int]]:
        """(max activation, context, position) of the latent's top contexts, largest first (fired ones only)."""
        return [(float(v), int(c), int(p)) for v, c, p in zip(self.top_value[:, latent], self.top_context[:, latent],
                                                              self.top_position[:, latent]) if v > 0 and c >= 0]
