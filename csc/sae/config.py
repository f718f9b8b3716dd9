"""Typed settings of one SAE and of its training run."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SaeConfig(BaseModel):
    """Architecture of a sparse autoencoder."""

    model_config = ConfigDict(extra="forbid")

    d_in: int | None = Field(default=None, gt=0)
    """Width of the activations the SAE reads. Leave unset in a spec: it is the LM's d_model."""

    dict_size: int = Field(gt=0)
    """Number of latents (dictionary atoms)."""

    architecture: Literal["relu", "topk"] = "relu"
    """Code nonlinearity: "relu" (sparsity from the L1 penalty) or "topk" (keep the k largest)."""

    k: int | None = None
    """Latents kept per token; required for "topk", must be unset for "relu"."""

    layer_norm: bool = True
    """Apply a LayerNorm without affine parameters to the encoder input, as in the paper."""

    @model_validator(mode="after")
    def _check_k(self) -> "SaeConfig":
        if self.architecture == "topk":
            if self.k is None:
                raise ValueError("architecture 'topk' needs k")
            if not 1 <= self.k <= self.dict_size:
                raise ValueError(f"k must be in [1, dict_size={self.dict_size}], got {self.k}")
        elif self.k is not None:
            raise ValueError("k is only used by architecture 'topk'; leave it unset for 'relu'")
        return self


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

    lr_warmup_steps: int = Field(default=1000, ge=0)
    """Steps of linear learning-rate warm-up (0: start at `lr`)."""

    max_grad_norm: float = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value."""

    alpha: float = Field(default=1.0, ge=0)
    """Weight of the reconstruction (MSE) term."""

    beta: float = Field(default=0.04, ge=0)
    """Weight of the L1 sparsity term (the paper's lambda)."""

    gamma: float = Field(default=0.1, ge=0)
    """Weight of the InfoNCE term; 0 trains exactly the plain SAE (the term is never computed)."""

    temperature: float = Field(default=1.0, gt=0)
    """InfoNCE temperature tau applied to cosine similarities."""

    hard_negatives: int = Field(default=0, ge=0)
    """Keep only the m most similar other-sequence negatives per anchor; 0 keeps all of them."""

    beta_warmup_steps: int = Field(default=1000, ge=0)
    """Steps over which beta rises linearly from 0 to its value (0: no warm-up)."""

    gamma_warmup_steps: int = Field(default=1000, ge=0)
    """Steps over which gamma rises linearly from 0 to its value (0: no warm-up)."""

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
    """Dead-latent revival: "auxk" adds the AuxK loss of Gao et al. (topk architecture only)."""

    auxk_k: int = Field(default=256, gt=0)
    """Dead latents used by the AuxK reconstruction of the residual."""

    auxk_coef: float = Field(default=1 / 32, ge=0)
    """Weight of the AuxK loss."""

    dead_window_tokens: int = Field(default=1_000_000, gt=0)
    """A latent is dead once it has not fired on this many consecutive anchor tokens."""

    log_every: int = Field(default=100, gt=0)
    """Call the metrics callback every this many steps (and after the last step)."""

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
        return self
