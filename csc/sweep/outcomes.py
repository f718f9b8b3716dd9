"""What a sweep keeps of its trials, in its folder, with or without a tracker.

A Tune callback (TrialRecords, on the driver) writes, as trials end:
    trial_NN/sae/        the SAE of the trial's last checkpoint (finished and stopped-early trials), exported
                         in SAELens layout by the trial itself (the checkpoint's sae/)
    trial_NN/curves.png  its training curves, from every report it made (Tune's result.json)
    trial_NN/dashboard.html
                         a finished trial's feature dashboard (csc.pipeline.dashboard), made by the trial
    trial_NN/density.png a finished trial's feature-density histogram on held-out tokens (drawn here from the
                         trial's density.json)
    trial_NN/error.txt   a failed trial's traceback
and, when the sweep ends, its reports (csc.sweep.report): trials.json (what `csc report` reads), trials.csv,
pareto.png, progression.png and, where configurations ran over several seeds, configs.json and configs.csv (each
configuration's mean and spread over its seeds). Each of those, and the scheduler's decisions (scheduler.jsonl,
csc.sweep.scheduler) where it made any, is then handed to the tracker, if the sweep has one (csc.sweep.tracking);
the files never wait for it.

A trial's outcome: finished (trained all its steps), stopped_early (the scheduler stopped it, see
csc.sweep.scheduler), failed (the reason is the error's line), or running (not ended, or ended by an
interrupted sweep: --resume continues it). Its metrics are every number it reported, whatever loss terms
the trainer has, except Tune's own bookkeeping.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ray.air.constants import EXPR_RESULT_FILE
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT, TRIAL_ID

from csc.pipeline import dashboard, plots
from csc.sae.metrics import DensityHistogram
from csc.sweep import report
from csc.sweep.layout import SCHEDULER_FILE, TRIALS_FILE, trial_name
from csc.sweep.scheduler import stop_reason
from csc.sweep.spec import SweepSpec
from csc.sweep.tracking import Tracker
from csc.sweep.trial import DENSITY_FILE, RESOLVED, RESOLVED_FIELDS, SINCE

REPORTS = (TRIALS_FILE, "trials.csv", "pareto.png", "progression.png")
CONFIGS_FILE = "configs.json"
CONFIG_REPORTS = (CONFIGS_FILE, "configs.csv")
"""Written where configurations ran over several seeds: one row per configuration, mean and spread over them."""
NOT_METRICS = frozenset((*AUTO_RESULT_KEYS, *DEBUG_METRICS, DONE, SHOULD_CHECKPOINT, EXPERIMENT_TAG, TRIAL_ID, "step",
                         SINCE))
"""Keys of a Tune result that are not the trial's figures: what Tune adds to every report, and the step
(the x axis of every figure)."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error reports for terminals


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The figures of one report: every number the trial reported, Tune's bookkeeping and the step left out."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def reported_history(trial_dir: Path) -> list[dict[str, float]]:
    """Every report of a trial, one row per step ({"step": s, **metrics}), from the result file Tune keeps in its
    folder on the driver (restored with the sweep on --resume). As in the tracker, a restart from a checkpoint that
    trains steps already reported again replaces the reports after the checkpoint, the branch the SAE left."""
    path = trial_dir / EXPR_RESULT_FILE
    rows: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines() if path.is_file() else ():
        if line.strip():
            result = json.loads(line)
            step, since = int(result.get("step", 0)), int(result.get(SINCE, 0))
            if since < step <= max(rows, default=0):
                rows = {s: row for s, row in rows.items() if s <= since}
            rows.setdefault(step, {"step": float(step), **metrics_of(result)})
    return [rows[s] for s in sorted(rows)]


def error_reason(text: str) -> str:
    """The last line that names an exception: Ray wraps the trial's error in its own report."""
    lines = [ln.strip() for ln in ANSI.sub("", text).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return named[-1] if named else (lines[-1] if lines else "unknown error")


def _error_text(trial: Trial) -> str:
    """What Tune wrote of the trial's failures (empty when there is no error file)."""
    path = Path(trial.error_file) if trial.error_file else None
    return path.read_text() if path is not None and path.is_file() else ""


def trial_row(trial: Trial, spec: SweepSpec, sweep_dir: str | Path, status: str | None = None) -> dict[str, Any]:
    """What the sweep's reports show of one trial (see csc.sweep.report). `status`: the one the trial is about
    to take (Tune calls on_trial_complete/on_trial_error before it sets it)."""
    status = status or trial.status
    trial_spec = spec.trial(trial.config)
    total = trial_spec.trainer.steps
    last = trial.last_result or {}
    steps = int(last.get("step", 0))
    metrics = metrics_of(last)
    row = {"trial": trial_name(trial), "trial_id": trial.trial_id, "params": dict(trial.config),
           "dict_size": trial_spec.sae.dict_size, "steps_done": steps, "steps_total": total, "metrics": metrics}
    if status == Trial.ERROR:
        row.update(outcome="failed", reason=error_reason(_error_text(trial)))
    elif status == Trial.TERMINATED:
        if steps >= total:
            row["outcome"] = "finished"
        elif (reason := stop_reason(sweep_dir, row["trial"])) is None:
            row["outcome"] = "running"  # stopped by an interruption: --resume continues it
        else:
            row.update(outcome="stopped_early", reason=reason)
    else:
        row["outcome"] = "running"
    return row


def write_reports(rows: list[dict[str, Any]], sweep_dir: Path, objectives: list[tuple[str, str]] | None = None
                  ) -> list[Path]:
    """The sweep's reports from its trial rows (pareto.png with its `objectives`); returns their paths (REPORTS, in
    order, then CONFIG_REPORTS where configurations ran over several seeds: each trial row then names its
    configuration)."""
    configs = report.configurations(rows)
    repeated = report.repeated(configs)
    if repeated:
        config_of = {t: c["config"] for c in configs for t in c["trials"]}
        rows = [{**r, "config": config_of[r["trial"]]} for r in rows]
    (sweep_dir / TRIALS_FILE).write_text(json.dumps(rows, indent=1))
    report.write_trials_table(rows, sweep_dir / "trials.csv")
    report.pareto_plot(rows, sweep_dir / "pareto.png", objectives)
    report.progression_plot(rows, sweep_dir / "progression.png")
    if not repeated:
        return [sweep_dir / name for name in REPORTS]
    (sweep_dir / CONFIGS_FILE).write_text(json.dumps(configs, indent=1))
    report.write_configs_table(configs, sweep_dir / "configs.csv")
    return [sweep_dir / name for name in REPORTS + CONFIG_REPORTS]


class TrialRecords(Callback):
    """Keeps each trial's artifacts and the sweep's reports in the sweep folder, and hands every record to
    `tracker` (None: the folder alone). Only the driver runs it."""

    def __init__(self, spec_json: str, sweep_dir: str, tracker: Tracker | None = None):
        self.spec_json, self.sweep_dir, self.tracker = spec_json, sweep_dir, tracker
        self._told: set[str] = set()
        self._resolved: set[str] = set()

    def __getstate__(self):  # Tune pickles its callbacks; a restored tracker is told of its trials again
        return {**self.__dict__, "_told": set(), "_resolved": set()}

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate_json(self.spec_json)

    def row(self, trial: Trial, status: str | None = None) -> dict[str, Any]:
        return trial_row(trial, self.spec, self.sweep_dir, status)

    def _tracker(self, trial: Trial) -> Tracker | None:
        """The tracker, once told of the trial (once per driver process, before anything else about it)."""
        if self.tracker is not None and trial.trial_id not in self._told:
            self._told.add(trial.trial_id)
            spec = self.spec.trial(trial.config)
            # each field once, at the trial's value (which of them the sweep searched is a tag); those the trial
            # resolves where it runs come with its first report
            fields = {"sae": spec.sae.model_dump(), "trainer": spec.trainer.model_dump()}
            for dotted in RESOLVED_FIELDS:
                section, name = dotted.split(".")
                del fields[section][name]
            self.tracker.trial_started(trial.trial_id, trial_name(trial), fields,
                                       {"csc.searched": ", ".join(trial.config)})
        return self.tracker

    def _trial_dir(self, trial: Trial) -> Path:
        """Where a trial's exported SAE and plots are kept, beside its checkpoints."""
        path = Path(self.sweep_dir) / trial_name(trial)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self._tracker(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info):
        if tracker := self._tracker(trial):
            if RESOLVED in result and trial.trial_id not in self._resolved:
                self._resolved.add(trial.trial_id)
                tracker.trial_resolved(trial.trial_id, json.loads(result[RESOLVED]))
            tags = {"csc.node_id": str(result["node_id"])} if "node_id" in result else {}  # where it trained last
            tracker.log_metrics(trial.trial_id, int(result.get("step", 0)), metrics_of(result), tags,
                                since=int(result.get(SINCE, 0)))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        row = self.row(trial, Trial.TERMINATED)
        if row["outcome"] == "running":
            return  # the sweep is being interrupted: the trial goes on with --resume
        kept = self._keep(trial, row)
        if tracker := self._tracker(trial):
            tracker.trial_finished(trial.trial_id, row["outcome"],
                                   {"csc.stop_reason": row["reason"]} if "reason" in row else {}, kept,
                                   int(trial.last_result.get("step", 0)))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        row = self.row(trial, Trial.ERROR)
        kept, text = [], ANSI.sub("", _error_text(trial))
        if text:
            # Tune's own error.txt (coloured for terminals) is copied over the trial folder's when Tune syncs
            # the trial to storage: both get the plain text, so the folder and the tracker keep the same.
            Path(trial.error_file).write_text(text)
            path = self._trial_dir(trial) / "error.txt"
            path.write_text(text)
            kept.append(path)
        if tracker := self._tracker(trial):
            tracker.trial_finished(trial.trial_id, "failed", {"csc.failure_reason": row["reason"]}, kept,
                                   int(trial.last_result.get("step", 0)))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        """Tune retries the trial from its last checkpoint: its record goes on, and says so."""
        if tracker := self._tracker(trial):
            tracker.trial_retried(trial.trial_id, {"csc.retries": str(trial.run_metadata.num_failures),
                                                   "csc.last_retry_reason": error_reason(_error_text(trial))})

    def _keep(self, trial: Trial, row: dict[str, Any]) -> list[Path]:
        """The SAE of the trial's last checkpoint, its curves and (finished) its dashboard, in its folder; returns
        what the tracker keeps: those and the held-out figures (eval.json, from the final checkpoint, on the sweep's
        storage)."""
        local, kept = self._trial_dir(trial), []
        if trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as d:
                if (Path(d) / "sae").is_dir():
                    shutil.copytree(Path(d) / "sae", local / "sae", dirs_exist_ok=True)
                    kept.append(local / "sae")
                if (Path(d) / "eval.json").is_file():
                    kept.append(Path(d) / "eval.json")
                if (Path(d) / dashboard.FILE).is_file():
                    shutil.copy2(Path(d) / dashboard.FILE, local / dashboard.FILE)
                    kept.append(local / dashboard.FILE)
                if (Path(d) / DENSITY_FILE).is_file():
                    hist = DensityHistogram.from_json((Path(d) / DENSITY_FILE).read_text())
                    plots.density_histogram(hist, local / "density.png",
                                            title=f"{row['trial']}: dictionary {row['dict_size']}")
                    kept.append(local / "density.png")
        history = reported_history(Path(trial.local_path))
        if history:
            title = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
            plots.training_curves(history, local / "curves.png", title=f"{row['trial']}: {title}")
            kept.append(local / "curves.png")
        return kept

    def on_experiment_end(self, trials: list[Trial], **info):
        paths = write_reports([self.row(t) for t in trials], Path(self.sweep_dir),
                              [(o.metric, o.mode) for o in self.spec.sweep.objectives])
        decisions = Path(self.sweep_dir) / SCHEDULER_FILE
        if decisions.is_file():  # every rung decision, on the parent run too
            paths.append(decisions)
        if self.tracker is not None:
            self.tracker.sweep_artifacts(paths)
