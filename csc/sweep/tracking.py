"""MLflow records of a sweep: one parent run per sweep, one nested child run per trial.

Only the driver writes to MLflow (trials report to Tune, this Tune callback turns reports into MLflow
calls), so a SQLite store never sees concurrent writers and trials need no tracking credentials.

A child run holds the trial's resolved sae/trainer fields as params, every report as metrics (step =
training step), and at the end: status FINISHED (trained all steps), KILLED with tag csc.outcome =
stopped_early and the reason in csc.stop_reason (the scheduler stopped it), or FAILED with the first
line of the error in csc.failure_reason and the whole traceback as error.txt. Its artifacts are the
exported SAE (sae/: safetensors + cfg.json, from the trial's last checkpoint), curves.png and, for
finished trials, eval.json; sae/, curves.png and error.txt are also kept in the trial's folder of the
sweep. If MLflow fails, calls wait in an ordered backlog until it answers again (see `_do`). Runs are
found again by the tag csc.trial_id, so a resumed sweep reuses them and never logs a step twice; a trial
that Tune retries after a failure (sweep.max_failures) keeps its run, tagged csc.retries and
csc.last_retry_reason.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from csc.pipeline import plots
from csc.sae.checkpoint import load_checkpoint
from csc.sae.export import export_saelens
from csc.sweep import report
from csc.sweep.spec import REPORT_METRICS, SweepSpec

LOGGED = (*REPORT_METRICS, "lr", "beta", "gamma", "tokens", "tokens_per_s")
TRIALS_FILE = "trials.json"
UNSENT_FILE = "mlflow_unsent.json"
STOPPED_FILE = "stopped_by_scheduler.txt"
END_WAIT_S = 60
"""How long the end of a sweep waits for MLflow to take the records it could not take before."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error reports for terminals


def trial_name(trial: Trial) -> str:
    """trial_<n>: n counts the sweep's trials from 1, in the order the searcher made them."""
    n = str(trial.experiment_tag).split("_", 1)[0]
    return f"trial_{int(n):02d}" if n.isdigit() else f"trial_{trial.trial_id}"


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow caps param values
    return out


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class RecordingASHA(ASHAScheduler):
    """ASHA that writes down which trials it stopped (one id per line in `record`, kept across resumes),
    so that a trial stopped because the sweep was interrupted is never reported as stopped early: Tune
    ends both the same way."""

    def __init__(self, record: str, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            with open(self.record, "a") as f:
                f.write(trial.trial_id + "\n")
        return decision


def stopped_by_scheduler(sweep_dir: str | Path) -> set[str]:
    path = Path(sweep_dir) / STOPPED_FILE
    return set(path.read_text().split()) if path.is_file() else set()


class MlflowTrials(Callback):
    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, spec_json: str, sweep_dir: str,
                 norm_scale: float):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.spec_json, self.sweep_dir, self.norm_scale = spec_json, sweep_dir, norm_scale
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._backlog: list[tuple[str, Any, tuple]] = []
        self._down = False

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; run ids are looked up again
        return {**{k: v for k, v in self.__dict__.items() if k != "_mlflow"}, "_runs": {}, "_last_step": {},
                "_backlog": [], "_down": False}

    @property
    def client(self):
        if "_mlflow" not in self.__dict__:
            self.__dict__["_mlflow"] = _client(self.uri)
        return self.__dict__["_mlflow"]

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate_json(self.spec_json)

    # ------------------------------------------------------------------ runs

    def run_id(self, trial: Trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`csc.trial_id` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        if found:
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, "loss")
            self._last_step[run_id] = max((m.step for m in history), default=0)
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=trial_name(trial), tags={
                "mlflow.parentRunId": self.parent_run_id, "csc.trial_id": trial.trial_id,
                "csc.sweep_dir": self.sweep_dir})
            run_id = run.info.run_id
            trial_spec = self.spec.trial(trial.config)
            params = flat_params({"sae": trial_spec.sae.model_dump(), "trainer": trial_spec.trainer.model_dump()})
            params.update({f"searched.{k}": str(v) for k, v in trial.config.items()})
            items = list(params.items())
            for s in range(0, len(items), 100):  # log_batch takes at most 100 params
                self.client.log_batch(run_id, params=[_param(k, v) for k, v in items[s:s + 100]])
            self._last_step[run_id] = 0
        self._runs[trial.trial_id] = run_id
        return run_id

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

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._do(f"start of {trial_name(trial)}", self.run_id, trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info):
        self._do(f"report of {trial_name(trial)}", self._log_result, trial, dict(result))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._do(f"end of {trial_name(trial)}", self._complete, trial, self.row(trial, Trial.TERMINATED))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._do(f"failure of {trial_name(trial)}", self._error, trial, self.row(trial, Trial.ERROR))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._do(f"retry of {trial_name(trial)}", self._recover, trial, trial.run_metadata.num_failures)

    def _recover(self, trial: Trial, failures: int) -> None:
        """Tune retries the trial from its last checkpoint: the same run goes on, and says so."""
        run_id = self.run_id(trial)
        text = _error_text(trial)
        self.client.set_tag(run_id, "csc.retries", str(failures))
        self.client.set_tag(run_id, "csc.last_retry_reason", error_reason(text)[:5000])

    def _log_result(self, trial: Trial, result: dict) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.run_id(trial)
        step = int(result.get("step", 0))
        if step <= self._last_step.get(run_id, 0):
            return  # reported again after a resume: MLflow already has it
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if (k in LOGGED or k.startswith("eval/")) and isinstance(v, (int, float))]
        tags = [RunTag("csc.node_id", result["node_id"])] if "node_id" in result else []  # where it trained last
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self._last_step[run_id] = step

    def _complete(self, trial: Trial, row: dict[str, Any]) -> None:
        run_id = self.run_id(trial)
        if row["outcome"] == "running":
            return  # the sweep is being interrupted: the run stays open for --resume
        self._artifacts(trial, run_id, row)
        if row["outcome"] == "finished":
            self.client.set_tag(run_id, "csc.outcome", "finished")
            self.client.set_terminated(run_id, "FINISHED")
        else:
            self.client.set_tag(run_id, "csc.outcome", "stopped_early")
            self.client.set_tag(run_id, "csc.stop_reason", row["reason"])
            self.client.set_terminated(run_id, "KILLED")

    def _error(self, trial: Trial, row: dict[str, Any]) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "csc.outcome", "failed")
        self.client.set_tag(run_id, "csc.failure_reason", row["reason"][:5000])
        text = _error_text(trial)
        if text:
            local = self._trial_dir(trial) / "error.txt"
            local.write_text(ANSI.sub("", text))
            self.client.log_artifact(run_id, str(local))
        self.client.set_terminated(run_id, "FAILED")

    def _trial_dir(self, trial: Trial) -> Path:
        """Where a trial's exported SAE and plots are kept, beside its checkpoints (and sent from)."""
        path = Path(self.sweep_dir) / trial_name(trial)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _artifacts(self, trial: Trial, run_id: str, row: dict[str, Any]) -> None:
        spec = self.spec.trial(trial.config)
        local = self._trial_dir(trial)
        if trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as d:
                trainer = load_checkpoint(Path(d))
                a = spec.activations
                export_saelens(trainer.model, local / "sae", model_name=spec.model.name,
                               hook_name=f"blocks.{a.layer}.hook_resid_post", hook_layer=a.layer,
                               norm_scale=self.norm_scale, context_size=a.context_length,
                               dataset_path=spec.corpus.source)
                self.client.log_artifacts(run_id, str(local / "sae"), "sae")
                if (Path(d) / "eval.json").is_file():
                    self.client.log_artifact(run_id, str(Path(d) / "eval.json"))
        history = self.history(run_id)
        if history:
            plots.training_curves(history, local / "curves.png",
                                  title=f"{row['trial']}: {', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in trial.config.items())}")
            self.client.log_artifact(run_id, str(local / "curves.png"))

    def history(self, run_id: str) -> list[dict[str, float]]:
        rows: dict[int, dict[str, float]] = {}
        for key in ("loss", "mse", "l1", "nce", "ev", "l0", "dead_frac", "beta", "gamma"):
            for m in self.client.get_metric_history(run_id, key):
                rows.setdefault(m.step, {"step": float(m.step)})[key] = m.value
        return [rows[s] for s in sorted(rows)]

    # ------------------------------------------------------------------ the sweep

    def row(self, trial: Trial, status: str | None = None) -> dict[str, Any]:
        """What the sweep's reports show of one trial (see csc.sweep.report). `status`: the one the trial
        is about to take (Tune calls on_trial_complete/on_trial_error before it sets it)."""
        status = status or trial.status
        spec = self.spec.trial(trial.config)
        last = trial.last_result or {}
        steps = int(last.get("step", 0))
        metrics = {k: float(v) for k, v in last.items()
                   if (k in LOGGED or k.startswith("eval/")) and isinstance(v, (int, float))}
        row = {"trial": trial_name(trial), "trial_id": trial.trial_id, "params": dict(trial.config),
               "dict_size": spec.sae.dict_size, "steps_done": steps, "steps_total": spec.trainer.steps,
               "metrics": metrics}
        if status == Trial.ERROR:
            text = _error_text(trial)
            row.update(outcome="failed", reason=error_reason(text))
        elif status == Trial.TERMINATED:
            if steps >= spec.trainer.steps:
                row["outcome"] = "finished"
            elif trial.trial_id not in stopped_by_scheduler(self.sweep_dir):
                row["outcome"] = "running"  # stopped by an interruption: --resume continues it
            else:
                asha = self.spec.sweep.scheduler
                row["outcome"] = "stopped_early"
                row["reason"] = (f"ASHA stopped it at step {steps} of {spec.trainer.steps}: {asha.metric} "
                                 f"{metrics.get(asha.metric, float('nan')):.4g} was not in the best "
                                 f"1/{asha.reduction_factor:g} of the trials at that rung") if asha else \
                    f"stopped at step {steps} of {spec.trainer.steps}"
        else:
            row["outcome"] = "running"
        return row

    def on_experiment_end(self, trials: list[Trial], **info):
        rows = [self.row(t) for t in trials]
        sweep_dir = Path(self.sweep_dir)
        (sweep_dir / TRIALS_FILE).write_text(json.dumps(rows, indent=1))
        report.write_trials_table(rows, sweep_dir / "trials.csv")
        report.pareto_plot(rows, sweep_dir / "pareto.png")
        report.progression_plot(rows, sweep_dir / "progression.png")
        for name in (TRIALS_FILE, "trials.csv", "pareto.png", "progression.png"):
            self._do("the sweep's reports", self.client.log_artifact, self.parent_run_id, str(sweep_dir / name))
        deadline = time.monotonic() + END_WAIT_S
        while self._backlog and time.monotonic() < deadline:  # give a restarting server a minute
            time.sleep(2)
            self._flush()
        unsent = sweep_dir / UNSENT_FILE
        unsent.unlink(missing_ok=True)
        if self._backlog:
            unsent.write_text(json.dumps([what for what, _, _ in self._backlog], indent=1))
            print(f"csc: MLflow still fails: {len(self._backlog)} records were not sent (listed in {unsent}); "
                  f"the data is in {sweep_dir} (trials.csv, each trial's result.json, checkpoints, sae/)", flush=True)


def _error_text(trial: Trial) -> str:
    """What Tune wrote of the trial's failures (empty when there is no error file)."""
    path = Path(trial.error_file) if trial.error_file else None
    return path.read_text() if path is not None and path.is_file() else ""


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def error_reason(text: str) -> str:
    """The last line that names an exception: Ray wraps the trial's error in its own report."""
    lines = [ln.strip() for ln in ANSI.sub("", text).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return named[-1] if named else (lines[-1] if lines else "unknown error")
