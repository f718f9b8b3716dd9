"""What `csc eval PATH` evaluates: the SAEs a path holds, each with the spec to measure it with.

PATH may be a run folder of `csc train` (or its sae/ subfolder), a trial folder of a sweep (the sweep's spec with the
trial's params.json), a sweep folder (its finished trials, or the best N by the sweep's objectives), or any other
folder in SAELens's layout (cfg.json + sae_weights.safetensors, written by SAELens itself or by csc): that one is
measured with the spec given (default: built-in defaults), its model and layer taken from cfg.json's model_name and
hook_name unless the spec or a --set gives them. `--set` changes the spec of every SAE (e.g. eval.ce_contexts=64).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csc.activations.models import check_model_spec
from csc.config import TrainRunSpec
from csc.errors import CscError, InputError, SpecError
from csc.pipeline import dashboard
from csc.pipeline.run import train_run_spec
from csc.sae.config import parse_sae_config
from csc.sae.export import CFG_FILE, WEIGHTS_FILE
from csc.sae.saelens_folder import read_saelens_folder
from csc.spec_loader import load_spec
from csc.sweep.layout import STATE_FILE, TRIALS_FILE
from csc.sweep.report import best_trials
from csc.sweep.spec import SweepSpec

PARAMS_FILE = "params.json"
"""Tune's file of a trial's searched values, in its trial folder."""


@dataclass
class SavedSae:
    name: str
    """What the output calls it: the run folder, the sweep and trial, or the SAELens folder."""
    spec: TrainRunSpec
    """The spec it is measured with: held-out data, model, layer and eval settings."""
    sae_dir: Path
    """The SAE folder (cfg.json + sae_weights.safetensors)."""
    dashboard: Path
    """Where its feature dashboard is written."""
    trained_on_spec: bool = True
    """csc trained it on `spec`'s activations (else: a folder in SAELens's layout, read on raw activations)."""


def _csc_saved(name: str, spec: TrainRunSpec, sae_dir: Path, overrides: list[str]) -> SavedSae:
    if overrides:
        spec = load_spec(TrainRunSpec, None, overrides, base=(f"{name}'s spec", spec.model_dump(mode="json")))
    return SavedSae(name, spec, sae_dir, sae_dir.parent / dashboard.FILE)


def _sweep_spec(sweep_dir: Path) -> SweepSpec:
    return SweepSpec.model_validate(json.loads((sweep_dir / STATE_FILE).read_text())["spec"])


def _trial(sweep_dir: Path, spec: SweepSpec, trial_dir: Path, overrides: list[str]) -> SavedSae:
    if not (trial_dir / "sae" / "cfg.json").is_file():
        raise CscError(f"{trial_dir}: the trial has no exported SAE (sae/cfg.json): it did not finish; "
                       f"`csc report {sweep_dir}` lists the finished trials")
    params = json.loads((trial_dir / PARAMS_FILE).read_text()) if (trial_dir / PARAMS_FILE).is_file() else {}
    return _csc_saved(f"{sweep_dir.name}/{trial_dir.name}", spec.trial(params), trial_dir / "sae", overrides)


def _saelens(sae_dir: Path, spec_path: str | None, overrides: list[str]) -> SavedSae:
    """A SAELens-layout folder, measured with `spec_path` (or defaults) and the hook point of its cfg.json."""
    folder = read_saelens_folder(sae_dir)
    cfg = sae_dir / CFG_FILE
    if folder.hook_name is not None and folder.layer is None:
        raise InputError(f"{cfg}: hook_name {folder.hook_name!r}: csc reads the residual stream after a block "
                         f"(blocks.N.hook_resid_post, or blocks.N.hook_resid_pre: the stream after block N - 1)")
    base: dict[str, Any] = {"sae": {"dict_size": folder.sae_config["dict_size"]}, "trainer": {"steps": 1}}
    if folder.model_name is not None:
        base["model"] = {"name": folder.model_name}
    if folder.layer is not None:
        base["activations"] = {"layer": folder.layer}
    spec = load_spec(TrainRunSpec, spec_path, overrides, part_of=SweepSpec, base=(str(cfg), base))
    for section, field, key in (("model", "name", "model_name"), ("activations", "layer", "hook_name")):
        if field not in getattr(spec, section).model_fields_set:
            raise SpecError(f"{cfg} has no {key}: give the SAE's {section}.{field} with --set {section}.{field}=...")
    if spec.model.name == folder.model_name:
        try:
            check_model_spec(spec.model)
        except InputError as e:
            raise InputError(f"{cfg}: model_name {folder.model_name!r} is the model csc would measure the SAE on, "
                             f"and it cannot be loaded. SAELens names models as TransformerLens does: give the "
                             f"Hugging Face id or a local folder with --set model.name=... ({e})") from None
    # The SAE is the folder's, whatever the spec's sae section says (its held-out InfoNCE reads the trainer's).
    spec = spec.model_copy(update={"sae": parse_sae_config(folder.sae_config)})
    return SavedSae(str(sae_dir), spec, sae_dir, sae_dir / dashboard.FILE, trained_on_spec=False)


def saved_saes(path: Path, best: int | None = None, spec_path: str | None = None,
               overrides: list[str] | None = None) -> list[SavedSae]:
    """The SAEs under `path` (module docstring); `best`: only the best N trials of a sweep folder; `spec_path`: the
    spec of a SAELens-layout folder; `overrides`: --set for every SAE's spec."""
    overrides = overrides or []
    if best is not None and best < 1:
        raise CscError(f"--best {best}: give a number of trials, at least 1")
    if not path.exists():
        raise CscError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CscError(f"{path}: not a folder; give a run folder of `csc train`, a sweep folder, one of its trials, "
                       f"or a SAELens SAE folder")
    found: list[SavedSae] = []
    if (path / STATE_FILE).is_file():
        spec = _sweep_spec(path)
        rows = json.loads((path / TRIALS_FILE).read_text()) if (path / TRIALS_FILE).is_file() else []
        finished = sorted((r for r in rows if r["outcome"] == "finished"), key=lambda r: r["trial"])
        if best is not None:
            finished = best_trials(finished, [(o.metric, o.mode) for o in spec.sweep.objectives], n=best)[:best]
        if not finished:
            raise CscError(f"{path}: the sweep has no finished trial to evaluate")
        found = [_trial(path, spec, path / r["trial"], overrides) for r in finished]
    elif best is not None:
        raise CscError(f"--best {best}: {path} is not a sweep folder (no {STATE_FILE})")
    else:
        for trial_dir in (path, path.parent):  # a trial folder, or its sae/ subfolder
            if (trial_dir.parent / STATE_FILE).is_file() and (trial_dir / PARAMS_FILE).is_file():
                found = [_trial(trial_dir.parent, _sweep_spec(trial_dir.parent), trial_dir, overrides)]
                break
        else:
            run = train_run_spec(path)
            if run is not None:
                found = [_csc_saved(str(path), *run, overrides)]
    if found:
        if spec_path is not None:
            raise SpecError(f"--spec {spec_path}: {path} holds SAEs csc trained, each measured with the spec it was "
                            f"trained on; change that spec with --set")
        return found
    if (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return [_saelens(path, spec_path, overrides)]
    raise CscError(f"{path}: not an SAE folder csc knows: expected a run folder of `csc train` (spec.json and sae/), a "
                   f"sweep folder ({STATE_FILE}), one of its trial folders ({PARAMS_FILE} and sae/), or a SAELens SAE "
                   f"folder ({CFG_FILE} and {WEIGHTS_FILE})")
