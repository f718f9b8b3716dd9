"""Export an SAE in SAELens's on-disk format, and read such an export back.

Files (SAELens's names): `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in]; `cfg.json`, a flat dict in SAELens's pre-6.0 layout, which
SAELens 6 still reads (it converts configs without `sae_lens_version`).

cfg.json key          <- csc
  architecture        "standard" for relu, "topk" for topk
  d_in, d_sae         SaeConfig.d_in, SaeConfig.dict_size
  activation_fn_str   "relu" | "topk";  activation_fn_kwargs {"k": k} for topk;  k (topk only)
  apply_b_dec_to_input  true: csc encodes x - b_dec
  normalize_activations "none": csc's dataset scale is not applied by SAELens (see below)
  finetuning_scaling_factor false
  dtype "float32", device "cpu", model_name, hook_name (e.g. "blocks.19.hook_resid_post"),
  hook_layer, hook_head_index null, context_size, prepend_bos, dataset_path,
  dataset_trust_remote_code, sae_lens_training_version null, neuronpedia_id null,
  model_from_pretrained_kwargs {}
csc-only keys (SAELens ignores them):
  csc_norm_scale      the factor csc multiplied raw activations by before the SAE
  csc_norm_scale_folded  whether that factor is folded into the weights (see below)
  csc_layer_norm      SaeConfig.layer_norm

The normalisation scale s: csc trains on s * x_raw. With fold_norm_scale=True the export folds s
into the weights as SAELens's fold_activation_norm_scaling_factor does (W_enc * s, W_dec / s,
b_dec / s), so the exported SAE reads and reconstructs raw activations; W_dec rows then have norm
1/s. Folding is refused when layer_norm is on (LN's epsilon makes it inexact). Without folding,
SAELens users must feed s * x_raw and divide the reconstruction by s.

csc's pre-encoder LayerNorm has no SAELens equivalent (SAELens's "layer_norm" normalisation also
rescales the output), so for layer_norm=True exports SAELens's forward differs from csc's; the
csc_layer_norm flag records it and load_exported reproduces csc's forward exactly.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from csc.errors import CacheError, CscError
from csc.sae.config import SaeConfig
from csc.sae.model import PARAM_NAMES, SparseAutoencoder

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


def export_saelens(sae: SparseAutoencoder, path: str | Path, *, model_name: str, hook_name: str,
                   hook_layer: int, norm_scale: float, context_size: int, prepend_bos: bool = True,
                   dataset_path: str = "", fold_norm_scale: bool = False) -> dict[str, Any]:
    """Write `sae` to `path` for SAELens; returns the cfg.json dict."""
    cfg = sae.cfg
    if fold_norm_scale and cfg.layer_norm:
        raise CscError("cannot fold the normalisation scale into an SAE with layer_norm: "
                       "export with fold_norm_scale=False")
    weights = {n: getattr(sae, n).detach().float().cpu().clone() for n in PARAM_NAMES}
    if fold_norm_scale:
        weights["W_enc"] *= norm_scale
        weights["W_dec"] /= norm_scale
        weights["b_dec"] /= norm_scale
    topk = cfg.architecture == "topk"
    meta: dict[str, Any] = {
        "architecture": "topk" if topk else "standard",
        "d_in": cfg.d_in,
        "d_sae": cfg.dict_size,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "dataset_path": dataset_path,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "csc_norm_scale": norm_scale,
        "csc_norm_scale_folded": fold_norm_scale,
        "csc_layer_norm": cfg.layer_norm,
    }
    if topk:
        meta["k"] = cfg.k
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def load_exported(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an export back into a SparseAutoencoder (weights as stored) and its cfg.json dict."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CFG_FILE).is_file():
        raise CacheError(f"{path} is not an SAELens export (needs {WEIGHTS_FILE} and {CFG_FILE})")
    meta = json.loads((path / CFG_FILE).read_text())
    if meta.get("architecture") not in ("standard", "topk") or "csc_layer_norm" not in meta:
        raise CacheError(f"{path}: cfg.json was not written by csc (architecture "
                         f"{meta.get('architecture')!r}, no csc_layer_norm)")
    topk = meta["architecture"] == "topk"
    cfg = SaeConfig(d_in=meta["d_in"], dict_size=meta["d_sae"],
                    architecture="topk" if topk else "relu", k=meta["k"] if topk else None,
                    layer_norm=meta["csc_layer_norm"])
    tensors: dict[str, torch.Tensor] = load_file(str(path / WEIGHTS_FILE))
    return SparseAutoencoder.from_tensors(cfg, tensors, source=str(path)), meta
