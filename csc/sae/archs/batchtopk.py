"""BatchTopK SAE (Bussmann et al. 2024).

Training: of the ReLU'd pre-activations of the whole batch, keep the k * B largest (B tokens), so tokens
share a budget of k latents on average. Inference (eval mode) cannot see a batch: a latent fires when its
pre-activation exceeds one global threshold theta, z = pre * (pre > theta), where theta is learned during
training as a moving average (rate `threshold_rate`; the first batch sets it) of the smallest code kept in
each batch. SAELens: "jumprelu" with every latent's threshold at theta.
"""

from typing import Literal

import torch
from pydantic import Field

from csc.sae.archs.topk import KConfig
from csc.sae.model import ForwardOutput, SparseAutoencoder


class BatchTopKConfig(KConfig):
    architecture: Literal["batchtopk"] = "batchtopk"
    threshold_rate: float = Field(default=0.01, gt=0, le=1)
    """Weight of each batch's smallest kept code in the moving average that is the inference threshold."""


class BatchTopKSAE(SparseAutoencoder):
    config_class = BatchTopKConfig
    saelens_architecture = "jumprelu"
    supports_auxk = True

    def init_extra(self) -> None:
        self.register_buffer("threshold", torch.tensor(0.0))
        # Whether theta has seen a batch (then it is an average, not its placeholder 0).
        self.register_buffer("threshold_seen", torch.tensor(False))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pre * (pre > self.threshold)
        acts = pre.relu().flatten()
        kept = acts.topk(min(self.cfg.k * pre.shape[0], acts.numel()), sorted=False)
        return torch.zeros_like(acts).scatter(-1, kept.indices, kept.values).reshape(pre.shape)

    @torch.no_grad()
    def init_sparsity(self, cutoff: float) -> None:
        # Only inference reads theta before training's first batch replaces it (threshold_seen stays False).
        self.threshold.fill_(max(cutoff, 0.0))

    @torch.no_grad()
    def scale_encoder(self, c: float) -> None:
        super().scale_encoder(c)
        self.threshold.mul_(c)

    @torch.no_grad()
    def after_step(self, out: ForwardOutput) -> None:
        z = out.z.detach().float()
        positive = z[z > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min()
        r = self.cfg.threshold_rate
        new = torch.where(self.threshold_seen, (1 - r) * self.threshold + r * smallest, smallest)
        self.threshold.copy_(new)
        self.threshold_seen.fill_(True)

    def saelens_tensors(self, tensors):
        tensors = dict(tensors)
        theta = tensors.pop("threshold")
        tensors.pop("threshold_seen")
        tensors["threshold"] = torch.full((self.cfg.dict_size,), float(theta))
        return tensors

    @classmethod
    def from_saelens(cls, tensors):
        tensors = dict(tensors)
        tensors["threshold"] = tensors.pop("threshold")[0].clone()
        tensors["threshold_seen"] = torch.tensor(True)
        return tensors
