"""The one on-disk format of an SAE: SAELens's layout, read and written by `save_sae` / `load_sae`.

Files (SAELens's names): `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in] and the architecture's tensors (threshold [d_sae] for jumprelu and batchtopk); `cfg.json`, a flat
dict in SAELens's pre-6.0 layout, which SAELens 6 reads (it converts configs without `sae_lens_version`).

An export reads and reconstructs RAW activations of the hooked layer, in SAELens exactly as in csc. csc
trains on s * x_raw (s = the dataset's normalisation scale), so the scale is folded into the weights, as
SAELens's fold_activation_norm_scaling_factor does: W_dec / s, b_dec / s, and W_enc * s without the
pre-encoder LayerNorm. With it, W_enc is left alone (LN is scale-invariant) and LN's epsilon becomes
eps / s^2, which makes LN(x_raw - b_dec / s) equal csc's LN(s * x_raw - b_dec). Pre-activations, and so
thresholds and codes, are unchanged. `load_sae` unfolds, giving csc's SAE on scaled activations (equal to
the trained one up to float rounding).

cfg.json key            <- csc
  architecture          the SAELens inference architecture computing the same codes: "standard" (relu),
                        "topk", "jumprelu" (jumprelu, and batchtopk with every threshold at its global one);
                        with the pre-encoder LayerNorm "csc_layernorm_<that>", which plain SAELens refuses to
                        load (unknown architecture) and `import csc.interop.saelens` registers, so no reader
                        ever computes something else
  d_in, d_sae           SaeConfig.d_in, SaeConfig.dict_size
  activation_fn_str     "relu" | "topk";  k (topk only), and activation_fn_kwargs {"k": k} without LayerNorm
                        (SAELens reads a pre-6.0 config with it as its plain "topk", whatever the architecture)
  apply_b_dec_to_input  true: csc encodes x - b_dec
  normalize_activations "none": the scale is folded in
  csc_ln_eps            the LayerNorm epsilon in raw units (LayerNorm exports only)
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
from csc.sae.model import LN_EPS, SparseAutoencoder

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
LAYERNORM_PREFIX = "csc_layernorm_"


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


def saelens_architecture(sae: SparseAutoencoder) -> str:
    name = type(sae).saelens_architecture
    return LAYERNORM_PREFIX + name if sae.cfg.layer_norm else name


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
        "architecture": saelens_architecture(sae),
        "d_in": cfg.d_in,
        "d_sae": cfg.dict_size,
        "activation_fn_str": "topk" if "k" in fields else "relu",
        # SAELens turns any pre-6.0 config with activation_fn_kwargs.k into its plain "topk": not a LayerNorm one.
        "activation_fn_kwargs": {"k": fields["k"]} if "k" in fields and not cfg.layer_norm else {},
        **fields,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
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
    if cfg.layer_norm:
        meta["csc_ln_eps"] = LN_EPS / s**2
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
    if not cfg.layer_norm:
        tensors["W_enc"] = tensors["W_enc"] / s
    tensors["W_dec"] = tensors["W_dec"] * s
    tensors["b_dec"] = tensors["b_dec"] * s
    sae = cls(cfg, device=device).load_tensors(tensors, str(path))
    return sae.eval(), meta
