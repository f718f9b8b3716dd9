"""What Optuna is told, on real sweeps of the tiny model (real Ray, untracked): held-out objectives, a trial ASHA
stopped told as pruned and a failed one as failed; each configuration over two seeds told once, as the mean over
them, and its mean and spread in the sweep's reports."""

import csv
import json
import pickle
import statistics
from pathlib import Path

import pytest
import ray
from optuna.trial import TrialState

from csc.cli import main
from csc.spec_loader import load_spec
from csc.pipeline.absorption import SAE_FIGURES
from csc.sweep.reported import held_out
from csc.sweep.run import STATE_FILE, run_sweep
from csc.sweep.spec import SweepSpec
from tests.test_sweep import tiny_sweep

OBJECTIVES = [{"metric": "eval/explained_variance", "mode": "max"}, {"metric": "eval/l0", "mode": "min"}]
GOOD = {"trainer.beta": 0.001, "trainer.lr": 1e-3}
WORSE = {"trainer.beta": 0.01, "trainer.lr": 3e-4}  # reconstructs worse at step 10: ASHA stops it
DIVERGES = {"trainer.beta": 0.005, "trainer.lr": 1e20}  # outside the searched range; diverges at step 2


def study(sweep_dir: Path):
    """Optuna's study as the sweep left it (Tune keeps the searcher's state in the sweep folder for --resume)."""
    (path,) = sweep_dir.glob("searcher-state-*.pkl")
    return pickle.loads(path.read_bytes())["_ot_study"]


def table(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r[next(iter(r))]: r for r in csv.DictReader(f)}


@pytest.fixture
def sweep(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(**fields):
        spec = load_spec(SweepSpec, tiny_sweep(tmp_path, cache, objectives=OBJECTIVES, **fields))
        return run_sweep(spec, "tiny", tmp_path / "runs", verbose=0, tracked=False)

    yield run
    ray.shutdown()


def test_held_out_objectives_a_stopped_trial_pruned_a_failed_one_failed(sweep, capsys):
    result = sweep(num_samples=3, points_to_evaluate=[GOOD, WORSE, DIVERGES])
    rows = {r["trial"]: r for r in result.rows}
    assert [rows[t]["outcome"] for t in sorted(rows)] == ["finished", "stopped_early", "failed"]
    done = rows["trial_01"]["metrics"]
    spec = SweepSpec.model_validate(json.loads((result.sweep_dir / STATE_FILE).read_text())["spec"])
    reported = held_out(spec.corpus, spec.eval)
    assert "eval/probe_seq_sae_top_1" in reported, "the embedded corpus has the sequence task"
    # The tiny LM's letter probe finds no letter, so absorption reports only absorption_letters (and the sweep
    # would refuse an absorption objective at its start, csc/sweep/run.py); every other figure is there.
    assert "eval/absorption_letters" in done and not {f"eval/{k}" for k in SAE_FIGURES} & set(done)
    assert reported - {f"eval/{k}" for k in SAE_FIGURES} <= set(done), \
        "a finished trial reports every held-out figure its spec may optimise"

    trials = study(result.sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].values == [done["eval/explained_variance"], done["eval/l0"]]
    assert trials[1].values is None and not trials[1].intermediate_values  # not its rung's training figures
    assert "ev" in rows["trial_02"]["metrics"] and "eval/l0" not in rows["trial_02"]["metrics"]

    capsys.readouterr()
    assert main(["report", str(result.sweep_dir)]) == 0
    summary = capsys.readouterr().out
    assert "best trials (eval/explained_variance max, eval/l0 min; the Pareto set):" in summary
    best = summary.split("the Pareto set):")[1].split("early stopping:")[0]
    assert "\ntrial_01" in best and "trial_02" not in best  # a trial stopped early has no held-out figures


def test_seeds_give_each_configuration_one_value_and_a_spread(sweep, capsys):
    # Two trials at once (no scheduler here to depend on their order): each configuration's seeds run side by side.
    result = sweep(num_samples=2, seeds=2, scheduler=None, max_concurrent=2, points_to_evaluate=[GOOD, DIVERGES])
    rows = result.rows
    assert [(r["trial"], r["params"], r["config"], r["outcome"]) for r in rows] == [
        ("trial_01", {**GOOD, "trainer.seed": 0}, "config_01", "finished"),
        ("trial_02", {**GOOD, "trainer.seed": 1}, "config_01", "finished"),
        ("trial_03", {**DIVERGES, "trainer.seed": 0}, "config_02", "failed"),
        ("trial_04", {**DIVERGES, "trainer.seed": 1}, "config_02", "failed")]
    ev = [r["metrics"]["eval/explained_variance"] for r in rows[:2]]
    l0 = [r["metrics"]["eval/l0"] for r in rows[:2]]
    assert ev[0] != ev[1], "the seeds start two different SAEs"

    sweep_dir = result.sweep_dir
    configs = table(sweep_dir / "configs.csv")
    good = configs["config_01"]
    assert (good["outcome"], good["seeds"], good["finished"], good["trials"]) == ("finished", "2", "2",
                                                                                  "trial_01 trial_02")
    assert float(good["eval/explained_variance mean"]) == pytest.approx(statistics.fmean(ev))
    assert float(good["eval/explained_variance std"]) == pytest.approx(statistics.stdev(ev))
    assert float(good["eval/l0 mean"]) == pytest.approx(statistics.fmean(l0))
    assert (configs["config_02"]["outcome"], configs["config_02"]["finished"]) == ("failed", "0")
    assert table(sweep_dir / "trials.csv")["trial_02"]["config"] == "config_01"

    trials = study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]  # one Optuna trial per configuration
    assert trials[0].values == pytest.approx([statistics.fmean(ev), statistics.fmean(l0)])

    capsys.readouterr()
    assert main(["report", str(sweep_dir)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("sweep 'tiny': 4 of 4 trials (2 configurations x 2 seeds): 2 finished, 2 failed")
    assert "best configurations (eval/explained_variance max, eval/l0 min; the Pareto set; mean ± std over their " \
           "seeds):" in summary
    line = next(ln for ln in summary.splitlines() if ln.startswith("config_01"))
    assert line.split()[:3] == ["config_01", "2", "finished"] and f"± {statistics.stdev(ev):.2g}" in line
    assert "configs.csv" in summary
