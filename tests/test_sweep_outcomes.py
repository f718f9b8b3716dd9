"""A sweep's folder needs no tracker: an untracked sweep (real Ray, the tiny model) writes every trial's
artifacts and every report `csc report` reads, and touches no MLflow store. The tracker Tune pickles with
its callbacks carries no client and no records in flight."""

import json
import pickle

import ray

from csc.cli import main
from csc.spec_loader import load_spec
from csc.sweep.outcomes import NOT_METRICS, REPORTS, TrialRecords, metrics_of
from csc.sweep.run import STATE_FILE, run_sweep
from csc.sweep.spec import SweepSpec
from csc.sweep.tracking.mlflow import MlflowTracker
from tests.test_sweep import tiny_sweep


def test_untracked_sweep_keeps_every_file_of_its_folder(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the default MLflow store would be made
    points = [{"trainer.beta": 0.001, "trainer.lr": 1e-3},
              {"trainer.beta": 0.01, "trainer.lr": 3e-4},  # reconstructs worse at step 10: ASHA stops it
              {"trainer.beta": 0.005, "trainer.lr": 1e20}]  # diverges at step 2
    # single-figure ASHA, on a training metric (tests/test_sweep.py runs MO-ASHA on the rung figures)
    asha = {"type": "asha", "metric": "ev", "mode": "max", "grace_period": 10, "reduction_factor": 2}
    spec = load_spec(SweepSpec, tiny_sweep(tmp_path, cache, num_samples=3, points_to_evaluate=points, scheduler=asha))
    try:
        result = run_sweep(spec, "plain", tmp_path / "runs", verbose=0, tracked=False)
    finally:
        ray.shutdown()

    sweep_dir = result.sweep_dir
    assert (result.tracking_uri, result.experiment_id, result.parent_run_id) == (None, None, None)
    assert "tracking_uri" not in json.loads((sweep_dir / STATE_FILE).read_text())
    rows = {r["trial"]: r for r in result.rows}
    assert [rows[t]["outcome"] for t in sorted(rows)] == ["finished", "stopped_early", "failed"]
    assert rows["trial_02"]["reason"].startswith("stopped at the rung at step 10 (reported at step 10): ev ")
    assert rows["trial_02"]["reason"].endswith("; behind trial_01; placed 2 of the 2 trials at that rung, and only the "
                                               "top 1/2 (1) continue")
    assert rows["trial_03"]["reason"].startswith("csc.errors.DivergenceError: step 2: ")
    assert all((sweep_dir / name).stat().st_size > 0 for name in REPORTS)
    assert json.loads((sweep_dir / "trials.json").read_text()) == result.rows

    for name in ("trial_01", "trial_02"):
        assert {p.name for p in (sweep_dir / name / "sae").iterdir()} == {"cfg.json", "sae_weights.safetensors"}
        assert (sweep_dir / name / "curves.png").stat().st_size > 0
    assert (sweep_dir / "trial_01" / "dashboard.html").stat().st_size > 0  # finished: evaluated, with its dashboard
    assert not (sweep_dir / "trial_02" / "dashboard.html").exists()
    error = (sweep_dir / "trial_03" / "error.txt").read_text()
    assert "DivergenceError" in error and "\x1b[" not in error
    assert not (sweep_dir / "trial_03" / "sae").exists()

    # A row's metrics are every number the trial reported, and nothing of Tune's bookkeeping.
    last = json.loads((sweep_dir / "trial_01" / "result.json").read_text().splitlines()[-1])
    metrics = rows["trial_01"]["metrics"]
    assert metrics == metrics_of(last) and not set(metrics) & NOT_METRICS
    assert set(metrics) >= {"loss", "mse", "l1", "nce", "ev", "l0", "dead_frac", "lr", "beta", "gamma", "tokens",
                            "tokens_per_s", "eval/explained_variance", "eval/ce_loss_recovered", "eval/delta_ce",
                            "eval/kl_spliced", "eval/nce", "eval/nce_chance"}
    assert {"pid", "training_iteration", "time_this_iter_s", "timestamp"} <= set(last), "Tune's, left out"

    assert not any((tmp_path / p).exists() for p in ("mlflow.db", "mlartifacts")), "no MLflow store was made"
    assert not (sweep_dir / "mlflow_unsent.json").exists()
    capsys.readouterr()
    assert main(["report", str(sweep_dir)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("sweep 'plain': 3 of 3 trials: 1 finished, 1 stopped early, 1 failed")
    assert "reports: " in summary and "MLflow" not in summary


def test_the_pickled_tracker_holds_no_client_and_no_backlog(tmp_path):
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    tracker.client  # a live client, as during a sweep
    tracker.experiment_id, tracker.parent_run_id, tracker.sweep_dir = "1", "parent", str(tmp_path)
    tracker._names["t1"], tracker._runs["t1"], tracker._down = "trial_01", "run", True
    tracker._backlog.append(("report of trial_01", print, ()))
    records = TrialRecords("{}", str(tmp_path), tracker)
    records._told.add("t1")

    restored = pickle.loads(pickle.dumps(records))
    assert restored._told == set() and "_mlflow" not in vars(restored.tracker)
    assert vars(restored.tracker) == {**vars(MlflowTracker(tracker.uri, tracker.artifact_root)), "experiment_id": "1",
                                      "parent_run_id": "parent", "sweep_dir": str(tmp_path)}


def test_a_run_whose_trial_tune_never_saved_gives_way_to_the_trial_run_again(tmp_path, capsys):
    """A driver killed just after starting trial_03 (MLflow has its run, Tune's saved state has no such
    trial): on --resume Tune makes a new trial_03 with another id. One trial_03 run remains, a fresh one;
    the lost one is deleted (restorable), and runs of other names and of known trials are left alone."""
    from mlflow.entities import ViewType

    spec = load_spec(SweepSpec, tiny_sweep(tmp_path, tmp_path / "cache"))
    first = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), "lost")
    state = first.start_sweep("lost", str(tmp_path), spec)
    for key, name in [("a", "trial_01"), ("b", "trial_03")]:
        first.trial_started(key, name, {}, {})
        first.log_metrics(key, 50, {"loss": 1.0}, {})
    lost = first._runs["b"]

    resumed = MlflowTracker.of(spec, state)
    resumed.start_sweep("lost", str(tmp_path), spec, state)
    resumed.trial_started("a", "trial_01", {}, {})  # a trial Tune saved: its run goes on
    resumed.trial_started("c", "trial_03", {}, {})
    assert "trial_03: MLflow run " + lost in capsys.readouterr().out

    client = resumed.client
    active = {r.info.run_name: r.info.run_id for r in client.search_runs([state["experiment_id"]])}
    assert active == {"lost": state["parent_run_id"], "trial_01": first._runs["a"], "trial_03": resumed._runs["c"]}
    assert resumed._runs["c"] != lost
    gone = client.search_runs([state["experiment_id"]], run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in gone] == [lost] and gone[0].data.tags["csc.lost"].startswith("the driver died")


def test_a_trial_that_goes_back_to_a_checkpoint_gets_the_history_of_the_sae_it_continues(tmp_path, capsys):
    """trial_01 logged steps 50..300, then a resumed driver restarted it from its checkpoint of step 100. Trained
    again to the same values (CPU), its run goes on; to other values (a GPU's bf16), or stopped earlier than its
    first run got (ASHA on a resume), the run must end with the history of the SAE it ends with. MLflow cannot
    delete points: a new run takes the history up to the checkpoint, and the old one is deleted, restorable."""
    from mlflow.entities import ViewType

    spec = load_spec(SweepSpec, tiny_sweep(tmp_path, tmp_path / "cache"))
    first = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), "rewind")
    state = first.start_sweep("rewind", str(tmp_path), spec)
    for key, name in [("a", "trial_01"), ("b", "trial_02")]:
        first.trial_started(key, name, {"trainer": {"lr": 1e-3}}, {"csc.searched": "trainer.lr"})
        for step in range(50, 301, 50):
            first.log_metrics(key, step, {"loss": 1.0 / step, "ev": 0.5}, {})
    old = dict(first._runs)

    resumed = MlflowTracker.of(spec, state)
    resumed.start_sweep("rewind", str(tmp_path), spec, state)
    for key, name in [("a", "trial_01"), ("b", "trial_02")]:
        resumed.trial_started(key, name, {"trainer": {"lr": 1e-3}}, {"csc.searched": "trainer.lr"})
        resumed.log_metrics(key, 150, {"loss": 1.0 / 150, "ev": 0.5}, {}, since=100)  # trained again bit for bit
    assert resumed._runs == old and "branch" not in capsys.readouterr().out
    resumed.log_metrics("a", 200, {"loss": 2.0, "ev": 0.6}, {}, since=100)  # ... then to another value
    assert "trial_01: steps 200 to 300 of its MLflow run were a branch its SAE did not continue" in \
        capsys.readouterr().out
    resumed.log_metrics("a", 250, {"loss": 3.0, "ev": 0.6}, {}, since=100)  # the same branch goes on
    resumed.log_metrics("a", 200, {"loss": 4.0, "ev": 0.7}, {}, since=100)  # a retry from the same checkpoint
    resumed.log_metrics("a", 250, {"loss": 5.0, "ev": 0.7}, {}, since=100)
    resumed.log_metrics("a", 250, {"loss": 5.0, "ev": 0.8}, {}, since=250)  # restored from its final checkpoint
    resumed.trial_finished("a", "finished", {}, [], 250)
    resumed.trial_finished("b", "stopped_early", {}, [], 150)  # ASHA stopped it at 150 this time
    assert capsys.readouterr().out.count("were a branch its SAE did not continue") == 2

    client = resumed.client
    runs = {r.info.run_name: r for r in client.search_runs([state["experiment_id"]], "tags.`csc.trial_id` != ''")}
    assert {n: r.info.run_id for n, r in runs.items()} == {"trial_01": resumed._runs["a"],
                                                           "trial_02": resumed._runs["b"]}
    assert not {r.info.run_id for r in runs.values()} & set(old.values())

    def history(name: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(runs[name].info.run_id, key))

    assert history("trial_01", "loss") == [(50, 1 / 50), (100, 1 / 100), (150, 1 / 150), (200, 4.0), (250, 5.0)]
    assert history("trial_01", "ev") == [(50, 0.5), (100, 0.5), (150, 0.5), (200, 0.7), (250, 0.7)]
    assert history("trial_02", "loss") == [(50, 1 / 50), (100, 1 / 100), (150, 1 / 150)]
    for run in runs.values():
        assert run.data.params == {"trainer.lr": "0.001"} and run.data.tags["csc.searched"] == "trainer.lr"
        assert run.data.tags["mlflow.parentRunId"] == state["parent_run_id"] and "csc.rewound" in run.data.tags
        assert run.info.status == "FINISHED"
    gone = client.search_runs([state["experiment_id"]], run_view_type=ViewType.DELETED_ONLY)
    assert len(gone) == 3 and set(old.values()) <= {r.info.run_id for r in gone}, "three branches left"
    assert all("csc.discarded_branch" in r.data.tags for r in gone)


def test_the_curves_of_a_trial_that_went_back_to_a_checkpoint_are_the_branch_it_continued(tmp_path):
    from csc.sweep.outcomes import reported_history

    reports = [(50, 0, 1.0), (100, 0, 2.0), (150, 0, 3.0), (150, 100, 4.0), (200, 100, 5.0), (200, 200, 6.0)]
    (tmp_path / "result.json").write_text(
        "".join(json.dumps({"step": s, "since_step": since, "loss": v}) + "\n" for s, since, v in reports))
    assert [(r["step"], r["loss"]) for r in reported_history(tmp_path)] == [(50, 1.0), (100, 2.0), (150, 4.0),
                                                                         (200, 5.0)]


def test_tunes_error_over_a_checkpoint_deleted_before_the_kill_is_one_line(tmp_path, capsys):
    """Tune restored after a killed driver deletes checkpoints beyond num_to_keep that its saved state still
    lists; one deleted before the kill raises FileNotFoundError, which Tune's controller logs with a traceback.
    Produced here with Tune's own checkpoint manager; the record is logged as the controller logs it."""
    import logging

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from csc.sweep.run import quiet_gone_checkpoints

    old, new = tmp_path / "trial_04" / "checkpoint_000000", tmp_path / "trial_04" / "checkpoint_000001"
    old.mkdir(parents=True)
    new.mkdir()
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(old)), {"step": 100}))
    old.rmdir()  # deleted before the driver died; the restored state still lists it
    controller = logging.getLogger("ray.tune.execution.tune_controller")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    controller.addHandler(handler)
    quiet_gone_checkpoints()
    quiet_gone_checkpoints()  # once per process, however often a sweep starts
    try:
        try:
            manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(new)), {"step": 200}))
        except FileNotFoundError:
            controller.exception("Trial %s: Error handling checkpoint %s", "trial_04", new)
        try:
            raise PermissionError(13, "Permission denied")  # any other error still reaches the user whole
        except PermissionError:
            controller.exception("Trial %s: Error handling checkpoint %s", "trial_05", new)
    finally:
        controller.removeHandler(handler)
    printed = capsys.readouterr().out
    assert "csc: trial_04: an old checkpoint Tune meant to delete was already gone" in printed and str(old) in printed
    assert [r.args[0] for r in records] == ["trial_05"] and records[0].exc_info is not None
    assert len([f for f in controller.filters if type(f).__name__ == "_GoneCheckpoint"]) == 1
