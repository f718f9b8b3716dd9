"""The sweep's scheduler: successive halving on the rung figures (csc.sweep.halving: MO-ASHA on several, ASHA on
one) as a Ray Tune scheduler, or FIFO when the spec has none.

Tune rebuilds a restored sweep's scheduler from the pickle it made at the start (tuner.pkl), without anything it
learnt since (ray-project/ray#30838), so this one keeps its decisions in the sweep folder (scheduler.jsonl: a
header, then one JSON line per decision, appended and flushed to disk before the decision is returned) and reads
them back when it is unpickled: every decision made before a driver died stands after --resume, and later trials
are compared with the records made before the kill. The log is appended to where it lies, in the sweep folder:
Tune copies a restored experiment's *.json and *.pkl files to a staging folder and later writes them back over the
sweep folder, which would put back a decision log as it was at the restore (a .jsonl file it leaves alone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from csc.sweep.halving import STOP, SuccessiveHalving, milestones
from csc.sweep.layout import SCHEDULER_FILE, trial_name
from csc.sweep.spec import SweepSpec


class RungScheduler(FIFOScheduler):
    """FIFO order of trials; at every result, `halving`'s decision (stop, or go on), kept in `path`."""

    def __init__(self, halving: SuccessiveHalving, path: str):
        super().__init__()
        self.halving, self.path = halving, path

    def __setstate__(self, state):
        self.__dict__.update(state)
        if Path(self.path).is_file():  # a restored sweep: its decisions, not the pickle's empty rungs
            self.halving = SuccessiveHalving.from_log(Path(self.path).read_text())

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        before = self.halving.last
        decision = self.halving.judge(trial_name(trial), int(result.get("step", 0)), result)
        if self.halving.last is not before:  # a new decision: on disk before Tune acts on it
            new = not Path(self.path).is_file()
            with open(self.path, "a") as log:
                log.write((self.halving.header() + "\n" if new else "") + json.dumps(vars(self.halving.last)) + "\n")
                log.flush()
                os.fsync(log.fileno())
        return TrialScheduler.STOP if decision == STOP else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return "Successive halving on " + ", ".join(f"{name} ({mode})" for name, mode in self.halving.figures)


def load_halving(sweep_dir: str | Path) -> SuccessiveHalving | None:
    """The scheduler's records in a sweep folder (None if the sweep has none: no scheduler, or no decision yet)."""
    path = Path(sweep_dir) / SCHEDULER_FILE
    return SuccessiveHalving.from_log(path.read_text()) if path.is_file() else None


def stop_reason(sweep_dir: str | Path, trial: str) -> str | None:
    """Why the scheduler stopped the trial named `trial` (its rung, figures and the trials ahead of it), or None if
    it did not (a trial ended by an interrupted sweep was not stopped by it)."""
    halving = load_halving(sweep_dir)
    return halving.stop_reason(trial) if halving else None


def scheduler(spec: SweepSpec, sweep_dir: Path) -> TrialScheduler:
    """The spec's successive halving (rungs on the training step, up to trainer.steps), else FIFO: no early stop."""
    s = spec.sweep.scheduler
    if s is None:
        return FIFOScheduler()
    halving = SuccessiveHalving(s.ranked(spec.sweep.objectives), s.grace_period, s.reduction_factor,
                                spec.trainer.steps, s.tie_break)
    return RungScheduler(halving, str(sweep_dir / SCHEDULER_FILE))


def scheduler_line(spec: SweepSpec) -> str:
    """The spec's early stopping in one line (for the dry run and the summary)."""
    s = spec.sweep.scheduler
    if s is None:
        return "no early stopping"
    rungs = milestones(s.grace_period, s.reduction_factor, spec.trainer.steps)
    figures = ", ".join(f"{name} ({mode})" for name, mode in s.ranked(spec.sweep.objectives))
    how = f"MO-ASHA on {figures}, ties by {s.tie_break.replace('_', ' ')}" if s.type == "mo-asha" else \
        f"ASHA on {figures}"
    return (f"{how}; rungs at step{'s' if len(rungs) > 1 else ''} {', '.join(map(str, rungs))} of "
            f"{spec.trainer.steps}, the top 1/{s.reduction_factor:g} of each continue")
