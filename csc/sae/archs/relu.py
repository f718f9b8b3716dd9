"""ReLU SAE (the paper's): z = ReLU(pre), sparsity from an L1 penalty on the codes. SAELens: "standard"."""

from typing import Literal

import torch
import torch.nn.functional as F

from csc.sae.model import BaseSaeConfig, ForwardOutput, SparseAutoencoder


class ReluConfig(BaseSaeConfig):
    architecture: Literal["relu"] = "relu"


class ReluSAE(SparseAutoencoder):
    config_class = ReluConfig
    saelens_architecture = "standard"
    sparsity_term = "l1"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    @torch.no_grad()
    def init_sparsity(self, cutoff: float) -> None:
        self.b_enc.fill_(-cutoff)

    def sparsity_loss(self, out: ForwardOutput) -> torch.Tensor:
        """L1 of the codes in units of the input's norm: mean_i sum_j |z_ij| / sqrt(d_in) (see csc.sae.losses), as
        the plain sum, since ReLU codes are non-negative: abs and its backward would cost two [B, m] passes."""
        return out.z.float().sum(dim=-1).mean() / self.cfg.d_in ** 0.5
