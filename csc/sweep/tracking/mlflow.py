"""MLflow as the sweep's tracker: one parent run per sweep, one nested child run per trial. Every MLflow
call of csc.sweep is in this module (mlflow itself is imported only when a call is made).

The parent run holds the spec as params, the sweep's reports as artifacts and, at the end, the producer's
counters as metrics. A child run holds the trial's resolved sae/trainer fields and its searched values as
params, every report as metrics (step = training step), and at the end: status FINISHED (trained all
steps), KILLED with tag csc.outcome = stopped_early and the reason in csc.stop_reason (the scheduler
stopped it), or FAILED with the error's line in csc.failure_reason; its artifacts are the ones outcomes
kept (sae/, eval.json, dashboard.html, curves.png; error.txt). If MLflow fails, calls wait in an ordered backlog until it
answers again (see `_do`). Runs are found again by the tag csc.trial_id, so a resumed sweep reuses them
and never logs a step twice; a trial that Tune retries after a failure keeps its run. A run whose trial Tune
never saved (the driver died just after starting it) is deleted when that trial's name is used again.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from csc.errors import CscError
from csc.sweep.spec import SweepSpec
from csc.sweep.tracking import Tracker
from csc.sweep.ui import default_tracking

UNSENT_FILE = "mlflow_unsent.json"
END_WAIT_S = 60
"""How long the end of a sweep waits for MLflow to take the records it could not take before."""
# A trial that early stopping ended ran as asked: FINISHED (its tag csc.outcome says how), not a crash's status.
STATUS = {"finished": "FINISHED", "stopped_early": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
STEP_METRIC = "loss"
"""A metric of every report: its history says which steps a reopened run already has."""
TAG_CHARS = 5000
EXPERIMENT_KIND = "mlflow.experimentKind"
"""The experiment tag that picks the MLflow UI's view (3.x): an untagged experiment may open in the GenAI one."""


def tracking_of(spec: SweepSpec) -> tuple[str, str | None]:
    """The tracking URI and the artifact root for new experiments (a server picks its own by default)."""
    t = spec.sweep.tracking
    uri, root = default_tracking()
    uri = t.uri or uri
    return uri, t.artifact_root or (root if uri.startswith("sqlite:") else None)


def check_server(uri: str) -> None:
    """Fail in seconds, before any compute: MLflow's client would retry an absent server for minutes."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except (OSError, ValueError) as e:
        reason = str(getattr(e, "reason", e))
    raise CscError(f"sweep.tracking.uri {uri}: no MLflow server answers there ({reason}); start one "
                   f"(`csc ui --uri sqlite:///mlflow.db`, or deploy/mlflow) or fix the URI")


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow caps param values
    return out


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:TAG_CHARS]) for k, v in tags.items()]


class MlflowTracker(Tracker):
    name = "MLflow"

    def __init__(self, uri: str, artifact_root: str | None = None, experiment: str | None = None):
        self.uri, self.artifact_root, self.experiment = uri, artifact_root, experiment
        self.sweep_dir: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._names: dict[str, str] = {}
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._backlog: list[tuple[str, Any, tuple]] = []
        self._down = False

    @classmethod
    def of(cls, spec: SweepSpec, state: dict[str, Any] | None = None) -> MlflowTracker | None:
        """The tracker of a new sweep (spec.sweep.tracking, by default the working directory's store), or of
        the sweep whose state file is `state` (None if that sweep ran untracked)."""
        if state is None:
            uri, root = tracking_of(spec)
            return cls(uri, root, spec.sweep.tracking.experiment)
        return cls(state["tracking_uri"]) if "tracking_uri" in state else None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; run ids are looked up again
        return {**{k: v for k, v in self.__dict__.items() if k != "_mlflow"}, "_names": {}, "_runs": {},
                "_last_step": {}, "_backlog": [], "_down": False}

    @property
    def client(self):
        if "_mlflow" not in self.__dict__:
            from mlflow.tracking import MlflowClient

            self.__dict__["_mlflow"] = MlflowClient(tracking_uri=self.uri)
        return self.__dict__["_mlflow"]

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = list(params.items())
        for s in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[s:s + 100]])

    # ------------------------------------------------------------------ the sweep's parent run

    def start_sweep(self, name: str, sweep_dir: str, spec: SweepSpec,
                    resume: dict[str, Any] | None = None) -> dict[str, str]:
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        self.sweep_dir = sweep_dir
        client = self.client
        try:
            if resume is not None:
                self.experiment_id, self.parent_run_id = resume["experiment_id"], resume["parent_run_id"]
                client.update_run(self.parent_run_id, status="RUNNING")
            else:
                exp_name = self.experiment or name
                exp = client.get_experiment_by_name(exp_name)
                self.experiment_id = exp.experiment_id if exp else client.create_experiment(
                    exp_name, artifact_location=Path(self.artifact_root).resolve().as_uri() if self.artifact_root
                    else None, tags={EXPERIMENT_KIND: "custom_model_development"})
                self.parent_run_id = client.create_run(self.experiment_id, run_name=name, tags={
                    "csc.sweep_dir": sweep_dir, "csc.role": "sweep"}).info.run_id
        except Exception as e:  # MLflow raises many kinds (connection, SQL, REST): all mean the same to the user
            raise CscError(f"sweep.tracking: cannot use MLflow at {self.uri}: "
                           f"{str(e).strip().splitlines()[0]}") from None
        if resume is None:
            params = flat_params(spec.model_dump(exclude={"sweep"}))
            params.update(flat_params(spec.sweep.model_dump(exclude={"search", "points_to_evaluate"}), "sweep."))
            params["sweep.search"] = json.dumps(spec.sweep.model_dump()["search"])[:500]
            self._log_params(self.parent_run_id, params)
        # From here on an absent tracking server fails a call in seconds instead of minutes of retries: the
        # backlog keeps what could not be sent and sends it when the server answers again.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id}

    def sweep_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self._do("the sweep's reports", self._log_artifact, self.parent_run_id, path)
        deadline = time.monotonic() + END_WAIT_S
        while self._backlog and time.monotonic() < deadline:  # give a restarting server a minute
            time.sleep(2)
            self._flush()
        sweep_dir = Path(self.sweep_dir)
        unsent = sweep_dir / UNSENT_FILE
        unsent.unlink(missing_ok=True)
        if self._backlog:
            unsent.write_text(json.dumps([what for what, _, _ in self._backlog], indent=1))
            print(f"csc: MLflow still fails: {len(self._backlog)} records were not sent (listed in {unsent}); "
                  f"the data is in {sweep_dir} (trials.csv, each trial's result.json, checkpoints, sae/)", flush=True)

    def end_sweep(self, status: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric

        for attempt in range(3):  # a pooled connection to a server that restarted fails once, then works
            try:
                self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                                      tags=_tags(tags))
                self.client.set_terminated(self.parent_run_id, STATUS[status])
                return
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(2)

    # ------------------------------------------------------------------ the trials' child runs

    def trial_started(self, key: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._names[key] = name
        self._do(f"start of {name}", self._open_run, key, name, flat_params(params), tags)

    def log_metrics(self, key: str, step: int, metrics: dict[str, float], tags: dict[str, str]) -> None:
        self._do(f"report of {self._names[key]}", self._log_metrics, key, step, metrics, tags)

    def trial_retried(self, key: str, tags: dict[str, str]) -> None:
        self._do(f"retry of {self._names[key]}", self._set_tags, key, tags)

    def trial_finished(self, key: str, outcome: str, tags: dict[str, str], artifacts: list[Path]) -> None:
        what = "failure of" if outcome == "failed" else "end of"
        self._do(f"{what} {self._names[key]}", self._finish, key, outcome, tags, artifacts)

    def _open_run(self, key: str, name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        """The trial's run: the one a previous run of the sweep made (its steps are not logged again), else
        a new child run of the sweep's parent run."""
        if key in self._runs:
            return
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`csc.trial_id` = '{key}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        if found:
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, STEP_METRIC)
            self._last_step[run_id] = max((m.step for m in history), default=0)
            self.client.update_run(run_id, status="RUNNING")
        else:
            self._delete_lost(name)
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
                **tags, "mlflow.parentRunId": self.parent_run_id, "csc.trial_id": key,
                "csc.sweep_dir": self.sweep_dir}).info.run_id
            self._log_params(run_id, params)
            self._last_step[run_id] = 0
        self._runs[key] = run_id

    def _delete_lost(self, name: str) -> None:
        """Tune names trials from its saved state, so a run of this sweep with the name of a new trial belongs
        to a trial the driver started just before it died and Tune never saved: that trial is run again from
        its start under the same name, and its half-logged run is deleted (MLflow keeps it restorable)."""
        for run in self.client.search_runs(
                [self.experiment_id],
                filter_string=f"attributes.run_name = '{name}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"):
            self.client.set_tag(run.info.run_id, "csc.lost", "the driver died before Tune saved this trial; "
                                "it was run again from its start in a new run of the same name")
            self.client.delete_run(run.info.run_id)
            print(f"csc: {name}: MLflow run {run.info.run_id} was started just before the driver died, and Tune "
                  f"never saved its trial; the trial runs again in a new run, and that run is deleted "
                  f"(`mlflow runs restore --run-id {run.info.run_id}` brings it back)", flush=True)

    def _log_metrics(self, key: str, step: int, metrics: dict[str, float], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric

        run_id = self._runs[key]
        if step <= self._last_step.get(run_id, 0):
            return  # reported again after a resume: MLflow already has it
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], tags=_tags(tags))
        self._last_step[run_id] = step

    def _set_tags(self, key: str, tags: dict[str, str]) -> None:
        self.client.log_batch(self._runs[key], tags=_tags(tags))

    def _finish(self, key: str, outcome: str, tags: dict[str, str], artifacts: list[Path]) -> None:
        run_id = self._runs[key]
        for path in artifacts:
            self._log_artifact(run_id, path)
        self._set_tags(key, {"csc.outcome": outcome, **tags})
        self.client.set_terminated(run_id, STATUS[outcome])

    def _log_artifact(self, run_id: str, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), path.name)
        else:
            self.client.log_artifact(run_id, str(path))

    # ------------------------------------------------------------------ MLflow outages

    def _do(self, what: str, fn, *args) -> None:
        """Make one tracking call. While MLflow fails, the call and every later one wait in a backlog, in
        order, and are sent when it answers again: Tune would turn an exception here into a failure of the
        trial, and training must not depend on the tracking server."""
        self._backlog.append((what, fn, args))
        self._flush()

    def _flush(self) -> None:
        while self._backlog:
            what, fn, args = self._backlog[0]
            try:
                fn(*args)
            except Exception as e:
                if not self._down:
                    print(f"csc: MLflow failed ({what}: {type(e).__name__}: {str(e).strip()[:300]}); training goes "
                          f"on and the records are sent when MLflow answers again", flush=True)
                self._down = True
                return
            self._backlog.pop(0)
        if self._down:
            print("csc: MLflow answers again; the records kept meanwhile are sent", flush=True)
            self._down = False
