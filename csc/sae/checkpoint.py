"""Save and resume a Trainer exactly, without pickle: `Trainer.state_dict()` serialised as two files.

- trainer_state.safetensors: every tensor of the state, named by its path in the nested state
  ("model.W_enc", "optimizer.state.0.exp_avg", "rng.cpu", ...);
- trainer_state.json: the same nesting with each tensor replaced by {"tensor": name}, plus the format and
  the sha256 of the tensors file (checked before loading).
Resuming and training on (feeding the stream from `batches_consumed` on) gives the same weights, bit for
bit, as never having stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from csc.errors import CacheError
from csc.sae.config import TrainerConfig, parse_sae_config
from csc.sae.trainer import Trainer

TENSORS_FILE = "trainer_state.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT = "csc-sae-trainer/2"


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with its tensors moved into `tensors` (keyed by path) and replaced by references."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{path}.{k}" if path else str(k), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_checkpoint(trainer: Trainer, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "state": _split(trainer.state_dict(), "", tensors)}
    # Write both under temporary names first so an interrupted save never leaves a mixed pair.
    save_file(tensors, str(path / (TENSORS_FILE + ".tmp")))
    meta["tensors_sha256"] = _sha256(path / (TENSORS_FILE + ".tmp"))
    (path / (STATE_FILE + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(path / (TENSORS_FILE + ".tmp"), path / TENSORS_FILE)
    os.replace(path / (STATE_FILE + ".tmp"), path / STATE_FILE)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_checkpoint(path: str | Path, device: str | None = None) -> Trainer:
    """Rebuild the Trainer saved at `path` (optionally on another device)."""
    path = Path(path)
    if not (path / TENSORS_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise CacheError(f"{path} is not a trainer checkpoint (needs {TENSORS_FILE} and {STATE_FILE})")
    meta = json.loads((path / STATE_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path}: unknown checkpoint format {meta.get('format')!r} (this csc reads {FORMAT})")
    if meta.get("tensors_sha256") != _sha256(path / TENSORS_FILE):
        raise CacheError(f"{path / TENSORS_FILE} fails its checksum (corrupt or changed since it was saved); "
                         f"refusing to resume from it")
    try:
        state = _join(meta["state"], load_file(str(path / TENSORS_FILE)))
        sae_cfg = parse_sae_config(state["sae_config"])
        cfg = TrainerConfig.model_validate(state["trainer_config"])
        if device is not None:
            cfg = cfg.model_copy(update={"device": device})
        trainer = Trainer(sae_cfg, cfg)
        trainer.load_state_dict(state, source=str(path))
    except KeyError as e:
        raise CacheError(f"{path}: checkpoint lacks {e}") from None
    return trainer
