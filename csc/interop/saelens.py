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
from sae_lens.registry import SAE_CLASS_REGISTRY, get_sae_class, register_sae_class

from csc.sae.archs import ARCHITECTURES
from csc.sae.export import LAYERNORM_PREFIX
from csc.sae.model import LN_EPS


class _LayerNormInput:
    """Mixin: the encoder reads LN(x - b_dec) instead of x - b_dec."""

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(super().process_sae_in(sae_in), (self.cfg.d_in,), eps=self.cfg.csc_ln_eps)


def register(saelens_architecture: str) -> str:
    """Register the LayerNorm variant of one SAELens architecture (once); returns its name."""
    name = LAYERNORM_PREFIX + saelens_architecture
    if name in SAE_CLASS_REGISTRY:
        return name
    sae_cls, cfg_cls = get_sae_class(saelens_architecture)
    cfg = dataclass(type(f"LayerNorm{cfg_cls.__name__}", (cfg_cls,), {
        "__annotations__": {"csc_ln_eps": float}, "csc_ln_eps": LN_EPS,
        "architecture": classmethod(lambda cls: name)}))
    register_sae_class(name, type(f"LayerNorm{sae_cls.__name__}", (_LayerNormInput, sae_cls), {}), cfg)
    return name


REGISTERED = tuple(register(a) for a in dict.fromkeys(cls.saelens_architecture for cls in ARCHITECTURES.values()))
"""The SAELens architectures this module adds: one per SAELens architecture csc's architectures map onto."""
