"""What `csc eval PATH` evaluates: the exported SAEs a path holds, each with the spec it was trained on.

PATH may be a run folder of `csc train` (or its sae/ subfolder), a trial folder of a sweep (the sweep's spec with the
trial's params.json), or a sweep folder (its finished trials, or the best N by the sweep's objectives).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from csc.config import TrainRunSpec
from csc.errors import CscError
from csc.pipeline.run import train_run_spec
from csc.sweep.outcomes import TRIALS_FILE
from csc.sweep.report import best_trials
from csc.sweep.run import STATE_FILE
from csc.sweep.spec import SweepSpec

PARAMS_FILE = "params.json"
"""Tune's file of a trial's searched values, in its trial folder."""


@dataclass
class SavedSae:
    name: str
    """What the output calls it: the run folder, or the sweep and trial."""
    spec: TrainRunSpec
    """The spec it was trained on (its held-out data, model and layer)."""
    sae_dir: Path
    """The exported SAE (cfg.json + sae_weights.safetensors)."""


def _sweep_spec(sweep_dir: Path) -> SweepSpec:
    return SweepSpec.model_validate(json.loads((sweep_dir / STATE_FILE).read_text())["spec"])


def _trial(sweep_dir: Path, spec: SweepSpec, trial_dir: Path) -> SavedSae:
    if not (trial_dir / "sae" / "cfg.json").is_file():
        raise CscError(f"{trial_dir}: the trial has no exported SAE (sae/cfg.json): it did not finish; "
                       f"`csc report {sweep_dir}` lists the finished trials")
    params = json.loads((trial_dir / PARAMS_FILE).read_text()) if (trial_dir / PARAMS_FILE).is_file() else {}
    return SavedSae(f"{sweep_dir.name}/{trial_dir.name}", spec.trial(params), trial_dir / "sae")


def saved_saes(path: Path, best: int | None = None) -> list[SavedSae]:
    """The SAEs under `path` (module docstring); `best`: only the best N trials of a sweep folder."""
    if best is not None and best < 1:
        raise CscError(f"--best {best}: give a number of trials, at least 1")
    if not path.exists():
        raise CscError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CscError(f"{path}: not a folder; give a run folder of `csc train`, a sweep folder or one of its trials")
    if (path / STATE_FILE).is_file():
        spec = _sweep_spec(path)
        rows = json.loads((path / TRIALS_FILE).read_text()) if (path / TRIALS_FILE).is_file() else []
        finished = sorted((r for r in rows if r["outcome"] == "finished"), key=lambda r: r["trial"])
        if best is not None:
            finished = best_trials(finished, [(o.metric, o.mode) for o in spec.sweep.objectives], n=best)[:best]
        if not finished:
            raise CscError(f"{path}: the sweep has no finished trial to evaluate")
        return [_trial(path, spec, path / r["trial"]) for r in finished]
    if best is not None:
        raise CscError(f"--best {best}: {path} is not a sweep folder (no {STATE_FILE})")
    for trial_dir in (path, path.parent):  # a trial folder, or its sae/ subfolder
        if (trial_dir.parent / STATE_FILE).is_file() and (trial_dir / PARAMS_FILE).is_file():
            return [_trial(trial_dir.parent, _sweep_spec(trial_dir.parent), trial_dir)]
    found = train_run_spec(path)
    if found is not None:
        spec, sae_dir = found
        return [SavedSae(str(path), spec, sae_dir)]
    raise CscError(f"{path}: not an SAE folder csc knows: expected a run folder of `csc train` (spec.json and sae/), a "
                   f"sweep folder ({STATE_FILE}) or one of its trial folders ({PARAMS_FILE} and sae/)")
