import os
from pathlib import Path

import pytest
import torch

from csc.config import ActivationsRunSpec, load_spec

# The tests never reach the Hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_spec(cache: Path, *overrides: str) -> ActivationsRunSpec:
    base = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
            "activations.contexts_per_shard=8", "activations.lm_batch_size=4",
            "activations.train_tokens=512", "activations.eval_tokens=256", f"activations.cache_dir={cache}"]
    return load_spec(ActivationsRunSpec, None, [*base, *overrides])


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """One cache folder per test session, so the embedded model is converted from GGUF only once."""
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: a second intra-op thread only adds barrier waits, which cost
    seconds per test when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
