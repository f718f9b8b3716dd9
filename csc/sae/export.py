"""The one on-disk format of an SAE: SAELens's layout, read and written by `save_sae` / `load_sae`.

Files (SAELens's names): `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in] and the architecture's tensors (threshold [d_sae] for jumprelu, batchtopk and
matryoshka_batchtopk); `cfg.json`, a flat
dict in SAELens's pre-6.0 layout, which SAELens 6 reads (it converts configs without `sae_lens_version`).

An export reads and reconstructs RAW activations of the hooked layer, in SAELens exactly as in csc. csc
trains on s * x_raw (s = the dataset's normalisation scale). Without the LayerNorm the scale is folded into
the weights, as SAELens's fold_activation_norm_scaling_factor does: W_enc * s, W_dec / s, b_dec / s. With it
nothing is folded: the LayerNorm (SAELens's `normalize_activations: layer_norm`, the same formula) removes the
scale on the way in and restores the token's own on the way out; only its epsilon, 1e-5 in both, then sits
on raw rather than scaled units (a relative change of ~1e-5 / sigma). Pre-activations, and so thresholds and
codes, are unchanged. `load_sae` unfolds, giving csc's SAE on scaled activations (equal to the trained one up
to float rounding).

cfg.json key            <- csc
  architecture          the SAELens inference architecture computing the same codes: "standard" (relu),
                        "topk", "jumprelu" (jumprelu, and batchtopk and matryoshka_batchtopk with every
                        threshold at its global one, as SAELens saves its matryoshka_batchtopk)
  d_in, d_sae           SaeConfig.d_in, SaeConfig.dict_size
  activation_fn_str     "relu" | "topk";  k and activation_fn_kwargs {"k": k} (topk only)
  apply_b_dec_to_input  true: csc encodes n - b_dec
  normalize_activations "layer_norm" with the pre-encoder LayerNorm, else "none" (the scale is folded in)
  dtype "float32", device "cpu", model_name, hook_name (e.g. "blocks.19.hook_resid_post"), hook_layer,
  hook_head_index null, context_size, prepend_bos, dataset_path, dataset_trust_remote_code,
  finetuning_scaling_factor false, sae_lens_training_version null, neuronpedia_id null,
  model_from_pretrained_kwargs {}
csc-only keys (SAELens ignores them):
  csc_sae_config        the csc SaeConfig (architecture and its fields), what `load_sae` rebuilds
  csc_norm_scale        s, the factor csc multiplied raw activations by
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from csc.errors import CacheError
from csc.sae.archs import sae_class
from csc.sae.config import parse_sae_config
from csc.sae.model import SparseAutoencoder

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


@dataclass(frozen=True)
class HookInfo:
    """Where an SAE reads: SAELens's metadata of the hook point, and csc's normalisation scale."""

    model_name: str
    hook_layer: int
    norm_scale: float
    context_size: int
    dataset_path: str = ""
    prepend_bos: bool = True

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.hook_layer}.hook_resid_post"


def unfold_norm_scale(tensors: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """Weights that read raw activations (an export without the LayerNorm) -> weights that read s * x_raw."""
    return {**tensors, "W_enc": tensors["W_enc"] / s, "W_dec": tensors["W_dec"] * s, "b_dec": tensors["b_dec"] * s}


def save_sae(sae: SparseAutoencoder, path: str | Path, hook: HookInfo) -> dict[str, Any]:
    """Write `sae` (trained on activations scaled by hook.norm_scale) to `path`; returns the cfg.json dict.
    Files are written under temporary names and renamed, so a reader never sees half an export."""
    cfg, s = sae.cfg, hook.norm_scale
    weights = sae.saelens_tensors({k: v.detach().float().cpu().clone() for k, v in sae.state_dict().items()})
    if not cfg.layer_norm:
        weights["W_enc"] *= s
        weights["W_dec"] /= s
        weights["b_dec"] /= s
    fields = sae.saelens_fields()
    meta: dict[str, Any] = {
        "architecture": type(sae).saelens_architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.dict_size,
        "activation_fn_str": "topk" if "k" in fields else "relu",
        "activation_fn_kwargs": {"k": fields["k"]} if "k" in fields else {},
        **fields,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "layer_norm" if cfg.layer_norm else "none",
        "dtype": "float32",
        "device": "cpu",
        "model_name": hook.model_name,
        "hook_name": hook.hook_name,
        "hook_layer": hook.hook_layer,
        "hook_head_index": None,
        "context_size": hook.context_size,
        "prepend_bos": hook.prepend_bos,
        "dataset_path": hook.dataset_path,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "csc_sae_config": cfg.model_dump(),
        "csc_norm_scale": s,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / (WEIGHTS_FILE + ".tmp")))
    (path / (CFG_FILE + ".tmp")).write_text(json.dumps(meta, indent=2))
    os.replace(path / (WEIGHTS_FILE + ".tmp"), path / WEIGHTS_FILE)
    os.replace(path / (CFG_FILE + ".tmp"), path / CFG_FILE)
    return meta


def load_sae(path: str | Path, device: str = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an export back: csc's SAE on scaled activations (the scale unfolded) and the cfg.json dict."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CFG_FILE).is_file():
        raise CacheError(f"{path} is not an exported SAE (needs {WEIGHTS_FILE} and {CFG_FILE})")
    try:
        meta = json.loads((path / CFG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path / CFG_FILE}: not valid JSON ({e})") from None
    if "csc_sae_config" not in meta or "csc_norm_scale" not in meta:
        raise CacheError(f"{path / CFG_FILE} was not written by csc (architecture {meta.get('architecture')!r}, "
                         f"no csc_sae_config): csc reads only its own exports")
    try:
        cfg = parse_sae_config(meta["csc_sae_config"])
    except ValueError as e:
        raise CacheError(f"{path / CFG_FILE}: csc_sae_config is invalid: {e}") from None
    s = float(meta["csc_norm_scale"])
    cls = sae_class(cfg.architecture)
    tensors = dict(cls.from_saelens(load_file(str(path / WEIGHTS_FILE))))
    if meta.get("normalize_activations") != ("layer_norm" if cfg.layer_norm else "none"):
        raise CacheError(f"{path / CFG_FILE}: normalize_activations {meta.get('normalize_activations')!r} does not "
                         f"match the SAE's layer_norm {cfg.layer_norm} (an export of an older csc: retrain it)")
    if not cfg.layer_norm:
        tensors = unfold_norm_scale(tensors, s)
    sae = cls(cfg, device=device).load_tensors(tensors, str(path))
    return sae.eval(), meta
