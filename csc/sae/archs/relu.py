"""ReLU SAE (the paper's): z = ReLU(pre), sparsity from an L1 penalty on the codes. SAELens: "standard"."""

from typing import Literal

import torch
import torch.nn.functional as F

from csc.sae import metrics
from csc.sae.model import BaseSaeConfig, ForwardOutput, SparseAutoencoder


class ReluConfig(BaseSaeConfig):
    architecture: Literal["relu"] = "relu"


class ReluSAE(SparseAutoencoder):
    config_class = ReluConfig
    saelens_architecture = "standard"
    sparsity_term = "l1"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    def sparsity_loss(self, out: ForwardOutput) -> torch.Tensor:
        return metrics.l1(out.z.float())
