"""The sweep's Tune scheduler (csc.sweep.scheduler) between Tune's real Trial objects and a sweep folder: decisions
kept on disk before Tune acts on them, and a scheduler restored as Tune restores it (from the pickle made when the
sweep started) going on from those records. tests/test_sweep_faults.py does the same through a real kill -9."""

import json
import pickle

import pytest
import yaml
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from csc.spec_loader import load_spec
from csc.sweep.layout import SCHEDULER_FILE
from csc.sweep.scheduler import RungScheduler, load_halving, scheduler, stop_reason
from csc.sweep.spec import SweepSpec
from tests.test_sweep_spec import BASE, write

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _trial(n: int) -> Trial:
    return Trial("run_trial", config={}, experiment_tag=f"{n}_x", trial_id=f"id{n:02d}", stub=True)


def _result(step: int, ev: float, l0: float) -> dict:
    return {"step": step, "heldout/explained_variance": ev, "heldout/l0": l0, "ev": 0.1}


@pytest.mark.parametrize("kind", [{"type": "mo-asha"}, {"type": "asha", "metric": "heldout/explained_variance"}])
def test_decisions_survive_a_restore_from_the_starting_pickle(tmp_path, kind):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"].update(objectives=[{"metric": "eval/explained_variance", "mode": "max"},
                                     {"metric": "eval/l0", "mode": "min"}],
                         scheduler={**kind, "grace_period": 10, "reduction_factor": 2})  # rungs at 10, 20
    spec = load_spec(SweepSpec, write(tmp_path, data))
    live = scheduler(spec, tmp_path)
    assert isinstance(live, RungScheduler)
    at_start = pickle.dumps(live)  # what Tune keeps in tuner.pkl and restores from
    t1, t2, t3, t4 = (_trial(n) for n in range(1, 5))
    assert live.on_trial_result(None, t1, _result(5, 0.1, 50)) == CONTINUE  # before the first rung
    assert not (tmp_path / SCHEDULER_FILE).exists()
    assert live.on_trial_result(None, t1, _result(10, 0.5, 40)) == CONTINUE
    assert live.on_trial_result(None, t2, _result(10, 0.3, 45)) == STOP  # dominated by trial_01 (or just behind)
    assert live.on_trial_result(None, t1, _result(20, 0.6, 38)) == CONTINUE  # past rung 20, alone there
    on_disk = (tmp_path / SCHEDULER_FILE).read_text()
    assert on_disk == live.halving.log()  # written before the decisions were returned, one line each
    assert [json.loads(line)["trial"] for line in on_disk.splitlines()[1:]] == ["trial_01", "trial_02", "trial_01"]

    # The driver dies; Tune restores the scheduler from the starting pickle: it reads the records back.
    restored = pickle.loads(at_start)
    assert restored.halving.log() == on_disk
    # trial_01 resumes from its checkpoint at step 0 and trains through both rungs again, worse this time (a GPU's
    # numerics): nothing is judged twice, the decisions stand
    assert restored.on_trial_result(None, t1, _result(10, 0.0, 90)) == CONTINUE
    assert restored.on_trial_result(None, t1, _result(20, 0.0, 90)) == CONTINUE
    assert restored.on_trial_result(None, t2, _result(10, 0.9, 1)) == STOP  # a stopped trial stays stopped
    # later trials are compared with the records made before the kill: trial_03 is second of three (top half),
    # trial_04 last of four
    assert restored.on_trial_result(None, t3, _result(10, 0.45, 41)) == CONTINUE
    assert restored.on_trial_result(None, t4, _result(10, 0.2, 50)) == STOP
    rung10 = [(r.trial, r.step, r.decision, r.place) for r in load_halving(tmp_path).rungs[10]]
    assert rung10 == [("trial_01", 10, "continue", 0), ("trial_02", 10, "stop", 1), ("trial_03", 10, "continue", 1),
                      ("trial_04", 10, "stop", 3)]
    assert stop_reason(tmp_path, "trial_04").startswith("stopped at the rung at step 10 (reported at step 10)")
    assert "trial_01, trial_02, trial_03" in stop_reason(tmp_path, "trial_04")
    assert stop_reason(tmp_path, "trial_03") is None


def test_no_scheduler_means_fifo_and_no_records(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"]["scheduler"] = None
    spec = load_spec(SweepSpec, write(tmp_path, data))
    assert not isinstance(scheduler(spec, tmp_path), RungScheduler)
    assert load_halving(tmp_path) is None and stop_reason(tmp_path, "trial_01") is None
