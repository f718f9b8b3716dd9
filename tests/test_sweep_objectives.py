"""Sweep objectives and seeds, without Ray running: which metrics a trial reports (against the real trainer), the
held-out objectives a spec accepts, and what the searcher tells Optuna when a configuration's trials end."""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from csc.config import CorpusSpec
from csc.spec_loader import load_spec
from csc.errors import SpecError
from csc.pipeline.run import METRIC_ORDER
from csc.sae.archs import ARCHITECTURES
from csc.sae.config import TrainerConfig
from csc.sae.synthetic import sparse_dictionary_batches
from csc.sae.trainer import TRAINING_METRICS, Trainer
from csc.sweep.reported import HELD_OUT, RUNG_FIGURES, held_out, trial_metrics
from csc.sweep.search import ConfigSearch, searcher
from csc.sweep.spec import SweepSpec
from tests.conftest import fit, sae_config
from tests.test_sweep_spec import BASE, write

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("gamma, revival", [(0.0, "none"), (0.1, "none"), (0.1, "auxk")])
def test_trial_metrics_are_what_the_trainer_reports(arch, gamma, revival):
    if revival == "auxk" and not ARCHITECTURES[arch].supports_auxk:
        pytest.skip("auxk needs TopK codes")
    sae = sae_config(arch, 16, 32)
    cfg = TrainerConfig(steps=6, batch_size=32, log_every=1, gamma=gamma, revival=revival, auxk_k=4,
                        lr_warmup_steps=1, beta_warmup_steps=1, gamma_warmup_steps=3, device="cpu")
    reports = [set(r) & set(TRAINING_METRICS)
               for r in fit(Trainer(sae, cfg), sparse_dictionary_batches(16, 24, 32, 6, seed=0)).reports]
    every, final = trial_metrics(sae, cfg)
    assert set(RUNG_FIGURES) <= every  # a trial adds its rung figures to every report (tests/test_rung.py)
    assert final - set(RUNG_FIGURES) == reports[-1]
    assert every - set(RUNG_FIGURES) <= set.intersection(*reports)  # never claims a metric some report lacks
    if gamma:
        assert "nce" in final and "nce" not in reports[0]  # InfoNCE's weight is 0 at step 0: why ASHA cannot use it


def test_held_out_objectives_are_csc_evals_figures_less_csc_trains_own():
    keys = [k for k, _ in METRIC_ORDER]
    assert {"eval/ce_loss_recovered", "eval/delta_ce", "eval/kl_spliced", "eval/l0", "eval/nce"} <= set(HELD_OUT)
    assert {"eval/train_steps", "eval/train_tokens"}.isdisjoint(HELD_OUT)
    assert len(HELD_OUT) == sum(not k.startswith("train_") for k in keys)


def test_a_spec_optimising_held_out_figures_with_asha_on_a_training_metric_loads(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"].update(objectives=[{"metric": "eval/ce_loss_recovered", "mode": "max"},
                                     {"metric": "eval/delta_ce", "mode": "min"}, {"metric": "l0", "mode": "min"}],
                         scheduler={"type": "asha", "metric": "ev", "mode": "max", "grace_period": 10})
    spec = load_spec(SweepSpec, write(tmp_path, data))
    assert [o.metric for o in spec.sweep.objectives] == ["eval/ce_loss_recovered", "eval/delta_ce", "l0"]
    assert spec.sweep.scheduler.metric == "ev" and spec.n_trials == 8


def test_sequence_probing_objectives_need_a_labelled_corpus(tmp_path):
    """Sparse probing's `seq` task exists only on labelled documents: its figures are objectives only there."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}", "kind": "ab"[i % 2]}) + "\n" for i in range(20)))
    seq = [k for k in HELD_OUT if k.startswith("eval/probe_seq_")]
    assert seq and held_out(CorpusSpec(source=str(corpus))) == set(HELD_OUT) - set(seq)
    assert held_out(CorpusSpec()) == held_out(CorpusSpec(source=str(corpus), label_field="kind")) == set(HELD_OUT)

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["corpus"] = {"source": str(corpus)}
    data["sweep"]["objectives"] = [{"metric": "eval/probe_letter_sae_top_1", "mode": "max"},
                                   {"metric": "eval/probe_seq_sae_top_1", "mode": "max"}]
    # probing has no rung figure: the rungs rank on figures the spec names
    data["sweep"]["scheduler"]["figures"] = [{"metric": "heldout/normalized_mse"}, {"metric": "heldout/l0"}]
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_spec(SweepSpec, path)
    assert str(e.value) == (
        f"{path}: sweep.objectives[1].metric: 'eval/probe_seq_sae_top_1' is a figure of sparse probing's sequence "
        f"task, which needs labelled documents, and corpus.source '{corpus}' has none without corpus.label_field (a "
        f"JSONL file's or Hub dataset's column of labels): no trial would report it")
    data["corpus"]["label_field"] = "kind"
    spec = load_spec(SweepSpec, write(tmp_path, data))
    assert [o.metric for o in spec.sweep.objectives] == ["eval/probe_letter_sae_top_1", "eval/probe_seq_sae_top_1"]
    assert spec.sweep.scheduler.ranked(spec.sweep.objectives) == [("heldout/normalized_mse", "min"),
                                                                  ("heldout/l0", "min")]


def test_seeds_repeat_each_configuration(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"].update(seeds=3, num_samples=4, scheduler=None)
    spec = load_spec(SweepSpec, write(tmp_path, data))
    assert (spec.n_configs, spec.n_trials) == (4, 12)
    assert searcher(spec)._seeds == [0, 1, 2]  # trainer.seed of each configuration's runs: the base's + 0, 1, 2


def test_a_grid_runs_each_point_over_the_seeds(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["trainer"]["seed"] = 7
    data["sweep"].update(method="grid", seeds=2, scheduler=None,
                         search={"trainer.gamma": {"type": "choice", "values": [0.0, 0.1]}})
    spec = load_spec(SweepSpec, write(tmp_path, data))
    assert (spec.n_configs, spec.n_trials) == (2, 4)
    search = searcher(spec)
    assert [search.suggest(f"t{i}") for i in range(4)] == [
        {"trainer.gamma": 0.0, "trainer.seed": 7}, {"trainer.gamma": 0.0, "trainer.seed": 8},
        {"trainer.gamma": 0.1, "trainer.seed": 7}, {"trainer.gamma": 0.1, "trainer.seed": 8}]


def final(ev: float, l0: float) -> dict:
    """A trial's final report: the training figures of its last steps and the held-out ones."""
    return {"step": 40, "ev": ev, "l0": l0, "eval/explained_variance": ev - 0.05, "eval/l0": l0 + 1}


RUNG = {"step": 10, "ev": 0.5, "l0": 30.0}
"""The last report of a trial the scheduler stopped at its first rung: training figures only."""


def search(objectives, seeds, **kw) -> ConfigSearch:
    return ConfigSearch({"trainer.beta": FloatDistribution(0.001, 0.1, log=True)}, objectives, seeds,
                        sampler=optuna.samplers.TPESampler(seed=0), **kw)


def states(s: ConfigSearch) -> list:
    return [(t.state, t.values) for t in s._ot_study.trials]


def test_rays_own_optuna_search_counts_a_stopped_trial_as_complete():
    """What ConfigSearch is for: Ray Tune's OptunaSearch tells Optuna a rung's training figures as a result."""
    ray_search = OptunaSearch({"trainer.beta": FloatDistribution(0.001, 0.1, log=True)}, metric="ev", mode="max")
    ray_search.suggest("t0")
    ray_search.on_trial_complete("t0", RUNG)
    assert states(ray_search) == [(TrialState.COMPLETE, [0.5])]


def test_a_stopped_trial_is_pruned_and_a_failed_one_failed():
    s = search([("ev", "max")], None)
    configs = [s.suggest(f"t{i}") for i in range(3)]
    assert all(set(c) == {"trainer.beta"} for c in configs)  # no seeds: the configuration as Optuna suggested it
    s.on_trial_result("t0", RUNG)  # no intermediate values: ASHA, not Optuna, stops trials
    s.on_trial_complete("t0", RUNG)
    s.on_trial_complete("t1", final(0.8, 20))
    s.on_trial_complete("t2", None, error=True)
    assert states(s) == [(TrialState.PRUNED, None), (TrialState.COMPLETE, [0.8]), (TrialState.FAIL, None)]
    assert s.metric is None  # Tune would check every report for it; eval/ objectives come with the last one only


def test_a_configuration_is_told_once_over_its_seeds(tmp_path: Path):
    objectives = [("eval/explained_variance", "max"), ("eval/l0", "min")]
    s = search(objectives, [0, 1], points_to_evaluate=[{"trainer.beta": 0.01}])
    first, second = s.suggest("t0"), s.suggest("t1")
    assert first == {"trainer.beta": 0.01, "trainer.seed": 0} and second == {"trainer.beta": 0.01, "trainer.seed": 1}
    s.on_trial_complete("t0", final(0.8, 20))
    assert states(s) == [(TrialState.RUNNING, None)]  # its other seed still runs

    s.save(str(tmp_path / "searcher.pkl"))  # what Tune keeps for --resume
    s = search(objectives, [0, 1])
    s.restore(str(tmp_path / "searcher.pkl"))
    s.on_trial_complete("t1", final(0.6, 30))
    assert states(s) == [(TrialState.COMPLETE, [pytest.approx(0.65), pytest.approx(26.0)])]  # the means

    configs = [s.suggest(f"t{i}") for i in range(2, 8)]
    assert [c["trainer.seed"] for c in configs] == [0, 1] * 3
    assert configs[0]["trainer.beta"] == configs[1]["trainer.beta"] != configs[2]["trainer.beta"]
    s.on_trial_complete("t2", RUNG)  # ASHA stopped one seed
    s.on_trial_complete("t3", final(0.9, 10))
    s.on_trial_complete("t5", final(0.9, 10))
    s.on_trial_complete("t4", None, error=True)
    s.on_trial_complete("t6", final(0.7, 12))
    s.on_trial_complete("t7", final(0.5, 16))
    assert states(s)[1:] == [(TrialState.PRUNED, None), (TrialState.FAIL, None),
                             (TrialState.COMPLETE, [pytest.approx(0.55), pytest.approx(15.0)])]
