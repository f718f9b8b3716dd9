"""Sweep specs: every shipped spec validates, and every mistake is named by file and field before Ray starts."""

from pathlib import Path

import pytest
import yaml

from csc.activations.pairing import RULES
from csc.activations.source import Activations
from csc.cli import main
from csc.spec_loader import load_spec
from csc.errors import SpecError
from csc.sweep.spec import SweepSpec

SWEEPS = Path(__file__).parent.parent / "sweeps"

BASE = {
    "model": {"name": "tiny-gemma2"},
    "sae": {"dict_size": 128},
    "trainer": {"steps": 40, "batch_size": 64, "log_every": 5},
    "sweep": {"search": {"trainer.beta": {"type": "loguniform", "low": 0.001, "high": 0.1},
                         "sae.dict_size": {"type": "choice", "values": [64, 128]}},
              "scheduler": {"grace_period": 10}},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec = load_spec(SweepSpec, path)
    for point in spec.sweep.points_to_evaluate:
        spec.trial(point)


def test_points_take_the_fields_types(tmp_path):
    data = {**BASE, "sweep": {**BASE["sweep"], "search": {"trainer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                              "points_to_evaluate": [{"trainer.lr": "1.0e-3"}]}}
    spec = load_spec(SweepSpec, write(tmp_path, data))
    assert spec.sweep.points_to_evaluate == [{"trainer.lr": 1e-3}]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["sweep"].update(bogus=1), "sweep.bogus: unknown field"),
    (lambda d: d["sweep"]["search"].update({"trainer.betta": {"type": "uniform", "low": 0, "high": 1}}),
     "sweep.search.trainer.betta: TrainerConfig has no searchable field 'betta'"),
    (lambda d: d["sweep"]["search"].update({"model.name": {"type": "choice", "values": ["x"]}}),
     "sweep.search.model.name: searched fields are `sae.<field>`, `trainer.<field>`, `activations.pairing` or `activations.batching`"),
    (lambda d: d["sweep"]["search"].update({"activations.layer": {"type": "choice", "values": [1, 2]}}),
     "sweep.search.activations.layer: searched fields are `sae.<field>`, `trainer.<field>`, `activations.pairing` or `activations.batching` "
     "(other activations fields would change the activations all trials share)"),
    (lambda d: d["sweep"]["search"].update({"activations.pairing": {"type": "choice", "values": ["previous", "nearest"]}}),
     "sweep.search.activations.pairing: value 'nearest' is invalid: Input should be 'similar_attention', 'attended'"),
    (lambda d: d["sweep"]["search"].update({"trainer.temperature": {"type": "uniform", "low": -1, "high": 1}}),
     "sweep.search.trainer.temperature: value -1.0 is invalid"),
    (lambda d: d["sweep"]["search"]["trainer.beta"].update(low=0.5), "low (0.5) must be below high (0.1)"),
    (lambda d: d["sweep"]["search"]["trainer.beta"].update(low=0), "a loguniform range needs low > 0"),
    (lambda d: d["sweep"]["search"].update({"sae.k": {"type": "int", "low": 1, "high": 8}}),
     "sweep.search.sae.k: no architecture of this sweep (relu) has a searchable field 'k'"),
    (lambda d: d["sweep"].update(points_to_evaluate=[{"trainer.beta": 0.01}]),
     "sweep.points_to_evaluate[0] must give exactly the searched fields"),
    (lambda d: d["sweep"].update(points_to_evaluate=[{"trainer.beta": 0.01, "sae.dict_size": 0}]),
     "sweep.points_to_evaluate[0].sae.dict_size: value 0 is invalid"),
    (lambda d: d["sweep"]["scheduler"].update(grace_period=40), "sweep.scheduler.grace_period (40) must be below"),
    (lambda d: d["trainer"].update(gamma_warmup_steps=12),
     "sweep.scheduler.grace_period (10) must come after the warm-ups (trainer.gamma_warmup_steps: 12 steps)"),
    (lambda d: d["sweep"].update(objectives=[{"metric": "explained_variance", "mode": "max"}]),
     "sweep.objectives.0.metric: 'explained_variance' is not a metric trials report (did you mean "
     "'eval/explained_variance'?): a training metric (loss, mse, "),
    # csc train's own figures (train_*) are in csc eval's list but not in a trial's final report.
    (lambda d: d["sweep"].update(objectives=[{"metric": "eval/train_steps", "mode": "max"}]),
     "sweep.objectives.0.metric: 'eval/train_steps' is not a metric trials report"),
    (lambda d: d["trainer"].update(gamma=0) or d["sweep"].update(objectives=[{"metric": "ev", "mode": "max"},
                                                                             {"metric": "nce", "mode": "min"}]),
     "sweep.objectives[1].metric: the trials with sae.dict_size 64, trainer.beta 0.001 do not report 'nce' (a loss "
     "term's metric exists only where a trial has the term; they report dead_frac, ev, grad_norm, l0, l1, loss, "
     "mse); Optuna needs every objective from every trial: the held-out 'eval/nce' is measured for every trial"),
    (lambda d: d["sweep"].update(objectives=[{"metric": "auxk", "mode": "min"}]),
     "sweep.objectives[0].metric: the trials with sae.dict_size 64, trainer.beta 0.001 do not report 'auxk'"),
    (lambda d: d["sweep"]["scheduler"].update(type="asha", metric="eval/delta_ce"),
     "sweep.scheduler.metric: 'eval/delta_ce' is a held-out figure, measured once after a trial's last step; the "
     "rungs rank trials before that: give a rung figure (its own is 'heldout/normalized_mse') or a training metric, "
     "and make 'eval/delta_ce' an objective"),
    (lambda d: d["sweep"]["scheduler"].update(type="asha", metric="kl"),
     "sweep.scheduler.metric: 'kl' is neither a rung figure (heldout/explained_variance, "),
    (lambda d: d["sweep"]["scheduler"].update(type="asha"),
     "sweep.scheduler: type asha ranks on one figure: give metric (e.g. heldout/explained_variance)"),
    (lambda d: d["sweep"]["scheduler"].update(type="asha", metric="ev"),
     "sweep.scheduler: mode: give min or max for the training metric 'ev'"),
    (lambda d: d["sweep"]["scheduler"].update(metric="heldout/l0"),
     "sweep.scheduler: metric and mode are ASHA's: set type: asha to rank on one figure"),
    (lambda d: d["sweep"]["scheduler"].update(figures=[{"metric": "eval/l0"}]),
     "sweep.scheduler.figures.0.metric: 'eval/l0' is a held-out figure, measured once after a trial's last step; "
     "the rungs rank trials before that: give a rung figure (its own is 'heldout/l0')"),
    (lambda d: d["sweep"].update(objectives=[{"metric": "eval/probe_letter_sae_top_1", "mode": "max"}]),
     "sweep.scheduler: objective 0, 'eval/probe_letter_sae_top_1', has no rung figure to stand for it at the rungs "
     "(csc.sweep.reported.RUNG_OF); name the figures the rungs rank on in sweep.scheduler.figures"),
    # gamma 0.1 everywhere: every trial has InfoNCE, but not at the steps of its warm-up where its weight is 0
    (lambda d: d["trainer"].update(gamma=0.1, gamma_warmup_steps=5) or d["sweep"]["scheduler"].update(
        type="asha", metric="nce", mode="min"),
     "sweep.scheduler.metric: 'nce' is not in every report of the trials with sae.dict_size 64, trainer.beta 0.001 "
     "(the trainer skips an optional term at the steps where its weight is 0, as at the start of its warm-up); the "
     "rungs rank trials on it: give a rung figure (heldout/explained_variance, "),
    (lambda d: d["sweep"].update(search={**d["sweep"]["search"], "sae.architecture": {
        "type": "choice", "values": ["relu", "topk"]}}, scheduler={"figures": [{"metric": "l1", "mode": "min"}],
                                                                  "grace_period": 10}),
     "sweep.scheduler.figures: 'l1' is not in every report of the trials with sae.architecture 'topk', "
     "sae.dict_size 64, trainer.beta 0.001 (they do not have that term); the rungs rank trials on it: give a rung "
     "figure (heldout/explained_variance, heldout/normalized_mse, heldout/l0, heldout/dead_fraction, heldout/nce, "
     "heldout/code_sim_positive, heldout/code_sim_negative, heldout/context_locality, "
     "heldout/context_locality_weighted) or one of loss, mse, l0, ev, dead_frac, grad_norm"),
    (lambda d: d["sweep"].update(seeds=3, search={**d["sweep"]["search"], "trainer.seed": {
        "type": "choice", "values": [0, 1]}}),
     "sweep.seeds (3) runs each configuration with trainer.seed 0...2, and sweep.search.trainer.seed searches it "
     "too: give the seeds one way (drop sweep.search.trainer.seed, or set sweep.seeds to 1)"),
    (lambda d: d["sweep"].update(seeds=0), "sweep.seeds: Input should be greater than or equal to 1"),
    (lambda d: d["sweep"].update(seeds=2), "sweep.seeds (2) needs sweep.scheduler: null: ASHA ranks trials one by one, "
                                           "so it would rank a configuration's seeds against each other"),
    (lambda d: d["sweep"].update(num_samples=0), "sweep.num_samples: Input should be greater than or equal to 1"),
])
def test_spec_errors_name_file_and_field(tmp_path, change, message):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_spec(SweepSpec, path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_the_pairing_rule_is_searchable_and_each_trial_gets_its_own_while_sharing_the_cache(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["activations"] = {"pairing": "attended", "layer": 2, "cache_dir": str(tmp_path / "cache")}
    data["sweep"]["search"] = {"activations.pairing": {"type": "choice", "values": list(RULES)},
                               "trainer.gamma": {"type": "uniform", "low": 0.0, "high": 1.0}}
    data["sweep"]["points_to_evaluate"] = [{"activations.pairing": "previous", "trainer.gamma": 0.5},
                                           {"activations.pairing": "random", "trainer.gamma": 0.5}]
    spec = load_spec(SweepSpec, write(tmp_path, data))
    base = spec.trial({})  # what the sweep's producer is built from
    assert base.activations.pairing == "attended"
    for rule in RULES:
        trial = spec.trial({"activations.pairing": rule, "trainer.gamma": 0.25})
        assert trial.activations.pairing == rule and trial.trainer.gamma == 0.25
        assert trial.activations.model_dump(exclude={"pairing"}) == base.activations.model_dump(exclude={"pairing"})
        assert Activations(trial).caches["train"].dir == Activations(base).caches["train"].dir
    assert [spec.trial(p).activations.pairing for p in spec.sweep.points_to_evaluate] == ["previous", "random"]


def test_the_batching_is_searchable_and_shares_the_cache(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["activations"] = {"layer": 2, "cache_dir": str(tmp_path / "cache")}
    data["sweep"]["search"] = {"activations.batching": {"type": "choice", "values": ["contexts", "tokens"]}}
    spec = load_spec(SweepSpec, write(tmp_path, data))
    base = spec.trial({})
    for batching in ("contexts", "tokens"):
        trial = spec.trial({"activations.batching": batching})
        assert trial.activations.batching == batching
        assert Activations(trial).caches["train"].dir == Activations(base).caches["train"].dir
    data["sweep"]["search"] = {"activations.batching": {"type": "choice", "values": ["contexts", "windows"]}}
    with pytest.raises(SpecError, match="sweep.search.activations.batching: value 'windows' is invalid"):
        load_spec(SweepSpec, write(tmp_path, data))


def test_cli_refuses_a_bad_spec_before_ray_starts(tmp_path, capsys):
    import ray

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"]["max_concurrent"] = "two"
    assert main(["sweep", str(write(tmp_path, data)), "--out", str(tmp_path / "runs")]) == 2
    assert "sweep.max_concurrent: Input should be a valid integer" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_cli_refuses_a_layer_the_model_lacks_before_ray_or_mlflow_start(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE)
    assert main(["sweep", str(path), "--set", "activations.layer=9", "--out", str(tmp_path / "runs")]) == 2
    assert "activations.layer 9 is out of range: 'tiny-gemma2' has 4 layers" in capsys.readouterr().err
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_cli_refuses_an_unreachable_mlflow_server_before_any_compute(tmp_path, monkeypatch, capsys):
    import ray

    from csc.sweep.ui import free_port

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["sweep", str(path), "--set", f"sweep.tracking.uri={url}", "--set", "activations.layer=2",
                 "--out", str(tmp_path / "runs")]) == 2
    assert f"sweep.tracking.uri {url}: no MLflow server answers there" in capsys.readouterr().err
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_cli_refuses_an_empty_corpus_and_a_dictionary_beyond_memory_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    path = write(tmp_path, BASE)
    assert main(["sweep", str(path), "--set", "activations.layer=2", "--set", f"corpus.source={empty}",
                 "--out", str(tmp_path / "runs")]) == 2
    assert f"csc: error: corpus.source '{empty}'" in capsys.readouterr().err
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"]["search"]["sae.dict_size"]["values"] = [128, 400_000_000]
    path = write(tmp_path, data)
    assert main(["sweep", str(path), "--set", "activations.layer=2", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "sae.dict_size up to 400000000: 2 trials at once need about" in err and "GiB" in err
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "s.yaml"]


def test_grid_method_runs_every_combination_once(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sweep"]["method"] = "grid"
    data["sweep"]["search"] = {"trainer.gamma": {"type": "choice", "values": [0.0, "1e-1"]},
                               "activations.pairing": {"type": "choice", "values": ["similar_attention", "previous"]},
                               "trainer.seed": {"type": "choice", "values": [0, 1, 2]}}
    spec = load_spec(SweepSpec, write(tmp_path, data))
    grid = spec.grid()
    assert spec.n_trials == len(grid) == 12
    assert grid[0] == {"trainer.gamma": 0.0, "activations.pairing": "similar_attention", "trainer.seed": 0}
    assert grid[1]["trainer.seed"] == 1 and grid[-1] == {"trainer.gamma": 0.1, "activations.pairing": "previous",
                                                         "trainer.seed": 2}
    assert len({tuple(p.values()) for p in grid}) == 12
    for change, message in (
            (lambda d: d["sweep"]["search"].update({"trainer.beta": {"type": "uniform", "low": 0.01, "high": 0.1}}),
             "sweep.method grid needs `choice` values for every searched field (trainer.beta is a range)"),
            (lambda d: d["sweep"].update(num_samples=5), "sweep.num_samples (5) must be the grid's size, 12"),
            (lambda d: d["sweep"].update(points_to_evaluate=[{"trainer.gamma": 0.0, "activations.pairing": "previous",
                                                              "trainer.seed": 0}]),
             "sweep.points_to_evaluate: a grid runs every point already")):
        bad = yaml.safe_load(yaml.safe_dump(data))
        change(bad)
        with pytest.raises(SpecError) as e:
            load_spec(SweepSpec, write(tmp_path, bad))
        assert message in str(e.value)
    data["sweep"].pop("method")
    assert load_spec(SweepSpec, write(tmp_path, data)).n_trials == 8  # optuna's default


def test_dry_run_checks_what_the_sweep_checks_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, {**BASE, "activations": {"layer": 2, "cache_dir": str(tmp_path / "cache")}})
    args = ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "runs")]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"dry run of sweep 's': would write {tmp_path.resolve() / 'runs' / 's'}"
    assert "  trainer.beta: loguniform in [0.001, 0.1]" in lines and "  sae.dict_size: one of [64, 128]" in lines
    assert "objectives: ev (max); MO-ASHA on heldout/explained_variance (max), ties by crowding distance; rungs at " \
        "steps 10, 20 of 40, the top 1/2 of each continue" in lines
    assert any(line.startswith("concurrency: 2 trials at once, each 1 CPU, 0 GPU; 1 producer(s)") for line in lines)
    assert "tokens: 40 steps x 64 = 2,560 trained tokens per trial, 20,480 in all" in lines
    acts = Activations(load_spec(SweepSpec, path).trial({}))
    assert f"activations, train: {acts.n_shards['train']} shards in {acts.caches['train'].dir}, 0 there already" in lines
    assert f"MLflow: sqlite:///{tmp_path.resolve() / 'mlflow.db'} (a new store), experiment 's'" in lines
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
    # it refuses what the sweep refuses, before anything
    assert main([*args, "--set", "activations.layer=9"]) == 2
    assert "activations.layer 9 is out of range" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 2
    assert "--resume: no sweep to resume in" in capsys.readouterr().err
