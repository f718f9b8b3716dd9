"""Sweep specs: every shipped spec validates, and every mistake is named by file and field before Ray starts."""

from pathlib import Path

import pytest
import yaml

from csc.cli import main
from csc.config import load_spec
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
     "sweep.search.model.name: searched fields are `sae.<field>` or `trainer.<field>`"),
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
    (lambda d: d["sweep"].update(objectives=[{"metric": "explained_variance", "mode": "max"}]),
     "sweep.objectives.0.metric: Input should be 'loss', 'mse'"),
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
