"""A sweep searches `sae.architecture` as a choice: each trial trains, evaluates and exports its own architecture,
and the architecture-specific fields (k) reach exactly the trials whose architecture has them."""

import json
import math

import pytest
import ray
import yaml

from csc.spec_loader import load_spec
from csc.errors import SpecError
from csc.sae.archs import ARCHITECTURES
from csc.sweep.run import run_sweep
from csc.sweep.spec import SweepSpec

SEARCH = {"sae.architecture": {"type": "choice", "values": list(ARCHITECTURES)},
          "sae.k": {"type": "choice", "values": [8, 16]}}


def spec_data(cache, **sweep) -> dict:
    return {
        "model": {"name": "tiny-gemma2"},
        "activations": {"layer": 2, "context_length": 32, "contexts_per_shard": 8, "lm_batch_size": 4,
                        "train_tokens": 1024, "eval_tokens": 512, "cache_dir": str(cache)},
        "sae": {"dict_size": 128},
        "trainer": {"steps": 20, "batch_size": 64, "log_every": 5, "gamma": 0.1},
        # Sparse probing reads 2 held-out shards beyond the evaluation's (31 at the default 128 examples).
        "eval": {"ce_contexts": 2, "probe_examples_per_class": 16},
        "checkpoint_every": 10,
        "sweep": {"num_samples": 4, "max_concurrent": 2, "search": SEARCH, "scheduler": None,
                  "resources": {"trial_cpus": 0.5, "producer_cpus": 0.5}, **sweep},
    }


def load(tmp_path, data) -> SweepSpec:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(SweepSpec, path)


def test_trials_take_their_architectures_fields(tmp_path, cache):
    spec = load(tmp_path, spec_data(cache))
    relu = spec.trial({"sae.architecture": "relu", "sae.k": 16})
    assert relu.sae.architecture == "relu" and not hasattr(relu.sae, "k"), "a relu trial has no k"
    topk = spec.trial({"sae.architecture": "topk", "sae.k": 16})
    assert (topk.sae.architecture, topk.sae.k, topk.sae.dict_size) == ("topk", 16, 128)
    jump = spec.trial({"sae.architecture": "jumprelu", "sae.k": 8})
    assert jump.sae.architecture == "jumprelu" and jump.sae.threshold_init == 0.01


@pytest.mark.parametrize("search, message", [
    ({"sae.k": {"type": "int", "low": 1, "high": 8}},
     "sweep.search.sae.k: no architecture of this sweep (relu) has a searchable field 'k'"),
    ({"sae.architecture": {"type": "choice", "values": ["relu", "gated"]}},
     "sweep.search.sae.architecture: value 'gated' is invalid: unknown architecture 'gated'; known: relu"),
    ({"sae.architecture": {"type": "choice", "values": ["topk"]}, "sae.k": {"type": "int", "low": 1, "high": 500}},
     "sweep.search.sae.k: value 500 is invalid: k must be in [1, dict_size=128]"),
])
def test_architecture_search_mistakes_are_named(tmp_path, cache, search, message):
    with pytest.raises(SpecError) as e:
        load(tmp_path, spec_data(cache, search=search))
    assert message in str(e.value)


@pytest.mark.slow
def test_a_sweep_over_every_architecture(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # method grid: every architecture once, in order (the grid mode end to end); k only where it exists
    search = {**SEARCH, "sae.k": {"type": "choice", "values": [8]}}
    spec = load(tmp_path, spec_data(cache, method="grid", search=search, num_samples=None))
    assert spec.n_trials == len(ARCHITECTURES)
    try:
        result = run_sweep(spec, "archs", tmp_path / "runs", verbose=0)
    finally:
        ray.shutdown()
    rows = sorted(result.rows, key=lambda r: r["trial"])
    assert [r["params"]["sae.architecture"] for r in rows] == list(ARCHITECTURES)
    for row in rows:
        arch = row["params"]["sae.architecture"]
        assert row["outcome"] == "finished", row
        assert math.isfinite(row["metrics"]["eval/explained_variance"]) and row["metrics"]["eval/ce_spliced"] > 0
        assert "nce" in row["metrics"], "the contrastive term trained with every architecture"
        assert ("l1" in row["metrics"]) == (arch == "relu") and ("l0_penalty" in row["metrics"]) == (arch == "jumprelu")
        cfg = json.loads((result.sweep_dir / row["trial"] / "sae" / "cfg.json").read_text())
        assert cfg["csc_sae_config"]["architecture"] == arch
        assert cfg["csc_sae_config"].get("k") == (8 if "topk" in arch else None)
        assert ("prefix_mse" in row["metrics"]) == (arch == "matryoshka_batchtopk")  # its nested losses trained
        if "topk" in arch:
            assert row["metrics"]["eval/l0"] < 16
