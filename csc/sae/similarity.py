"""Cosine similarities of SAE codes for InfoNCE, each with a hand-written backward.

Written with F.normalize and a matmul, autograd materialises the unit codes and, in the backward, runs
about ten elementwise passes over the [B, dictionary] codes (the normalisation's quotient rule) and two
matmuls for a @ a^T. Here the codes are never normalised: the matmul runs on the raw codes, the norms
enter as [B] scale factors on the [B, B] result, and the backward is one matmul per side plus one
multiply-add pass over the codes. The values are F.normalize's (eps COS_EPS: an all-zero code has
cosine 0 with everything and passes no gradient through its norm); tests/test_sae_similarity.py checks
values and gradients against autograd on the plain formulas.

Under autocast the matmuls run in the autocast dtype, forward and backward, as autograd's would.
"""

from __future__ import annotations

import torch

from csc.sae.metrics import COS_EPS


def _inverse_norms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / max(||z_i||, eps) per row, and where the norm is above eps (where its gradient flows)."""
    n = torch.linalg.vector_norm(z, dim=-1)
    return n.clamp_min(COS_EPS).reciprocal(), n > COS_EPS


def _matmul(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
        return (a @ b).to(a.dtype)


class CosineGram(torch.autograd.Function):
    """cos(z_i, z_j) for every pair of rows of z [B, m]: [B, B]. 4·B²·m FLOPs forward and backward (one
    matmul each way, the backward's on (g + g^T), which is symmetric)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.autocast = torch.is_autocast_enabled(z.device.type)
        r, live = _inverse_norms(z)
        s = _matmul(ctx, z, z.T).mul_(r[:, None]).mul_(r[None, :])
        ctx.save_for_backward(z, r, live, s)
        return s

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        z, r, live, s = ctx.saved_tensors
        k = g + g.T
        # d s_ij / d r_i summed over j gives the norm's part: -z_i r_i^2 sum_j k_ij s_ij (rows above eps).
        norm_part = torch.einsum("ij,ij->i", k, s).mul_(r * r).mul_(live)
        grad = _matmul(ctx, k.mul_(r[:, None]).mul_(r[None, :]), z)
        return grad.addcmul_(z, norm_part[:, None], value=-1)


class CosineColumns(torch.autograd.Function):
    """cos(z_i, z_c) for every row i of z [B, m] and the rows c of `cols` [N]: [B, N]. 6·B·N·m FLOPs
    (one matmul forward, two backward: one for each side)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        ctx.autocast = torch.is_autocast_enabled(z.device.type)
        r, live = _inverse_norms(z)
        zc = z[cols]
        s = _matmul(ctx, z, zc.T).mul_(r[:, None]).mul_(r[cols][None, :])
        ctx.save_for_backward(z, cols, r, live, s)
        return s

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, cols, r, live, s = ctx.saved_tensors
        gs = g * s
        coef = gs.sum(dim=1).index_add_(0, cols, gs.sum(dim=0))  # each row's sum over its cosines, both sides
        coef.mul_(r * r).mul_(live)
        h = g * r[:, None] * r[cols][None, :]
        grad = _matmul(ctx, h, z[cols])
        grad.index_add_(0, cols, _matmul(ctx, h.T, z))
        return grad.addcmul_(z, coef[:, None], value=-1), None


class RowCosine(torch.autograd.Function):
    """cos(a_i, b_i) for the rows of a and b [B, m]: [B]. A few passes over both, no matmul."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ra, live_a = _inverse_norms(a)
        rb, live_b = _inverse_norms(b)
        c = torch.einsum("ij,ij->i", a, b).mul_(ra).mul_(rb)
        ctx.save_for_backward(a, b, ra, rb, live_a, live_b, c)
        return c

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b, ra, rb, live_a, live_b, c = ctx.saved_tensors
        both = (g * ra * rb)[:, None]
        grads = []
        for x, y, rx, live, wanted in ((a, b, ra, live_a, 0), (b, a, rb, live_b, 1)):
            if not ctx.needs_input_grad[wanted]:
                grads.append(None)
                continue
            grads.append((y * both).addcmul_(x, (g * c * rx * rx * live)[:, None], value=-1))
        return grads[0], grads[1]
