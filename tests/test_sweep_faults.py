"""Faults produced for real during a sweep (real Ray, real MLflow): the producer's process and a trial's
worker process are killed mid-sweep. The producer is restarted and regenerates only what the disk cache
lacks; the trial is retried from its last checkpoint in the same MLflow run; the sweep completes with no
trial lost or duplicated and every reported step logged once."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from csc.config import load_spec
from csc.sweep.producer import NAMESPACE, producer_name
from csc.sweep.run import run_sweep
from csc.sweep.spec import SweepSpec
from tests.test_sweep import child_runs, tiny_sweep


def last_result(trial_dir: Path) -> dict | None:
    lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    return json.loads(lines[-1]) if lines else None


@pytest.mark.slow
def test_sweep_survives_killed_producer_and_trial_worker(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_sweep(tmp_path, cache, num_samples=3, max_concurrent=2, scheduler=None, max_failures=1)
    data = json.loads(json.dumps(load_spec(SweepSpec, path).model_dump(mode="json")))
    data["trainer"].update(steps=2000, log_every=50)
    data["checkpoint_every"] = 250
    spec = SweepSpec.model_validate(data)

    ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False)
    try:
        out: dict = {}
        sweep = threading.Thread(target=lambda: out.update(result=run_sweep(spec, "faults", tmp_path / "runs",
                                                                             verbose=0)))
        sweep.start()
        trial_dir = tmp_path / "runs" / "faults" / "trial_01"
        deadline = time.monotonic() + 300
        while (r := last_result(trial_dir)) is None or r["step"] < 300:  # past its first checkpoint
            assert sweep.is_alive() and time.monotonic() < deadline, "trial_01 never reached step 300"
            time.sleep(0.5)
        assert r["step"] < 2000, "trial_01 finished before the faults: make it longer"
        shards_on_disk = sum(len(list(d.glob("shard_*.safetensors"))) for d in cache.rglob("*") if d.is_dir())

        producer = ray.get_actor(producer_name("faults"), namespace=NAMESPACE)
        ray.kill(producer, no_restart=False)  # its process dies, as on an OOM kill
        os.kill(int(r["pid"]), signal.SIGKILL)  # trial_01's worker process (a Ray worker of this test)
        sweep.join(timeout=600)
        assert not sweep.is_alive() and "result" in out, "the sweep did not complete"
    finally:
        ray.shutdown()
    result = out["result"]

    assert sorted(r["trial"] for r in result.rows) == ["trial_01", "trial_02", "trial_03"]
    assert all(r["outcome"] == "finished" for r in result.rows), result.rows
    # Counters are the restarted producer's: it ran the LM only for the shards the cache did not have.
    assert result.producer["lm_shards_computed"] == 6 - shards_on_disk

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = child_runs(client, result.experiment_id, result.parent_run_id)
    assert sorted(runs) == ["trial_01", "trial_02", "trial_03"], "no run duplicated"
    retried = runs["trial_01"]
    assert retried.info.status == "FINISHED" and retried.data.tags["csc.retries"] == "1"
    for run in runs.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(50, 2001, 50)), f"{run.info.run_name}: every step once"
