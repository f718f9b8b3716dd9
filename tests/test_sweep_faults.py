"""Faults produced for real during a sweep (real Ray, real MLflow). The producer's process and a trial's
worker process are killed mid-sweep: the producer is restarted and regenerates only what the disk cache
lacks, the trial is retried from its last checkpoint in the same MLflow run, and the sweep completes with
no trial lost or duplicated and every reported step logged once. The driver is killed outright, then the
resumed sweep is interrupted (Ctrl+C): --resume finishes the sweep into the same MLflow runs. The tracking server
(behind MLflow's authentication) goes down mid-sweep and comes back: nothing is lost."""

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from csc.errors import CscError
from csc.spec_loader import load_spec
from csc.sweep.producer import NAMESPACE, producer_name
from csc.sweep.run import run_sweep
from csc.sweep.scheduler import load_halving
from csc.sweep.spec import SweepSpec
from csc.sweep.ui import MlflowServer, _group_alive, free_port
from tests.test_sweep import LM_SHARDS, child_runs, tiny_sweep


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc's parent links."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


def sweep_in_thread(spec: SweepSpec, name: str, out: Path) -> tuple[threading.Thread, dict]:
    """run_sweep on a thread (on the Ray this test started), so the test can break things meanwhile;
    the result lands in the dict."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(result=run_sweep(spec, name, out, verbose=0)))
    thread.start()
    return thread, result


def last_result(trial_dir: Path) -> dict | None:
    lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    return json.loads(lines[-1]) if lines else None


@pytest.mark.slow
def test_sweep_survives_killed_producer_and_trial_worker(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 1000 steps: the faults land at step 300-400 (a poll every 0.5 s); the steps after are the margin.
    spec = load_spec(SweepSpec, tiny_sweep(tmp_path, cache, trainer={"steps": 1000, "log_every": 50},
                                           checkpoint_every=250, num_samples=3, max_concurrent=2, scheduler=None,
                                           max_failures=1))

    ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False)
    try:
        sweep, out = sweep_in_thread(spec, "faults", tmp_path / "runs")
        trial_dir = tmp_path / "runs" / "faults" / "trial_01"
        deadline = time.monotonic() + 300
        while (r := last_result(trial_dir)) is None or r["step"] < 300:  # past its first checkpoint
            assert sweep.is_alive() and time.monotonic() < deadline, "trial_01 never reached step 300"
            time.sleep(0.5)
        assert r["step"] < 1000, "trial_01 finished before the faults: make it longer"
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
    assert result.producer["lm_shards_computed"] == LM_SHARDS - shards_on_disk

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = child_runs(client, result.experiment_id, result.parent_run_id)
    assert sorted(runs) == ["trial_01", "trial_02", "trial_03"], "no run duplicated"
    retried = runs["trial_01"]
    assert retried.info.status == "FINISHED" and retried.data.tags["csc.retries"] == "1"
    for run in runs.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(50, 1001, 50)), f"{run.info.run_name}: every step once"


@pytest.mark.slow
@pytest.mark.parametrize("kind", [{"type": "mo-asha"}, {"type": "asha", "metric": "heldout/explained_variance"}],
                         ids=["mo-asha", "asha"])
def test_a_sweep_killed_then_interrupted_resumes_into_the_same_runs(tmp_path, cache, kind):
    """SIGKILL of `csc sweep` (its whole process group: the driver and the local Ray it started, as on a lost
    machine), `--resume`, Ctrl+C (SIGINT) in the middle of that, and `--resume` again: the sweep finishes into the
    same parent and child runs, none duplicated, each step logged once. A trial started just before the kill, which
    Tune never saved, runs again in a new run (its old run is deleted); one that had logged steps past its last
    checkpoint trains them again, bit for bit here, into the same run. Every rung decision made before the kill and
    before the interruption stands, in its order, and no trial is judged twice at one rung (rungs at 30 and 60 lie
    between checkpoints, so a trial resumed from its checkpoint may train through them again). Tune's noise after
    a resume stays out of sight, and its table shows the searched values and the trials' figures."""
    spec_path = tiny_sweep(tmp_path, cache, trainer={"steps": 200, "log_every": 20}, checkpoint_every=40,
                           num_samples=5, max_concurrent=2,  # long enough to be stopped mid-way
                           scheduler={**kind, "grace_period": 30, "reduction_factor": 2})  # rungs at 30, 60, 120
    sweep_dir = tmp_path / "runs" / "tiny"
    decisions = []  # the scheduler's records after the kill, after the interruption, at the end

    def keep_decisions():
        halving = load_halving(sweep_dir)
        decisions.append({m: [vars(r) for r in rs] for m, rs in halving.rungs.items()} if halving else {})
    cmd = [sys.executable, "-m", "csc.cli", "sweep", str(spec_path), "--out", str(tmp_path / "runs"), "--verbose", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def finished() -> int:
        try:
            return sum(r.info.status == "FINISHED" for r in client.search_runs(
                ["1"], filter_string="tags.`csc.trial_id` != ''"))
        except Exception:  # the store is not created yet
            return 0

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: finished() >= 1, 300, "a first trial finished", proc)
    finally:
        started = descendants(proc.pid)  # the local Ray it started, wherever Ray put their sessions
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up of any kind
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid)
    keep_decisions()
    state = json.loads((tmp_path / "runs" / "tiny" / "csc_sweep.json").read_text())
    killed = child_runs(client, state["experiment_id"], state["parent_run_id"])
    assert client.get_run(state["parent_run_id"]).info.status == "RUNNING"  # nobody could say otherwise

    proc = subprocess.Popen(cmd + ["--resume"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        done_before = finished()
        _wait_for(lambda: finished() > done_before, 300, "another trial finished", proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl+C does: Tune saves its state and stops
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "the sweep was interrupted; continue it with" in out, out[-5000:]
    assert re.search(r"Trial name +status +trainer\.beta +trainer\.lr +iter +total time \(s\) +loss +ev +l0 +mse",
                     out), out[-3000:]
    keep_decisions()
    interrupted = child_runs(client, state["experiment_id"], state["parent_run_id"])
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-5000:]
    for text in (out, resumed.stdout + resumed.stderr):
        assert "Traceback" not in text, "Tune's noise after a resume stays out of sight"
    after = child_runs(client, state["experiment_id"], state["parent_run_id"])
    assert sorted(after) == [f"trial_{i:02d}" for i in range(1, 6)]
    assert len(client.search_runs([state["experiment_id"]])) == 6, "one parent and five children, no copies"
    assert all(r.info.status == "FINISHED" for r in after.values())
    for before in (killed, interrupted):
        for name, run in before.items():
            if run.info.status == "FINISHED" or run.info.run_id == after[name].info.run_id:
                assert after[name].info.run_id == run.info.run_id, name
                continue
            old = client.get_run(run.info.run_id)
            assert old.info.lifecycle_stage == "deleted" and "csc.lost" in old.data.tags, name
            assert f"{name}: MLflow run {run.info.run_id} was started just before the driver died" in out
    trials = {r["trial"]: r for r in json.loads((tmp_path / "runs" / "tiny" / "trials.json").read_text())}
    assert sorted(trials) == sorted(after)
    for run in after.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        last = trials[run.info.run_name]["steps_done"]
        assert steps == list(range(20, last + 1, 20)), f"{run.info.run_name}: every step once"
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"

    keep_decisions()
    for before, later in zip(decisions, decisions[1:]):  # every decision stands, in the order it was made
        for rung, records in before.items():
            assert later[rung][:len(records)] == records, rung
    final = decisions[-1]
    stopped = {}
    for rung, records in final.items():
        names = [r["trial"] for r in records]
        assert len(names) == len(set(names)), f"a trial judged twice at the rung at step {rung}"
        assert not set(names) & set(stopped), "a stopped trial judged at a later rung"
        stopped.update({r["trial"]: r["step"] for r in records if r["decision"] == "stop"})
    assert stopped and sum(r["outcome"] == "finished" for r in trials.values()) >= 1
    for name, row in trials.items():
        if name in stopped:
            assert row["outcome"] == "stopped_early" and row["steps_done"] == stopped[name], name
            assert row["reason"] == load_halving(sweep_dir).stop_reason(name)
            assert after[name].data.tags["csc.stop_reason"] == row["reason"]
        else:
            assert row["outcome"] == "finished" and row["steps_done"] == 200, name

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "holds a sweep: pass --resume to continue it" in again.stderr


@pytest.mark.slow
def test_mlflow_server_behind_authentication_and_down_mid_sweep(tmp_path, cache, monkeypatch, capfd):
    """A sweep tracked by a real `mlflow server` over HTTP, behind MLflow's basic-auth app, set up as deploy/README.md
    sets it up: every user may read, the admin makes the sweeps' own user through the REST API. Without that user's
    credentials, or with a wrong password, the sweep is refused in seconds, naming MLflow authentication; with them
    it runs (the user makes its experiment), and no password appears in any param, tag, artifact, file or output. The server is stopped while trials train and started again on the same stores: training never waits
    for it, and every record made meanwhile reaches MLflow once it answers."""
    monkeypatch.chdir(tmp_path)
    admin_password, password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    (tmp_path / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # else every request hashes the password again (PBKDF2): 15 s more of this test
        "auth_cache_ttl_seconds = 60\n")
    auth = {"app_name": "basic-auth", "env": {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
                                              "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}}  # CSRF
    store, root, port = f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "server-artifacts"), free_port()
    # 2000 steps: down from step 300 to at least step 1000 (7 reports of each trial); where training ends during
    # the outage (a fast machine), the sweep's end waits up to a minute for MLflow (END_WAIT_S) and the test checks
    # the same.
    spec = load_spec(SweepSpec, tiny_sweep(tmp_path, cache, trainer={"steps": 2000, "log_every": 100},
                                           checkpoint_every=1000, num_samples=2, max_concurrent=2, scheduler=None,
                                           tracking={"uri": f"http://127.0.0.1:{port}"}))
    trial_dir = tmp_path / "runs" / "outage" / "trial_01"

    def wait_until(done, what: str, thread: threading.Thread) -> None:
        deadline = time.monotonic() + 300
        while not done():
            assert thread.is_alive() and time.monotonic() < deadline, f"trial_01 never {what}"
            time.sleep(0.1)

    def logged_step() -> int:  # what MLflow has of trial_01, as the driver logs it (result.json lags behind)
        found = MlflowClient(server.url).search_runs(["1"], filter_string="attributes.run_name = 'trial_01'")
        history = MlflowClient(server.url).get_metric_history(found[0].info.run_id, "loss") if found else []
        return max((m.step for m in history), default=0)

    server = MlflowServer(store, root, port=port, **auth)
    server.start()
    make_user = urllib.request.Request(  # deploy/README.md's curl
        f"{server.url}/api/2.0/mlflow/users/create", json.dumps({"username": "csc", "password": password}).encode(),
        {"Content-Type": "application/json",
         "Authorization": "Basic " + base64.b64encode(f"admin:{admin_password}".encode()).decode()})
    urllib.request.urlopen(make_user, timeout=30).close()
    ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False)
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "csc")
        for given, wrong in [("none were given", None), ("the credentials given", "not-" + password)]:
            if wrong is not None:
                monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
            t0 = time.monotonic()
            with pytest.raises(CscError) as refused:
                run_sweep(spec, "refused", tmp_path / "runs", verbose=0)
            assert time.monotonic() - t0 < 30
            assert f"the MLflow server refused this driver (HTTP 401, MLflow authentication: {given}" in \
                str(refused.value)
        assert not (tmp_path / "runs" / "refused" / "csc_sweep.json").exists(), "refused before anything started"
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        sweep, out = sweep_in_thread(spec, "outage", tmp_path / "runs")
        wait_until(lambda: logged_step() >= 300, "logged step 300", sweep)
        # Down at once, as in a crash: a graceful stop takes seconds, in which a fast machine trains to the end.
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.stop()
        # trained and reported while MLflow was down (Tune's checkpoint of step 1000 is in the trial folder)
        wait_until(lambda: (trial_dir / "checkpoint_000000").is_dir(), "reached step 1000", sweep)
        server = MlflowServer(store, root, port=port, **auth)
        server.start()
        sweep.join(timeout=600)
        assert not sweep.is_alive() and "result" in out, "the sweep did not complete"
        result = out["result"]
        client = MlflowClient(server.url)
        runs = child_runs(client, result.experiment_id, result.parent_run_id)
        histories = {n: [m.step for m in client.get_metric_history(r.info.run_id, "loss")] for n, r in runs.items()}
        arts = {n: {a.path for a in client.list_artifacts(r.info.run_id, "sae")} for n, r in runs.items()}
        parent = client.get_run(result.parent_run_id)
        experiment = client.get_experiment(result.experiment_id)
    finally:
        server.stop()
        ray.shutdown()

    printed = capfd.readouterr().out  # at the descriptor: Tune may wrap sys.stdout while it runs
    said = [line[:200] for line in printed.splitlines() if line.startswith("csc:")]
    assert "csc: MLflow failed (report of trial_0" in printed, ("the outage began while the trials trained", said)
    assert "csc: MLflow answers again" in printed, printed[-3000:]
    assert "could not record the end of the sweep" not in printed
    assert parent.info.status == "FINISHED" and sorted(runs) == ["trial_01", "trial_02"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for name, steps in histories.items():
        assert steps == list(range(100, 2001, 100)), f"{name}: every report reached MLflow once"
        assert arts[name] == {"sae/cfg.json", "sae/sae_weights.safetensors"}
        assert (tmp_path / "runs" / "outage" / name / "sae" / "cfg.json").is_file(), "kept locally too"
    assert not (tmp_path / "runs" / "outage" / "mlflow_unsent.json").exists()
    assert "mlflow.sharedViewState.csc-outage" in experiment.tags  # the sweep's view of the runs table, over HTTP
    assert not (tmp_path / "mlflow.db").exists(), "nothing went to the default store"
    for secret in (password, admin_password):
        assert secret not in printed
        for run in [parent, *runs.values()]:
            assert not any(secret in v for v in [*run.data.params.values(), *run.data.tags.values()])
        for path in [*(tmp_path / "runs").rglob("*"), *(tmp_path / "server-artifacts").rglob("*")]:
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
