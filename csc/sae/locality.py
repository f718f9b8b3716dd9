"""Context locality: does a latent that has fired in a context fire there again more than it fires anywhere?

Over whole contexts c, their tokens t in order, for latent j:

    fired_j(c, t) = z_j(c, t) != 0
    seen_j(c, t)  = fired_j(c, t') for some earlier token t' < t of c
    M = #{(c, t)},  N_j = #{fired},  A_j = #{fired and seen},  B_j = #{seen}
    r_j = P(fired | seen) / P(fired) = (A_j / B_j) / (N_j / M)

r_j = 1 when whether j fires at t does not depend on its past in the context; a latent that fires at every token
of a fraction q of the contexts and nowhere else has r_j = 1/q; one that fires at most once per context has
r_j = 0; always r_j <= 1 / P(fired). r_j is measured for the latents with B_j > 0 (live latents that fired before
the last token of some context). Summaries over them:

    context_locality          = median_j r_j (the mean of the two middle values for an even count): the typical
                                latent. A plain mean would belong to the rarest latents, whose r_j reaches 1/P(fired)
                                on a handful of firings.
    context_locality_weighted = sum_j N_j r_j / sum_j N_j: the typical firing, each latent weighing as much as it
                                fires (= M sum_j (A_j / B_j) / sum_j N_j).

`seen` selects later tokens of a context: a latent whose firing rate rises along the context scores above 1
without any context structure. Every count is a sum over contexts, so batches of whole contexts stream in any
order, in memory bounded by the batch.
"""

import torch

from csc.errors import CscError


class ContextLocality:
    def __init__(self, dict_size: int):
        self.tokens = 0
        self.fired = torch.zeros(dict_size, dtype=torch.int64)
        self.fired_seen = torch.zeros(dict_size, dtype=torch.int64)
        self.seen = torch.zeros(dict_size, dtype=torch.int64)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """z [n, T, dict]: the codes of n whole contexts, tokens in order."""
        fired = (z != 0).cpu()
        seen = torch.zeros_like(fired)
        seen[:, 1:] = fired[:, :-1].cummax(dim=1).values  # fired at some t' <= t - 1
        self.tokens += fired.shape[0] * fired.shape[1]
        self.fired += fired.sum(dim=(0, 1))
        self.fired_seen += (fired & seen).sum(dim=(0, 1))
        self.seen += seen.sum(dim=(0, 1))

    def ratios(self) -> torch.Tensor:
        """r_j [dict] in float64; NaN where B_j = 0."""
        seen = self.seen.double()
        rate = self.fired.double() / self.tokens
        return torch.where(seen > 0, self.fired_seen.double() / seen.clamp(min=1) / rate, torch.nan)

    def result(self) -> dict[str, float]:
        r = self.ratios()
        measured = r.isfinite()
        if not measured.any():
            raise CscError("context locality is undefined: no latent fired before the last token of a context")
        weights = self.fired[measured].double()
        return {"context_locality": r[measured].quantile(0.5).item(),
                "context_locality_weighted": (weights * r[measured]).sum().item() / weights.sum().item()}
