"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope's architecture).

z_j = pre_j * H(pre_j - theta_j) with a learned threshold theta_j >= 0 per latent, and an L0 penalty
sum_j H(pre_j - theta_j) (weighted by the trainer's beta). H has no useful gradient, so both use the
straight-through estimator with a rectangle kernel of width `bandwidth` (epsilon):

    d z_j / d theta_j   = -(theta_j / eps) * K((pre_j - theta_j) / eps)
    d H_j / d theta_j   = -(1 / eps) * K((pre_j - theta_j) / eps),     K(u) = 1 for |u| < 1/2, else 0

and the encoder gets gradient only through the codes that fire (d z_j / d pre_j = H_j), as in the paper.
theta is a plain parameter kept >= 0 after every step (Adam moves it additively, as SAELens 6 does, so
a small initial threshold can grow within a short run). SAELens: "jumprelu".
"""

from typing import Literal

import torch
from pydantic import Field

from csc.sae.model import BaseSaeConfig, ForwardOutput, SparseAutoencoder


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype) / eps


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        grad_theta = -(theta * _kernel(pre, theta, ctx.eps) * grad).sum(dim=0)
        return grad * (pre > theta), grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return None, -(_kernel(pre, theta, ctx.eps) * grad).sum(dim=0), None


class JumpReluConfig(BaseSaeConfig):
    architecture: Literal["jumprelu"] = "jumprelu"
    bandwidth: float = Field(default=0.05, gt=0)
    """Width epsilon of the straight-through estimator's rectangle kernel, in pre-activation units."""
    threshold_init: float = Field(default=0.01, ge=0)
    """Every latent's threshold at step 0, unless the trainer starts the SAE at a given L0 (trainer.init_l0),
    which sets the thresholds from the data."""


class JumpReluSAE(SparseAutoencoder):
    config_class = JumpReluConfig
    saelens_architecture = "jumprelu"
    sparsity_term = "l0_penalty"

    def init_extra(self) -> None:
        self.threshold = torch.nn.Parameter(torch.full((self.cfg.dict_size,), self.cfg.threshold_init))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.cfg.bandwidth)

    def sparsity_loss(self, out: ForwardOutput) -> torch.Tensor:
        """L0 = mean over tokens of sum_j H(pre_j - theta_j), with the straight-through gradient on theta."""
        pre = out.pre.float()
        return _Step.apply(pre, self.threshold, self.cfg.bandwidth).sum(dim=-1).mean()

    @torch.no_grad()
    def init_sparsity(self, cutoff: float) -> None:
        self.threshold.fill_(max(cutoff, 0.0))

    @torch.no_grad()
    def scale_encoder(self, c: float) -> None:
        super().scale_encoder(c)
        self.threshold.mul_(c)

    @torch.no_grad()
    def after_step(self, out: ForwardOutput) -> None:
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative codes
