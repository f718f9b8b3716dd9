"""Save and resume a Trainer exactly, without pickle.

A checkpoint is a folder with two files:
- trainer_state.safetensors: model weights (model.*), Adam moments and step counts flattened as
  optim.<param index>.<name>, the dead-latent counters, torch's RNG state(s);
- trainer_state.json: both configs, step, tokens, loss-weighting state, Adam's param-group
  hyperparameters, the last metrics and the sha256 of the tensors file (checked before loading).
Resuming and training on (feeding the stream from `batches_consumed` on) gives the same weights,
bit for bit, as never having stopped.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from csc.errors import CacheError
from csc.sae.config import SaeConfig, TrainerConfig
from csc.sae.model import PARAM_NAMES, SparseAutoencoder
from csc.sae.trainer import Trainer

TENSORS_FILE = "trainer_state.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT = "csc-sae-trainer/1"


def save_checkpoint(trainer: Trainer, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": getattr(trainer.model, n).detach() for n in PARAM_NAMES}
    opt = trainer.optimizer.state_dict()
    state_keys = {}
    for idx, state in opt["state"].items():
        state_keys[str(idx)] = sorted(state)
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
    tensors["dead.tokens_since_fired"] = trainer.dead.tokens_since_fired
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "format": FORMAT,
        "sae_config": trainer.sae_cfg.model_dump(),
        "trainer_config": trainer.cfg.model_dump(),
        "step": trainer.step,
        "batches_consumed": trainer.batches_consumed,
        "tokens": trainer.tokens,
        "weighting": trainer.weighting.state_dict(),
        "optim_param_groups": opt["param_groups"],
        "optim_state_keys": state_keys,
        "last_metrics": trainer.last_metrics,
    }
    # Write both under temporary names first so an interrupted save never leaves a mixed pair.
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(path / (TENSORS_FILE + ".tmp")))
    meta["tensors_sha256"] = _sha256(path / (TENSORS_FILE + ".tmp"))
    (path / (STATE_FILE + ".tmp")).write_text(json.dumps(meta, indent=2))
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
        raise CacheError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if meta.get("tensors_sha256") != _sha256(path / TENSORS_FILE):
        raise CacheError(f"{path / TENSORS_FILE} fails its checksum (corrupt or changed since it was saved); "
                         f"refusing to resume from it")
    tensors = load_file(str(path / TENSORS_FILE))
    try:
        sae_cfg = SaeConfig.model_validate(meta["sae_config"])
        cfg = TrainerConfig.model_validate(meta["trainer_config"])
        if device is not None:
            cfg = cfg.model_copy(update={"device": device})
        model = SparseAutoencoder.from_tensors(
            sae_cfg, {n: tensors[f"model.{n}"] for n in PARAM_NAMES}, source=str(path))
        trainer = Trainer(sae_cfg, cfg, model=model)
        groups = meta["optim_param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        state = {int(idx): {name: tensors[f"optim.{idx}.{name}"] for name in names}
                 for idx, names in meta["optim_state_keys"].items()}
        trainer.optimizer.load_state_dict({"state": state, "param_groups": groups})
        trainer.weighting.load_state_dict(meta["weighting"])
        trainer.dead.tokens_since_fired.copy_(tensors["dead.tokens_since_fired"])
        trainer.step = meta["step"]
        trainer.tokens = meta["tokens"]
        trainer.last_metrics = meta["last_metrics"]
        torch.set_rng_state(tensors["rng.cpu"])
        n_cuda = sum(k.startswith("rng.cuda.") for k in tensors)
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(n_cuda)]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    except KeyError as e:
        raise CacheError(f"{path}: checkpoint lacks {e}") from None
    return trainer
