"""What every SAE architecture shares: its base config, its typed forward output and its weights.

Forward pass of every architecture, with u = x - b_dec:

    pre   = LN(u) @ W_enc + b_enc          (LN only when cfg.layer_norm; plain u otherwise)
    z     = activate(pre)                  (the architecture's nonlinearity: csc/sae/archs/)
    x_hat = z @ W_dec + b_dec

LN is a LayerNorm with no affine parameters, (u - mean(u)) / sqrt(var(u) + 1e-5) over the d_in
features: the affine scale and shift would be redundant with W_enc and b_enc. Subtracting b_dec
first (SAELens's apply_b_dec_to_input) lets b_dec, initialised at the data mean, centre the data.
Rows of W_dec have unit norm; ConstrainedAdam keeps them there.

An architecture is a subclass registered in csc/sae/archs/__init__.py: it sets `config_class`, its
`activate`, optionally a sparsity penalty (`sparsity_loss`, weighted by the trainer's beta), extra
weights (`init_extra`), a state update after each optimiser step (`after_step`) and how it maps onto
SAELens's inference architectures (`saelens_architecture`, `saelens_fields`, `saelens_tensors`).
Everything else (construction, checkpoints, export, loading) works on `state_dict()` and needs nothing
from the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from csc.errors import CacheError, CscError

LN_EPS = 1e-5


class BaseSaeConfig(BaseModel):
    """Fields every architecture has. Each architecture's config adds its own (csc/sae/archs/)."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    """Which architecture (the discriminator of `SaeConfig`): relu, topk, batchtopk or jumprelu."""

    d_in: int | None = Field(default=None, gt=0)
    """Width of the activations the SAE reads. Leave unset in a spec: it is the LM's d_model."""

    dict_size: int = Field(gt=0)
    """Number of latents (dictionary atoms)."""

    layer_norm: bool = True
    """Apply a LayerNorm without affine parameters to the encoder input, as in the paper."""


@dataclass(frozen=True)
class ForwardOutput:
    """One forward pass: what the loss terms and the metrics read."""

    x: torch.Tensor
    """[B, d_in] the input."""
    pre: torch.Tensor
    """[B, dict_size] pre-activations, LN(x - b_dec) @ W_enc + b_enc."""
    z: torch.Tensor
    """[B, dict_size] codes."""
    x_hat: torch.Tensor
    """[B, d_in] reconstruction."""


class SparseAutoencoder(nn.Module):
    """Base of every architecture; build one with `csc.sae.archs.build_sae(cfg)`."""

    config_class: ClassVar[type[BaseSaeConfig]]
    saelens_architecture: ClassVar[str]
    """The SAELens inference architecture that computes the same codes ("standard", "topk", "jumprelu")."""
    sparsity_term: ClassVar[str | None] = None
    """Metric name of the sparsity penalty `sparsity_loss` returns (weighted by the trainer's beta); None when
    the architecture gets its sparsity otherwise (TopK's k)."""
    supports_auxk: ClassVar[bool] = False
    """Whether dead latents keep positive pre-activations that AuxK can train (TopK-like codes)."""

    def __init__(self, cfg: BaseSaeConfig, *, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        if cfg.d_in is None:
            raise CscError("SaeConfig.d_in is unset: set it to the d_model of the activations")
        self.cfg = cfg
        # A private generator: building a model must not move torch's global RNG.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w_dec = torch.randn(cfg.dict_size, cfg.d_in, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.dict_size))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.init_extra()
        self.to(device)
        self.check_not_degenerate()

    # ------------------------------------------------------------------ what an architecture defines

    def init_extra(self) -> None:
        """Register the architecture's own parameters or buffers (none by default)."""

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sparsity_loss(self, out: ForwardOutput) -> torch.Tensor:
        """The penalty named `sparsity_term`, mean over tokens."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: ForwardOutput) -> None:
        """Update the architecture's state after an optimiser step on the batch of `out` (nothing by default)."""

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific cfg.json fields of the SAELens export."""
        return {}

    def saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The export's tensors from this SAE's state_dict (the default: the same names)."""
        return tensors

    @classmethod
    def from_saelens(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of saelens_tensors: the state_dict tensors of an export's tensors."""
        return tensors

    # ------------------------------------------------------------------ shared

    def check_not_degenerate(self) -> None:
        """Refuse weights that cannot be a trained or trainable SAE (all zero, NaN or inf)."""
        for name, t in self.state_dict().items():
            if not torch.isfinite(t).all():
                raise CscError(f"SAE tensor {name} contains NaN or inf")
        for name in ("W_enc", "W_dec"):
            if not getattr(self, name).any():
                raise CscError(
                    f"SAE parameter {name} is all zero: every code and reconstruction would be "
                    "constant, so no metric of this SAE means anything"
                )

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """Set b_dec to the mean of a [N, d_in] sample of training activations."""
        self.b_dec.copy_(sample.float().mean(dim=0).to(self.b_dec))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        u = x - self.b_dec
        if self.cfg.layer_norm:
            u = F.layer_norm(u, (self.cfg.d_in,), eps=LN_EPS)
        return u @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        pre = self.pre_activations(x)
        z = self.activate(pre)
        return ForwardOutput(x=x, pre=pre, z=z, x_hat=self.decode(z))

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> "SparseAutoencoder":
        """Copy exactly these tensors (names and shapes of `state_dict()`) into the SAE; returns it."""
        own = self.state_dict()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise CacheError(f"{source}: SAE tensors do not match architecture {self.cfg.architecture!r}"
                             + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        for name, t in own.items():
            if tuple(tensors[name].shape) != tuple(t.shape):
                raise CacheError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"config implies {tuple(t.shape)}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(tensors[name].to(t))
        self.check_not_degenerate()
        return self
