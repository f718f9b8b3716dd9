"""SAELens classes for csc's SAEs with the pre-encoder LayerNorm, registered with SAELens on import.

SAELens has no pre-encoder LayerNorm (its `normalize_activations: layer_norm` normalises x before b_dec is
subtracted and rescales the output: another SAE). csc's LayerNorm exports therefore name the architecture
"csc_layernorm_<SAELens architecture>", which plain SAELens refuses to load; after

    import csc.interop.saelens
    sae = sae_lens.SAE.load_from_disk("runs/x/sae")

SAELens computes exactly csc's codes and reconstruction on raw activations: each class here is SAELens's own
class with LN(x - b_dec) (no affine, epsilon cfg.csc_ln_eps) in place of x - b_dec. Needs `sae-lens`
(the `interop` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from csc.sae.export import LAYERNORM_PREFIX
from csc.sae.model import LN_EPS


class _LayerNormInput:
    """Mixin: the encoder reads LN(x - b_dec) instead of x - b_dec."""

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(super().process_sae_in(sae_in), (self.cfg.d_in,), eps=self.cfg.csc_ln_eps)


@dataclass
class LayerNormStandardSAEConfig(StandardSAEConfig):
    csc_ln_eps: float = LN_EPS

    @classmethod
    def architecture(cls) -> str:
        return LAYERNORM_PREFIX + "standard"


class LayerNormStandardSAE(_LayerNormInput, StandardSAE):
    pass


@dataclass
class LayerNormTopKSAEConfig(TopKSAEConfig):
    csc_ln_eps: float = LN_EPS

    @classmethod
    def architecture(cls) -> str:
        return LAYERNORM_PREFIX + "topk"


class LayerNormTopKSAE(_LayerNormInput, TopKSAE):
    pass


@dataclass
class LayerNormJumpReLUSAEConfig(JumpReLUSAEConfig):
    csc_ln_eps: float = LN_EPS

    @classmethod
    def architecture(cls) -> str:
        return LAYERNORM_PREFIX + "jumprelu"


class LayerNormJumpReLUSAE(_LayerNormInput, JumpReLUSAE):
    pass


for _sae, _cfg in ((LayerNormStandardSAE, LayerNormStandardSAEConfig), (LayerNormTopKSAE, LayerNormTopKSAEConfig),
                   (LayerNormJumpReLUSAE, LayerNormJumpReLUSAEConfig)):
    if _cfg.architecture() not in SAE_CLASS_REGISTRY:  # importing twice registers once
        register_sae_class(_cfg.architecture(), _sae, _cfg)
