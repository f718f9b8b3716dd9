"""Where a sweep's records go besides its folder: a tracker (csc.sweep.tracking.mlflow is the one csc has).

The sweep folder never depends on a tracker: csc.sweep.outcomes writes every trial's artifacts and the
sweep's reports there first, then hands the tracker what it should record. The driver alone calls a tracker
(Tune callbacks and csc.sweep.run), so trials need no tracking credentials. A tracker must not fail the
sweep: one whose store is down keeps its records and sends them when it answers again.

Tune pickles its callbacks, and so the tracker, into the sweep folder (restored by --resume): a tracker
pickles its settings and ids, never a live client or records in flight, and finds its records again by the
ids it was given (start_sweep's, the trials' keys). Tags are named `csc.*`: the callers choose them,
trackers record them as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from csc.sweep.spec import SweepSpec


class Tracker(Protocol):
    name: str
    """How messages call it ("MLflow")."""

    def start_sweep(self, name: str, sweep_dir: str, spec: SweepSpec,
                    resume: dict[str, Any] | None = None) -> dict[str, str]:
        """Open the sweep's record and record its spec; returns the ids that find it again, which the
        sweep's state file keeps; `resume`: that state (--resume), to reopen the same record."""

    def trial_started(self, key: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        """Open the record of trial `key` (Tune's trial id; `name`: trial_NN), with its params (nested
        sections, each field once) and tags, or reopen it if a previous run of the sweep made it. Called once per
        trial and driver process, before any other call about that trial."""

    def log_metrics(self, key: str, step: int, metrics: dict[str, float], tags: dict[str, str],
                    since: int = 0) -> None:
        """One report of the trial at training step `step`; `since`: the step of the checkpoint the trial's
        process started from (0: from the start). A resumed or retried trial reports again the steps it trains
        again from its checkpoint: one already recorded with the same value is not recorded twice; one with
        another value means the steps recorded after `since` belong to a branch the SAE did not continue, and they
        leave the record's history."""

    def trial_resolved(self, key: str, params: dict[str, Any]) -> None:
        """Fields the trial settled where it runs (dotted names: sae.d_in, trainer.device, trainer.autocast as
        used), from its first report: recorded with its params, once."""

    def trial_retried(self, key: str, tags: dict[str, str]) -> None:
        """Tune retries the trial from its last checkpoint after a failure: the same record goes on."""

    def trial_finished(self, key: str, outcome: str, tags: dict[str, str], artifacts: list[Path],
                       step: int) -> None:
        """The trial ended at training step `step`: outcome finished, stopped_early or failed; `artifacts`: files
        and folders to keep with it, each under its own name. Steps recorded after `step` (by a run of the
        trial before a resume) leave the record's history."""

    def sweep_artifacts(self, paths: list[Path]) -> None:
        """The sweep's reports: the trials' last record, after which whatever the tracker still holds is
        sent (waiting a while for a store that is down) or listed in the sweep folder as unsent."""

    def end_sweep(self, status: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Close the sweep's record: status finished, interrupted (--resume continues it) or failed. Raises
        if it cannot, after retries of its own."""


def tracker_for(spec: SweepSpec, state: dict[str, Any] | None = None) -> Tracker | None:
    """The tracker of a new sweep: MLflow, where spec.sweep.tracking says; or, given its state file (--resume),
    the one the sweep started with (None if it ran untracked), for start_sweep to reopen."""
    from csc.sweep.tracking.mlflow import MlflowTracker

    return MlflowTracker.of(spec, state)
