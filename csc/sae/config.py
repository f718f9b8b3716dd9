"""Typed settings of one SAE and of its training run."""

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter, model_validator

from csc.sae.archs import ARCHITECTURES
from csc.sae.model import BaseSaeConfig


def _known_architecture(value: Any) -> Any:
    name = _architecture_of(value)
    if name is not None and name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return value


def _architecture_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("architecture", "relu")  # a spec without the field means the paper's ReLU SAE
    return getattr(value, "architecture", None)


SaeConfig = Annotated[
    Union[tuple(Annotated[cls.config_class, Tag(name)] for name, cls in ARCHITECTURES.items())],  # noqa: UP007
    Discriminator(_architecture_of),
    BeforeValidator(_known_architecture),
]
"""The config of one SAE: the config class of its `architecture` (relu when unset), csc/sae/archs/."""

_SAE_CONFIG = TypeAdapter(SaeConfig)


def parse_sae_config(data: dict[str, Any]) -> BaseSaeConfig:
    """Validate a dict (e.g. read back from JSON) as the SaeConfig of its architecture."""
    return _SAE_CONFIG.validate_python(data)


class TrainerConfig(BaseModel):
    """Optimisation, loss and bookkeeping settings of one training run."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0)
    """Optimiser steps to take (one batch per step)."""

    batch_size: int = Field(default=1024, gt=0)
    """Anchor tokens per step. The data layer builds batches of this size; the trainer counts the
    tokens of the batches it actually receives."""

    lr: float = Field(default=3e-4, gt=0)
    """Learning rate after warm-up."""

    lr_warmup_start: float = Field(default=1e-4, ge=0)
    """Learning rate at step 0; it moves linearly to `lr` over the warm-up."""

    lr_warmup_steps: int | None = Field(default=None, ge=0)
    """Steps of linear learning-rate warm-up (0: start at `lr`). Default: a tenth of `steps`."""

    max_grad_norm: float = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value."""

    alpha: float = Field(default=1.0, ge=0)
    """Weight of the reconstruction (MSE) term."""

    beta: float = Field(default=0.04, ge=0)
    """Weight of the architecture's sparsity penalty (the paper's lambda): the L1 of the codes for relu, the
    L0 for jumprelu. topk and batchtopk get their sparsity from k and have no penalty: beta does not act there."""

    gamma: float = Field(default=0.1, ge=0)
    """Weight of the InfoNCE term; 0 trains exactly the plain SAE (the term is never computed)."""

    temperature: float = Field(default=1.0, gt=0)
    """InfoNCE temperature tau applied to cosine similarities."""

    hard_negatives: int = Field(default=0, ge=0)
    """Keep only the m most similar other-sequence negatives per anchor; 0 keeps all of them."""

    beta_warmup_steps: int | None = Field(default=None, ge=0)
    """Steps over which beta rises linearly from 0 to its value (0: no warm-up). Default: a tenth of `steps`."""

    gamma_warmup_steps: int | None = Field(default=None, ge=0)
    """Steps over which gamma rises linearly from 0 to its value (0: no warm-up). Default: a tenth of `steps`."""

    balance: bool = False
    """Rebalance gamma so that the InfoNCE gradient on the codes keeps `balance_ratio` times the
    MSE gradient's norm (see csc.sae.weighting)."""

    balance_ratio: float = Field(default=0.1, gt=0)
    """Target of ||grad_z gamma*L_c|| / ||grad_z alpha*L_mse|| when `balance` is on."""

    balance_ema: float = Field(default=0.99, ge=0, lt=1)
    """Decay of the moving averages of the two gradient norms."""

    balance_min: float = Field(default=0.1, gt=0)
    """Lower clamp of the balanced gamma, as a multiple of `gamma`."""

    balance_max: float = Field(default=10.0, gt=0)
    """Upper clamp of the balanced gamma, as a multiple of `gamma`."""

    init_b_dec: bool = True
    """At step 0, set b_dec to the mean of the first batch's anchors."""

    revival: Literal["none", "auxk"] = "none"
    """Dead-latent revival: "auxk" adds the AuxK loss of Gao et al. (topk and batchtopk only)."""

    auxk_k: int = Field(default=256, gt=0)
    """Dead latents used by the AuxK reconstruction of the residual."""

    auxk_coef: float = Field(default=1 / 32, ge=0)
    """Weight of the AuxK loss."""

    dead_window_tokens: int = Field(default=1_000_000, gt=0)
    """A latent is dead once it has not fired on this many consecutive anchor tokens."""

    log_every: int = Field(default=100, gt=0)
    """Report averaged metrics every this many steps (and after the last step)."""

    seed: int = 0
    """Seed of the weight initialisation and of torch's global RNG."""

    autocast: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast where the device supports it (CUDA with bf16); fp32 everywhere else."""

    device: str = "auto"
    """Torch device; "auto" picks cuda when available, else cpu."""

    @model_validator(mode="after")
    def _check_ranges(self) -> "TrainerConfig":
        if self.balance_min > self.balance_max:
            raise ValueError("balance_min must not exceed balance_max")
        for name in WARMUPS:
            value = getattr(self, name)
            if value is not None and value > self.steps:
                raise ValueError(f"trainer.{name} ({value}) exceeds trainer.steps ({self.steps}): that warm-up "
                                 f"would never finish; shorten it or train longer")
        return self

    def warmup(self, name: str) -> int:
        """The warm-up `name` (one of WARMUPS) in force: its value, or a tenth of `steps` when unset."""
        value = getattr(self, name)
        return self.steps // 10 if value is None else value


WARMUPS = ("lr_warmup_steps", "beta_warmup_steps", "gamma_warmup_steps")
