"""MLflow as the sweep's tracker: one parent run per sweep, one nested child run per trial. Every MLflow
call of csc.sweep is in this module (mlflow itself is imported only when a call is made).

The parent run holds the spec as params, the sweep's reports as artifacts and, at the end, the producer's
counters as metrics. A child run holds the trial's resolved sae/trainer fields and its searched values as
params, every report as metrics (step = training step), and at the end: status FINISHED (trained all
steps) or FINISHED with tag csc.outcome = stopped_early and the reason in csc.stop_reason (the scheduler
stopped it), or FAILED with the error's line in csc.failure_reason; its artifacts are the ones outcomes
kept (sae/, eval.json, dashboard.html, curves.png; error.txt). If MLflow fails, calls wait in an ordered backlog until it
answers again (see `_do`). Runs are found again by the tag csc.trial_id, so a resumed sweep reuses them
and never logs a step twice; a trial that Tune retries after a failure keeps its run. A run whose trial Tune
never saved (the driver died just after starting it) is deleted when that trial's name is used again. A trial whose
steps, trained again from a checkpoint after a restart, come out otherwise, or that ends before steps an earlier run
of it logged, gets a new run with the history up to there, so a run always holds the history of the SAE it ends
with (`_rewind`).
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from csc.errors import CscError
from csc.sweep.spec import SweepSpec
from csc.sweep.tracking import Tracker
from csc.sweep.ui import SHARED_VIEW_TAG, default_tracking, sweep_view

UNSENT_FILE = "mlflow_unsent.json"
END_WAIT_S = 60
"""How long the end of a sweep waits for MLflow to take the records it could not take before."""
# A trial that early stopping ended ran as asked: FINISHED (its tag csc.outcome says how), not a crash's status.
STATUS = {"finished": "FINISHED", "stopped_early": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
STEP_METRIC = "loss"
"""A metric of every report: its history says which steps a reopened run already has."""
TAG_CHARS = 5000
VIEW_COLUMNS = ("ev", "l0", "eval/explained_variance", "eval/delta_ce")
"""Metrics the sweep's view of the runs table shows (with the objectives, the scheduler's rung figures, the searched
values and the outcome)."""
EXPERIMENT_KIND = "mlflow.experimentKind"
"""The experiment tag that picks the MLflow UI's view (3.x): an untagged experiment may open in the GenAI one."""


def tracking_of(spec: SweepSpec) -> tuple[str, str | None]:
    """The tracking URI and the artifact root for new experiments (a server picks its own by default)."""
    t = spec.sweep.tracking
    uri, root = default_tracking()
    uri = t.uri or uri
    return uri, t.artifact_root or (root if uri.startswith("sqlite:") else None)


def check_server(uri: str) -> None:
    """Fail in seconds, before any compute: MLflow's client would retry an absent server for minutes, and a server
    that refuses this driver's credentials (MLflow's basic-auth app) would fail the sweep at its first record."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            healthy, reason = r.status == 200, f"HTTP {r.status}"
    except (OSError, ValueError) as e:
        healthy, reason = False, str(getattr(e, "reason", e))
    if not healthy:
        raise CscError(f"sweep.tracking.uri {uri}: no MLflow server answers there ({reason}); start one "
                       f"(`csc ui --uri sqlite:///mlflow.db`, or deploy/mlflow) or fix the URI")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
    if user is not None and password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            given = ("the credentials given (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD) are not a user of it"
                     if user is not None and password is not None else
                     "none were given: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set")
            raise CscError(f"sweep.tracking.uri {uri}: the MLflow server refused this driver (HTTP {e.code}, MLflow "
                           f"authentication: {given}); export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                           f"of a user who may create runs there") from None
        # any other answer (404: no experiment "Default") came from past the authentication
    except (OSError, ValueError):
        pass  # /health answered: what fails now fails again, with MLflow's own message, at the first call


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
        self._half_made: dict[str, str] = {}
        self._logged: dict[str, dict[int, float]] = {}  # run id -> its STEP_METRIC by step, as MLflow has it
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
                "_half_made": {}, "_logged": {}, "_backlog": [], "_down": False}

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
        self._do("the sweep's view of the runs table", self._set_view, name, spec)
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

    def _set_view(self, name: str, spec: SweepSpec) -> None:
        """The sweep's view of the MLflow runs table (runs_page_url's `view`): trials as rows, by name, with their
        outcome, the searched values and the figures that compare them. MLflow keeps a shared view as an
        experiment tag; the UI opens it from the page's viewStateShareKey."""
        rungs = [f for f, _ in spec.sweep.scheduler.ranked(spec.sweep.objectives)] if spec.sweep.scheduler else []
        metrics = dict.fromkeys([*VIEW_COLUMNS, *(o.metric for o in spec.sweep.objectives), *rungs])
        columns = ["tags.`csc.outcome`", *(f"params.`{k}`" for k in spec.sweep.search),
                   *(f"metrics.`{m}`" for m in metrics)]
        state = {"selectedColumns": columns, "columnOrder": columns, "orderByKey": "tags.`mlflow.runName`",
                 "orderByAsc": True}
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + sweep_view(name), json.dumps(state))

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

    def log_metrics(self, key: str, step: int, metrics: dict[str, float], tags: dict[str, str],
                    since: int = 0) -> None:
        self._do(f"report of {self._names[key]}", self._log_metrics, key, step, metrics, tags, since)

    def trial_resolved(self, key: str, params: dict[str, Any]) -> None:
        self._do(f"resolved fields of {self._names[key]}", self._log_resolved, key, params)

    def _log_resolved(self, key: str, params: dict[str, Any]) -> None:
        run_id = self._runs[key]
        have = self.client.get_run(run_id).data.params  # a resumed run has them: MLflow refuses a changed param
        self._log_params(run_id, {k: v for k, v in flat_params(params).items() if k not in have})

    def trial_retried(self, key: str, tags: dict[str, str]) -> None:
        self._do(f"retry of {self._names[key]}", self._set_tags, key, tags)

    def trial_finished(self, key: str, outcome: str, tags: dict[str, str], artifacts: list[Path],
                       step: int) -> None:
        what = "failure of" if outcome == "failed" else "end of"
        self._do(f"{what} {self._names[key]}", self._finish, key, outcome, tags, artifacts, step)

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
            self._logged[run_id] = {m.step: m.value for m in history}
            self.client.update_run(run_id, status="RUNNING")
        else:
            self._delete_lost(name)
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
                **tags, "mlflow.parentRunId": self.parent_run_id, "csc.trial_id": key,
                "csc.sweep_dir": self.sweep_dir}).info.run_id
            self._log_params(run_id, params)
            self._logged[run_id] = {}
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

    def _log_metrics(self, key: str, step: int, metrics: dict[str, float], tags: dict[str, str],
                     since: int) -> None:
        from mlflow.entities import Metric

        run_id = self._runs[key]
        logged = self._logged[run_id]
        if since < step <= self._last_step(run_id) and logged.get(step) != metrics[STEP_METRIC]:
            run_id = self._rewind(key, step - 1)  # trained again from `since`, to other values: a new branch
            logged = self._logged[run_id]
        if step <= self._last_step(run_id):
            return  # reported again, as logged (trained again bit for bit, or restored from its final checkpoint)
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], tags=_tags(tags))
        logged[step] = metrics[STEP_METRIC]

    def _last_step(self, run_id: str) -> int:
        return max(self._logged[run_id], default=0)

    def _rewind(self, key: str, upto: int) -> str:
        """The run's points after step `upto` belong to a branch the trial's SAE did not continue: it went back
        to a checkpoint (after a killed driver or worker) and trained those steps again to other values (a GPU's
        bf16), or it ended at `upto` (a scheduler stopped a resumed trial earlier than the first run of it got).
        MLflow cannot delete metric points, so a new run takes the old one's params, tags and history up to `upto`,
        and the old run is deleted (restorable) with tag csc.discarded_branch. Returns the new run."""
        from mlflow.entities import Metric, Param

        old = self.client.get_run(self._runs[key])
        if half := self._half_made.pop(key, None):  # a rewind MLflow failed in the middle of
            self.client.delete_run(half)
        tags = {k: v for k, v in old.data.tags.items() if k == "mlflow.parentRunId" or not k.startswith("mlflow.")}
        trial_id = tags.pop("csc.trial_id")  # set last: until then a resumed driver finds the old run, not this one
        new = self.client.create_run(self.experiment_id, run_name=old.info.run_name, tags=tags).info.run_id
        self._half_made[key] = new
        params = [Param(k, v) for k, v in old.data.params.items()]
        for s in range(0, len(params), 100):
            self.client.log_batch(new, params=params[s:s + 100])
        kept = [Metric(m.key, m.value, m.timestamp, m.step) for name in old.data.metrics
                for m in self.client.get_metric_history(old.info.run_id, name) if m.step <= upto]
        for s in range(0, len(kept), 1000):
            self.client.log_batch(new, metrics=kept[s:s + 1000])
        last = self._last_step(old.info.run_id)
        self.client.log_batch(new, tags=_tags({"csc.trial_id": trial_id, "csc.rewound": (
            f"steps {upto + 1} to {last} of run {old.info.run_id} (deleted) were a branch this trial's SAE did not "
            f"continue; its history up to step {upto} was copied from there")}))
        if old.info.lifecycle_stage == "active":
            self.client.set_tag(old.info.run_id, "csc.discarded_branch",
                                f"steps {upto + 1} to {last} were a branch its trial left; its history is in run {new}")
            self.client.delete_run(old.info.run_id)
        del self._half_made[key]
        print(f"csc: {old.info.run_name}: steps {upto + 1} to {last} of its MLflow run were a branch its SAE did not "
              f"continue (it went back to a checkpoint when it restarted); its run is now {new}, with the SAE's own "
              f"history (the old run is deleted: `mlflow runs restore --run-id {old.info.run_id}`)", flush=True)
        self._runs[key] = new
        self._logged[new] = {m.step: m.value for m in kept if m.key == STEP_METRIC}
        return new

    def _set_tags(self, key: str, tags: dict[str, str]) -> None:
        self.client.log_batch(self._runs[key], tags=_tags(tags))

    def _finish(self, key: str, outcome: str, tags: dict[str, str], artifacts: list[Path], step: int) -> None:
        run_id = self._runs[key]
        if step < self._last_step(run_id):  # ended before steps an earlier run of it logged
            run_id = self._rewind(key, step)
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
