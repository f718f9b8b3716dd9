"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token (ReLU'd), 0 elsewhere.
Sparsity is set by k, so there is no penalty; dead latents can be revived with AuxK (trainer.revival).
SAELens: "topk"."""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from csc.sae.model import BaseSaeConfig, SparseAutoencoder


class KConfig(BaseSaeConfig):
    """The field of the architectures whose sparsity is a number of latents kept."""

    k: int = Field(default=64, gt=0)
    """Latents kept per token (BatchTopK: on average over a training batch)."""

    @model_validator(mode="after")
    def _k_fits(self) -> "KConfig":
        if self.k > self.dict_size:
            raise ValueError(f"k must be in [1, dict_size={self.dict_size}], got {self.k}")
        return self


class TopKConfig(KConfig):
    architecture: Literal["topk"] = "topk"


class TopKSAE(SparseAutoencoder):
    config_class = TopKConfig
    saelens_architecture = "topk"
    supports_auxk = True

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(values))

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
