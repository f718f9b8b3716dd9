"""What every SAE architecture shares: its base config, its typed forward output and its weights.

Forward pass of every architecture. Without the LayerNorm (cfg.layer_norm false), n = x; with it, n is x
normalised per token, and the output is put back on x's scale:

    n     = (x - mu) / (sigma + eps)           mu, sigma: mean and standard deviation (unbiased) of x's
                                               features; eps = LN_EPS. SAELens's `layer_norm` normalisation.
    pre   = (n - b_dec) @ W_enc + b_enc
    z     = activate(pre)                      (the architecture's nonlinearity: csc/sae/archs/)
    x_hat = (z @ W_dec + b_dec) * sigma + mu   (without the LayerNorm: z @ W_dec + b_dec)

The LayerNorm is the paper's pre-encoder normalisation (codes do not depend on the token's norm); restoring
sigma and mu on the output lets the reconstruction follow the token's norm, which a decoder of LN'd inputs
cannot (bench/README.md, section 3). It is exactly SAELens's `normalize_activations: layer_norm`, so exports
load there as SAELens's own classes. Subtracting b_dec first (SAELens's apply_b_dec_to_input) lets b_dec,
initialised at the data mean, centre the data. Rows of W_dec have unit norm; ConstrainedAdam keeps them there.

An architecture is a subclass registered in csc/sae/archs/__init__.py: it sets `config_class`, its
`activate`, optionally a sparsity penalty (`sparsity_loss`, weighted by the trainer's beta), extra
weights (`init_extra`), how it starts at a given L0 (`init_sparsity`), a state update after each optimiser
step (`after_step`) and how it maps onto SAELens's inference architectures (`saelens_architecture`,
`saelens_fields`, `saelens_tensors`). Everything else (construction, checkpoints, export and loading)
works on `state_dict()` and needs nothing from the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from csc.errors import CacheError, CscError

LN_EPS = 1e-5


class BaseSaeConfig(BaseModel):
    """Fields every architecture has. Each architecture's config adds its own (csc/sae/archs/)."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    """Which architecture (the discriminator of `SaeConfig`): relu, topk, batchtopk, jumprelu or
    matryoshka_batchtopk."""

    d_in: int | None = Field(default=None, gt=0)
    """Width of the activations the SAE reads. Leave unset in a spec: it is the LM's d_model."""

    dict_size: int = Field(gt=0)
    """Number of latents (dictionary atoms)."""

    layer_norm: bool = True
    """Normalise each token (mean 0, standard deviation 1 over its features) before the encoder, as in the
    paper, and restore its mean and standard deviation on the reconstruction (SAELens's `layer_norm`)."""


@dataclass(frozen=True)
class ForwardOutput:
    """One forward pass: what the loss terms and the metrics read."""

    x: torch.Tensor
    """[B, d_in] the input."""
    pre: torch.Tensor
    """[B, dict_size] pre-activations, (n - b_dec) @ W_enc + b_enc."""
    z: torch.Tensor
    """[B, dict_size] codes, non-negative in every architecture (the metrics count z > 0 as firing)."""
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

    @torch.no_grad()
    def init_sparsity(self, cutoff: float) -> None:
        """Start sparse: `cutoff` is the pre-activation (with b_enc = 0) that the intended share of codes
        exceeds. ReLU shifts b_enc, JumpReLU sets its threshold; TopK-like codes need nothing (k decides)."""

    @torch.no_grad()
    def scale_encoder(self, c: float) -> None:
        """Multiply every code by c > 0 without changing which latents fire: W_enc, b_enc and any threshold
        on the pre-activations scale by c (every activation function here is positively homogeneous)."""
        self.W_enc.mul_(c)
        self.b_enc.mul_(c)

    def sparsity_loss(self, out: ForwardOutput) -> torch.Tensor:
        """The penalty named `sparsity_term`, mean over tokens."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: ForwardOutput) -> None:
        """Update the architecture's state after an optimiser step on the batch of `out` (nothing by default)."""

    def prefix_widths(self) -> list[int]:
        """Widths w < dict_size of the inner prefixes whose own reconstruction, from the first w codes, is trained
        too (Matryoshka: csc.sae.losses.PrefixReconstruction); none by default."""
        return []

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
    def init_from_data(self, sample: torch.Tensor, l0: float | None) -> None:
        """Data-dependent start on a [N, d_in] sample of training activations (the first batch):

        1. b_dec = the mean of the (normalised) sample, so the encoder reads centred data;
        2. with `l0` given, the architecture's sparsity starts at L0 ~ l0 (`init_sparsity` at the
           (1 - l0 / dict_size) quantile of the sample's pre-activations);
        3. every code is scaled by the c that minimises ||(n - b_dec) - c * z @ W_dec||^2 on the sample (when
           c > 0), so the first reconstruction is the least-squares multiple of its own direction.

        With W_enc = W_dec^T and unit decoder rows, pre-activations of normalised tokens are ~N(0, 1): left
        alone, half the dictionary fires at step 0 and the reconstruction overshoots (L0 1024 of 2048, EV -0.73
        on the quickstart's first batch; bench/README.md section 7).
        """
        n = self.normalise(sample.float())[0]
        self.b_dec.copy_(n.mean(dim=0).to(self.b_dec))
        if l0 is not None:
            pre = (n - self.b_dec) @ self.W_enc
            share = min(max(l0 / self.cfg.dict_size, 0.0), 1.0)
            cutoff = torch.quantile(pre.flatten()[:1_000_000].float(), 1 - share).item()
            self.init_sparsity(cutoff)
        u = n - self.b_dec
        r = self.activate(u @ self.W_enc + self.b_enc) @ self.W_dec
        denom = r.pow(2).sum().item()
        if denom > 0:
            c = (u * r).sum().item() / denom
            if c > 0:
                self.scale_encoder(c)

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(n, mu, sigma): the encoder's input and the statistics the decoder restores (None without LN)."""
        if not self.cfg.layer_norm:
            return x, None, None
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        sigma = centred.std(dim=-1, keepdim=True)
        return centred / (sigma + LN_EPS), mu, sigma

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self._encoder(self.normalise(x)[0])

    def _encoder(self, n: torch.Tensor) -> torch.Tensor:
        """(n - b_dec) @ W_enc + b_enc, computed so that its backward pass has no [B, d] input gradient.

        Written plainly, autograd gets b_dec's gradient through the input gradient of the matmul, (g @ W_enc^T)
        summed over tokens: 2·B·d·m FLOPs, a sixth of the plain step's 12·B·d·m. The input n is data (the
        LayerNorm has no weights), so only b_dec needs it, and -(sum_i g_i) @ W_enc^T costs 2·d·m. The value is the
        plain formula's: b_dec - b_dec.detach() is an exact zero, whose product with W_enc carries b_dec's gradient
        (and adds an exact zero to W_enc's). Both biases are one [m] vector added inside the matmul (addmm), so the
        backward reduces the [B, m] gradient once for both (bit-identical to the plain forward on this CPU, tested)."""
        b = self.b_dec.detach()
        bias = self.b_enc - (self.b_dec - b) @ self.W_enc
        return torch.addmm(bias, n - b, self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of codes z; with the LayerNorm it needs the input x whose mean and standard
        deviation it restores."""
        out = z @ self.W_dec + self.b_dec
        if not self.cfg.layer_norm:
            return out
        if x is None:
            raise CscError("decode(z) of an SAE with the LayerNorm needs the input x (its norm is restored)")
        _, mu, sigma = self.normalise(x)
        return out * sigma + mu

    def decode_prefixes(self, z: torch.Tensor, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
        """The reconstructions from the first w codes of z for each w in `widths` (increasing), the LayerNorm's
        statistics of x restored as in `forward`; each is the previous one plus the next group's decoding."""
        _, mu, sigma = self.normalise(x)
        out, start, recons = self.b_dec.to(z.dtype).expand(z.shape[0], -1), 0, []
        for w in widths:
            out = out + z[:, start:w] @ self.W_dec[start:w].to(z.dtype)
            start = w
            recons.append(out if mu is None else out * sigma + mu)
        return recons

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        n, mu, sigma = self.normalise(x)
        pre = self._encoder(n)
        z = self.activate(pre)
        out = z @ self.W_dec + self.b_dec
        x_hat = out if mu is None else out * sigma + mu
        return ForwardOutput(x=x, pre=pre, z=z, x_hat=x_hat)

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
