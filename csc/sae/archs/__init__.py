"""The architecture registry: name -> SparseAutoencoder subclass (with its config class).

Adding an architecture: write its module (a config with `architecture: Literal["name"]`, a subclass of
csc.sae.model.SparseAutoencoder) and add it to ARCHITECTURES below. `SaeConfig` (csc.sae.config), the
checkpoint, the export and the loaders all go through this table.
"""

from __future__ import annotations

from csc.errors import CscError
from csc.sae.archs.batchtopk import BatchTopKSAE
from csc.sae.archs.jumprelu import JumpReluSAE
from csc.sae.archs.matryoshka import MatryoshkaSAE
from csc.sae.archs.relu import ReluSAE
from csc.sae.archs.topk import TopKSAE
from csc.sae.model import BaseSaeConfig, SparseAutoencoder

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.config_class.model_fields["architecture"].default: cls
    for cls in (ReluSAE, TopKSAE, BatchTopKSAE, JumpReluSAE, MatryoshkaSAE)
}


def sae_class(name: str) -> type[SparseAutoencoder]:
    if name not in ARCHITECTURES:
        raise CscError(f"unknown SAE architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_sae(cfg: BaseSaeConfig, *, seed: int = 0, device: str = "cpu") -> SparseAutoencoder:
    """A freshly initialised SAE of cfg's architecture."""
    return sae_class(cfg.architecture)(cfg, seed=seed, device=device)
