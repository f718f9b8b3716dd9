"""The sweep's scheduler: ASHA that writes down the trials it stops (so that outcomes can tell a trial stopped
early from one stopped by an interrupted sweep: Tune ends both the same way), or FIFO when the spec has none."""

from __future__ import annotations

from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from csc.sweep.spec import SweepSpec

STOPPED_FILE = "stopped_by_scheduler.txt"


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


def scheduler(spec: SweepSpec, sweep_dir: Path) -> TrialScheduler:
    """The spec's ASHA (rungs on the training step, up to trainer.steps), else FIFO: no early stop."""
    a = spec.sweep.scheduler
    if a is None:
        return FIFOScheduler()
    return RecordingASHA(str(sweep_dir / STOPPED_FILE), time_attr="step", metric=a.metric, mode=a.mode,
                         max_t=spec.trainer.steps, grace_period=a.grace_period, reduction_factor=a.reduction_factor)
