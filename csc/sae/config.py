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

    lr_decay_steps: int = Field(default=0, ge=0)
    """Steps at the end of training over which the learning rate falls linearly from `lr` to `lr_end` (SAELens's
    lr_decay_steps; Anthropic's April 2024 recipe and dictionary_learning decay over the last 20%). 0: no decay, the
    default: at 1.3M tokens the last fifth's decay changed delta CE by 0.005 ± 0.005 nats (bench/README.md 11b)."""

    lr_end: float = Field(default=0.0, ge=0)
    """Learning rate the decay falls towards, reached as training ends (Anthropic's recipe: 0)."""

    max_grad_norm: float = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value."""

    alpha: float = Field(default=1.0, ge=0)
    """Weight of the reconstruction term (MSE per dimension, csc.sae.losses)."""

    beta: float = Field(default=0.04, ge=0)
    """Weight of the architecture's sparsity penalty (the paper's lambda): the L1 of the codes in units of the
    input's norm for relu, the L0 for jumprelu (csc.sae.losses). With trainer.target_l0 it is the starting
    value. topk, batchtopk and matryoshka_batchtopk get their sparsity from k and have no penalty: beta does not act
    there."""

    target_l0: float | None = Field(default=None, gt=0)
    """Steer beta so that the training L0 settles at this value (csc.sae.weighting.L0Controller): SAEs of a
    sweep are then compared at matched sparsity whatever else they change. relu and jumprelu only (topk, batchtopk
    and matryoshka_batchtopk: set sae.k)."""

    target_l0_rate: float = Field(default=0.02, gt=0)
    """Step of the controller: ln(beta) moves by rate * (ln(L0 + 1) - ln(target_l0 + 1)) per step."""

    init_l0: float | None = Field(default=None, gt=0)
    """L0 the SAE starts at (relu: b_enc, jumprelu: thresholds, set from the first batch; see
    SparseAutoencoder.init_from_data). Default: target_l0 when set, else 64 (at most an eighth of the
    dictionary); the architectures with a k start at k."""

    gamma: float = Field(default=0.1, ge=0)
    """Weight of the InfoNCE term; 0 trains exactly the plain SAE (the term is never computed)."""

    temperature: float = Field(default=1.0, gt=0)
    """InfoNCE temperature tau applied to cosine similarities."""

    hard_negatives: int = Field(default=0, ge=0)
    """Keep only the m most similar other-sequence negatives per anchor; 0 keeps all of them."""

    negatives: int = Field(default=0, ge=0)
    """Compare every anchor with N anchors of the batch drawn at random at each step (the same N for every anchor;
    those of its own sequence are left out), instead of with all B: the similarity costs 6·B·N·m FLOPs instead of
    6·B²·m (forward and backward; m = the latents InfoNCE sees), against about 10·B·d·m for the rest of the step.
    hard_negatives then picks among the N. 0 (default): all of them. Held-out InfoNCE always uses all of them."""

    nce_latents: float = Field(default=1.0, gt=0, le=1)
    """Share of the latents InfoNCE sees: the first round(nce_latents * dict_size); the others learn from
    reconstruction and sparsity only (Temporal SAEs contrast 20% "high-level" latents)."""

    beta_warmup_steps: int | None = Field(default=None, ge=0)
    """Steps over which beta rises linearly from 0 to its value (0: no warm-up). Default: a tenth of `steps`."""

    gamma_warmup_steps: int | None = Field(default=None, ge=0)
    """Steps over which gamma rises linearly from 0 to its value (0: no warm-up). Default: a tenth of `steps`."""

    balance: bool = False
    """Set the InfoNCE weight each step so that InfoNCE's share of the gradient on the anchors'
    pre-activations is `balance_share` (csc.sae.weighting.GradientBalance); gamma is the weight before the
    first measurement."""

    balance_share: float = Field(default=0.25, gt=0, lt=1)
    """Target of ||grad gamma*L_nce|| / (||grad gamma*L_nce|| + ||grad alpha*L_mse||) when `balance` is on."""

    balance_ema: float = Field(default=0.99, ge=0, lt=1)
    """Decay of the moving averages of the two gradient norms."""

    data_init: bool = True
    """At step 0, start from the first batch (SparseAutoencoder.init_from_data): b_dec at its mean, the
    sparsity at init_l0 and the codes at a least-squares scale. False keeps the random start (b_dec = 0)."""

    revival: Literal["none", "auxk"] = "none"
    """Dead-latent revival: "auxk" adds the AuxK loss of Gao et al. (architectures with TopK codes: topk, batchtopk,
    matryoshka_batchtopk; a ReLU or JumpReLU latent that died has no positive pre-activation for it to train)."""

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
        for name in WARMUPS:
            value = getattr(self, name)
            if value is not None and value > self.steps:
                raise ValueError(f"trainer.{name} ({value}) exceeds trainer.steps ({self.steps}): that warm-up "
                                 f"would never finish; shorten it or train longer")
        if self.lr_decay_steps + self.warmup("lr_warmup_steps") > self.steps:
            raise ValueError(f"trainer.lr_decay_steps ({self.lr_decay_steps}) and the learning-rate warm-up "
                             f"({self.warmup('lr_warmup_steps')}) overlap within trainer.steps ({self.steps}): the "
                             f"decay would start before the warm-up ends; shorten one of them")
        return self

    def nce_latent_count(self, dict_size: int) -> int:
        """How many latents (the first ones) InfoNCE sees: round(nce_latents * dict_size), at least 1."""
        return max(1, round(self.nce_latents * dict_size))

    def start_l0(self, dict_size: int) -> float:
        """The L0 a relu or jumprelu SAE starts at (init_l0, else target_l0, else min(64, dict_size / 8))."""
        return self.init_l0 or self.target_l0 or min(64.0, dict_size / 8)

    def warmup(self, name: str) -> int:
        """The warm-up `name` (one of WARMUPS) in force: its value, or a tenth of `steps` when unset."""
        value = getattr(self, name)
        return self.steps // 10 if value is None else value


WARMUPS = ("lr_warmup_steps", "beta_warmup_steps", "gamma_warmup_steps")
