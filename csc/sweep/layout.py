"""The names in a sweep folder, in a module without Ray, so that what only reads a sweep folder (`csc eval`,
`csc report`, the benchmarks) need not import Tune."""

from __future__ import annotations

from typing import Any

STATE_FILE = "csc_sweep.json"
"""The resolved spec, where the tracker records the sweep, and at the end the producer's counters."""
TRIALS_FILE = "trials.json"
"""One row per trial (csc.sweep.outcomes.trial_row): what `csc report` reads."""
SCHEDULER_FILE = "scheduler.jsonl"
"""Every decision the scheduler made, one JSON line each after a header of its settings
(csc.sweep.halving.SuccessiveHalving.log). Not *.json: Tune writes a restored sweep's *.json files back over the
sweep folder as they were at the restore (csc.sweep.scheduler)."""


def trial_name(trial: Any) -> str:
    """trial_<n> for a Tune Trial: n counts the sweep's trials from 1, in the order the searcher made them."""
    n = str(trial.experiment_tag).split("_", 1)[0]
    return f"trial_{int(n):02d}" if n.isdigit() else f"trial_{trial.trial_id}"
