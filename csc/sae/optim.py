"""Adam that keeps the rows of chosen matrices on the unit sphere."""

from collections.abc import Iterable

import torch


class ConstrainedAdam(torch.optim.Adam):
    """Adam with unit-norm rows for `constrained_params` (the decoder weight).

    Before the Adam step each row's gradient is projected onto the tangent space of the sphere
    at that row (g -= (g . v) v, v the unit row), so Adam does not spend its step on changing
    the norm; after the step the rows are renormalised to undo the remaining drift.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter],
                 constrained_params: Iterable[torch.nn.Parameter], lr: float, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.constrained_params = list(constrained_params)

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.constrained_params:
            if p.grad is not None:
                # (g . v) v = ((g . p) / (p . p)) p: two row-wise dot products and one multiply-add, no [rows, d]
                # temporaries (half the passes over the matrix of the plain formula)
                coef = torch.einsum("ij,ij->i", p.grad, p) / torch.einsum("ij,ij->i", p, p)
                p.grad.addcmul_(p, coef.unsqueeze(-1), value=-1)
        loss = super().step(closure)
        for p in self.constrained_params:
            p.div_(torch.linalg.vector_norm(p, dim=-1, keepdim=True))
        return loss
