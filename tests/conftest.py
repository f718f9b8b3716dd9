import os
from pathlib import Path

import pytest
import torch

from csc.config import ActivationsRunSpec
from csc.spec_loader import load_spec
from csc.sae.archs import sae_class
from csc.sae.config import parse_sae_config
from csc.sae.model import BaseSaeConfig
from csc.sae.trainer import Hook, Trainer


@pytest.fixture(autouse=True)
def autograd_left_on():
    """A test that switches autograd off for the whole process (torch.set_grad_enabled(False), e.g. a bench's main()
    run in-process) would break every later test that trains: it fails itself instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd switched off for the process (use torch.no_grad() as a context)")


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


class Recorder(Hook):
    """A Trainer.fit hook that keeps every step's metrics and every report."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.reports: list[dict[str, float]] = []

    def on_step(self, trainer, metrics):
        self.steps.append(metrics)

    def on_report(self, trainer, report):
        self.reports.append(report)


def fit(trainer: Trainer, batches) -> Recorder:
    """Run trainer.fit(batches) with a Recorder; return the Recorder."""
    rec = Recorder()
    trainer.fit(batches, hooks=[rec])
    return rec


def without_clock(reports: list[dict[str, float]]) -> list[dict[str, float]]:
    """Reports without tokens_per_s (wall-clock), for comparing runs."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in reports]


def sae_config(arch: str, d_in: int, dict_size: int, k: int = 4, **fields) -> BaseSaeConfig:
    """A validated config of architecture `arch`, with `k` where the architecture has one."""
    extra = {"k": k} if "k" in sae_class(arch).config_class.model_fields else {}
    return parse_sae_config({"architecture": arch, "d_in": d_in, "dict_size": dict_size, **extra, **fields})
