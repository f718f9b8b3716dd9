"""SAEs that SAELens itself wrote (its `save_model`, or anything else writing its folder layout): the hook point they
read and the csc SAE that computes the same codes, so that `csc eval` measures them exactly as it measures its own.

cfg.json comes in SAELens 6's layout (the hook point under `metadata`) or the older flat one; the weights act on RAW
activations of the hook. csc's SAEs act on s * x_raw (s: the activation cache's normalisation scale), so
`load_saelens_sae` unfolds s as `load_sae` does for csc's own exports: W_enc / s, W_dec * s, b_dec * s, and nothing
with the LayerNorm (it removes the scale on the way in and restores it on the way out).

SAELens                                        csc
"standard" (ReLU)                              relu
"topk" with k (older files: "standard" with    topk
  activation_fn_str "topk")
"jumprelu" (threshold, or log_threshold)       jumprelu, threshold clamped at 0 (SAELens applies a ReLU as well, so
                                               a negative threshold acts as 0)
apply_b_dec_to_input false                     b_enc + b_dec @ W_enc (csc always encodes x - b_dec)
normalize_activations "none" | "layer_norm"    layer_norm false | true
hook blocks.N.hook_resid_post                  layer N; blocks.N.hook_resid_pre is layer N - 1 (the same stream)

Anything else (gated SAEs, transcoders, attention or MLP hooks, a per-head hook, other normalisations, TopK's
rescale_acts_by_decoder_norm) is refused by name: an SAE csc would load but compute differently is worse than none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from csc.errors import CacheError
from csc.sae.archs import sae_class
from csc.sae.config import parse_sae_config
from csc.sae.export import CFG_FILE, WEIGHTS_FILE, unfold_norm_scale
from csc.sae.model import SparseAutoencoder

_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(post|pre)")


@dataclass(frozen=True)
class SaelensFolder:
    """What csc reads from a SAELens cfg.json."""

    path: Path
    model_name: str | None
    """SAELens's model_name (a TransformerLens name, which is not always a Hugging Face id)."""
    hook_name: str | None
    layer: int | None
    """csc's activations.layer of the hook: the residual stream after block `layer`; None when the hook is unknown."""
    sae_config: dict[str, Any]
    """csc's SaeConfig of the same codes."""
    b_dec_in_encoder: bool
    """SAELens's apply_b_dec_to_input."""


def read_saelens_folder(path: str | Path) -> SaelensFolder:
    """Read and check a SAELens folder's cfg.json; errors name the file and the field."""
    path = Path(path)
    where = path / CFG_FILE
    if not (path / WEIGHTS_FILE).is_file() or not where.is_file():
        raise CacheError(f"{path} is not an SAE folder (needs {WEIGHTS_FILE} and {CFG_FILE})")
    try:
        cfg = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{where}: not valid JSON ({e})") from None
    meta = cfg.get("metadata") or {}

    def get(key: str) -> Any:  # SAELens 6 nests the hook point under metadata, older files do not
        return meta.get(key, cfg.get(key))

    def refuse(field: str, why: str) -> CacheError:
        return CacheError(f"{where}: {field} {cfg.get(field, get(field))!r}: {why}")

    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    if arch not in ("standard", "topk", "jumprelu"):
        raise refuse("architecture", "csc measures SAELens's standard, topk and jumprelu SAEs only")
    if cfg.get("activation_fn_str", "relu") not in ("relu", "topk"):
        raise refuse("activation_fn_str", "csc's SAEs use ReLU codes")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise refuse("normalize_activations", "csc reads raw activations ('none') or normalises each token "
                                              "('layer_norm'); fold other scalings into the weights first "
                                              "(SAELens: fold_activation_norm_scaling_factor)")
    if cfg.get("reshape_activations", "none") != "none":
        raise refuse("reshape_activations", "csc reads the residual stream as it is ('none')")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise refuse("rescale_acts_by_decoder_norm", "csc's TopK ranks the pre-activations themselves")
    if cfg.get("finetuning_scaling_factor"):
        raise refuse("finetuning_scaling_factor", "csc has no fine-tuning scale")
    if get("hook_head_index") is not None:
        raise refuse("hook_head_index", "csc reads the whole residual stream, not one head")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise refuse("d_in", "d_in and d_sae must be integers") from None
    fields: dict[str, Any] = {"architecture": {"standard": "relu"}.get(arch, arch), "d_in": d_in, "dict_size": d_sae,
                              "layer_norm": norm == "layer_norm"}
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise refuse("k", "a TopK SAE needs k")
        fields["k"] = k
    try:
        parse_sae_config(fields)
    except ValueError as e:
        raise CacheError(f"{where}: describes no SAE csc can build: {e}") from None
    hook = get("hook_name")
    m = _HOOK.fullmatch(hook) if isinstance(hook, str) else None
    layer = None if m is None else int(m[1]) - (m[2] == "pre")
    return SaelensFolder(path, get("model_name"), hook, layer if layer is None or layer >= 0 else None, fields,
                         bool(cfg.get("apply_b_dec_to_input", True)))


def load_saelens_sae(folder: SaelensFolder, norm_scale: float, device: str = "cpu") -> SparseAutoencoder:
    """The csc SAE computing the folder's codes and reconstructions on activations scaled by `norm_scale`."""
    cfg = parse_sae_config(folder.sae_config)
    raw = load_file(str(folder.path / WEIGHTS_FILE))
    t = {k: v.float() for k, v in raw.items()}
    if "log_threshold" in t and "threshold" not in t:
        t["threshold"] = t.pop("log_threshold").exp()
    if "threshold" in t:
        t["threshold"] = t["threshold"].clamp(min=0)
    for name in ("W_enc", "W_dec", "b_dec", "b_enc"):
        if name not in t:
            raise CacheError(f"{folder.path / WEIGHTS_FILE}: no {name} tensor")
    if not folder.b_dec_in_encoder:
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if not cfg.layer_norm:
        t = unfold_norm_scale(t, norm_scale)
    sae = sae_class(cfg.architecture)(cfg, device=device)
    return sae.load_tensors(sae_class(cfg.architecture).from_saelens(t), str(folder.path / WEIGHTS_FILE)).eval()
