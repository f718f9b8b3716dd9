"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): BatchTopK codes, and every prefix of the
dictionary (its first w latents, for each w in `matryoshka_widths`) trained to reconstruct the input on its own.

Codes are BatchTopK's (csc/sae/archs/batchtopk.py), for the whole dictionary at once; the prefix reconstruction of
width w decodes only the first w of them, x_hat_w = (z[:, :w] @ W_dec[:w] + b_dec), with the LayerNorm's statistics
restored as for the full reconstruction. The loss adds the per-dimension MSE of every inner prefix (widths below
dict_size) to the full one (csc.sae.losses.PrefixReconstruction, weight alpha, SAELens's inner_mse_loss). The
early latents must then carry what they can on their own, so general features are not absorbed into the specific
ones of later groups. Inference is BatchTopK's: SAELens saves `matryoshka_batchtopk` as "jumprelu" too.
"""

from typing import Literal

from pydantic import model_validator

from csc.sae.archs.batchtopk import BatchTopKConfig, BatchTopKSAE

DEFAULT_LEVELS = 5
"""Prefixes of the default widths: dict_size / 16, / 8, / 4, / 2 and the whole dictionary."""


class MatryoshkaConfig(BatchTopKConfig):
    architecture: Literal["matryoshka_batchtopk"] = "matryoshka_batchtopk"
    matryoshka_widths: list[int] | None = None
    """Widths of the nested prefixes, strictly increasing, the last one dict_size (SAELens's matryoshka_widths).
    Default: doubling from dict_size / 16 (2048: 128, 256, 512, 1024, 2048), so that it follows a searched dict_size."""

    @model_validator(mode="after")
    def _widths_nest(self) -> "MatryoshkaConfig":
        w = self.matryoshka_widths
        if w is None:
            return self
        if not w or w[-1] != self.dict_size:
            raise ValueError(f"sae.matryoshka_widths must end at sae.dict_size ({self.dict_size}), got {w}")
        if w[0] < 1 or any(b <= a for a, b in zip(w, w[1:])):
            raise ValueError(f"sae.matryoshka_widths must be positive and strictly increasing, got {w}")
        return self

    def widths(self) -> list[int]:
        """The prefix widths in force (the default's when matryoshka_widths is unset), ending at dict_size."""
        if self.matryoshka_widths is not None:
            return list(self.matryoshka_widths)
        return sorted({self.dict_size >> i for i in range(DEFAULT_LEVELS)} - {0})


class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig

    def prefix_widths(self) -> list[int]:
        return self.cfg.widths()[:-1]
