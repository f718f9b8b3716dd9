"""Content-addressed disk cache of activation shards (safetensors, checksummed).

Layout under `<cache_root>/activations/<key>/`:
    key.json                what the key was made of (model, layer, corpus, split, context length...)
    manifest.json           facts of the data set: normalisation scale, d_model
    shard_00000.safetensors acts [n, T, d]; partner_<rule> [n, T] int32 for every pairing rule
                            (similar_attention, attended, previous, random; -1 at positions 0 and 1);
                            tokens [n, T] int32; seq_id [n] int64
    shard_00000.sha256      sha256 of the shard file, written after it

The pairing rule a run trains with is not part of the key: every shard holds all rules' partners, so
runs and sweep trials with different rules share one folder. FORMAT_VERSION is part of every key and
changes with the shard layout (2: one partner tensor per rule, where 1 had a single `partner`), so a
cache of another layout is never found, let alone misread; it is rebuilt under the new key.

Every file is written to a temporary name and renamed into place, so an interrupted run leaves no
half-written file under a real name. A shard whose bytes do not match its checksum (or that has no
checksum) is reported as missing, so the caller regenerates it; it is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 2
"""Layout version of the shards, part of every cache key (see the module docstring)."""


def cache_key(fields: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardCache:
    """One folder of shards for one cache key."""

    def __init__(self, root: Path, fields: dict[str, Any]):
        self.fields = fields
        self.key = cache_key(fields)
        self.dir = root / "activations" / self.key
        self.rejected: list[int] = []
        """Shards found corrupt (checksum mismatch or unreadable) since this object was made."""

    def _shard_path(self, i: int) -> Path:
        return self.dir / f"shard_{i:05d}.safetensors"

    def _sum_path(self, i: int) -> Path:
        return self.dir / f"shard_{i:05d}.sha256"

    def has(self, i: int) -> bool:
        """Whether shard i and its checksum are on disk (not verified: `load` does that)."""
        return self._shard_path(i).is_file() and self._sum_path(i).is_file()

    def load(self, i: int) -> dict[str, torch.Tensor] | None:
        """The shard's tensors, or None when it is absent or fails its checksum."""
        path, sum_path = self._shard_path(i), self._sum_path(i)
        if not path.is_file():
            return None
        data = path.read_bytes()
        expected = sum_path.read_text().strip() if sum_path.is_file() else None
        if expected != hashlib.sha256(data).hexdigest():
            self.rejected.append(i)
            return None
        try:
            return st_load(data)
        except Exception:  # checksum matched but the writer stored garbage: still never use it
            self.rejected.append(i)
            return None

    def store(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        if not self.dir.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / "key.json", json.dumps(self.fields, indent=1, sort_keys=True).encode())
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        # Remove the old checksum first: a crash between the two writes then leaves a shard with no
        # checksum (regenerated next time), never a new shard beside an old checksum.
        self._sum_path(i).unlink(missing_ok=True)
        atomic_write(self._shard_path(i), data)
        atomic_write(self._sum_path(i), hashlib.sha256(data).hexdigest().encode())

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError):
            return None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
