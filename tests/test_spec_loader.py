"""csc.spec_loader and the CLI's reading of specs: strict sections in every command, did-you-mean, errors blamed on
the `--set` that caused them, `--set` of search ranges, and commands without a spec file."""

import pytest
import yaml

from csc.cli import main
from csc.config import ActivationsRunSpec, TrainRunSpec
from csc.errors import SpecError
from csc.spec_loader import load_spec
from csc.sweep.spec import SweepSpec

QUICKSTART = {
    "model": {"name": "tiny-gemma2"},
    "activations": {"layer": 1, "context_length": 32},
    "sae": {"dict_size": 64},
    "trainer": {"steps": 10},
    "eval": {"ce_contexts": 2},
    "sweep": {"num_samples": 2, "scheduler": None,
              "search": {"trainer.beta": {"type": "loguniform", "low": 0.02, "high": 0.1}}},
}


def write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["activations", "train", "sweep"])
@pytest.mark.parametrize("typo, field, hint", [
    ({"evl": {"ce_contexts": 2}}, "evl", "eval"),
    ({"checkpoint_evry": 5}, "checkpoint_evry", "checkpoint_every"),
    ({"sweep": {"max_concurent": 3}}, "sweep.max_concurent", "max_concurrent"),
    ({"trainer": {"steps": 10, "lrr": 0.1}}, "trainer.lrr", "lr"),
    ({"sae": {"dict_size": 64, "dict_sise": 3}}, "sae.dict_sise", "dict_size"),
])
def test_every_command_refuses_an_unknown_section_or_field_naming_the_file_and_the_closest_name(
        tmp_path, capsys, command, typo, field, hint):
    data = {**QUICKSTART, **{k: {**QUICKSTART.get(k, {}), **v} if isinstance(v, dict) else v for k, v in typo.items()}}
    path = write(tmp_path, data)
    assert main([command, str(path), "--out", str(tmp_path / "out")] if command != "activations"
                else [command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"csc: error: {path}: {field}: unknown field (did you mean `{hint}`?)" in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_value_from_set_is_blamed_on_the_set_and_one_from_the_file_on_the_file(tmp_path):
    path = write(tmp_path, {**QUICKSTART, "trainer": {"steps": 10, "batch_size": 0}})
    with pytest.raises(SpecError) as e:
        load_spec(TrainRunSpec, path, ["trainer.lr=-1"], part_of=SweepSpec)
    lines = str(e.value).splitlines()
    assert "--set trainer.lr=-1: trainer.lr: Input should be greater than 0" in lines
    assert f"{path}: trainer.batch_size: Input should be greater than 0" in lines
    with pytest.raises(SpecError, match=r"^--set trainer.lrr=1: trainer.lrr: unknown field \(did you mean `lr`\?\)$"):
        load_spec(TrainRunSpec, path, ["trainer.batch_size=8", "trainer.lrr=1"], part_of=SweepSpec)
    with pytest.raises(SpecError, match=r"^--set trainer.steps.x=1: trainer.steps is not a section$"):
        load_spec(TrainRunSpec, path, ["trainer.steps.x=1"], part_of=SweepSpec)
    with pytest.raises(SpecError, match=r"^--set trainer: expected KEY=VALUE$"):
        load_spec(TrainRunSpec, path, ["trainer"], part_of=SweepSpec)
    with pytest.raises(SpecError, match=r"^--set a\.\.b=1: cannot read the key"):
        load_spec(TrainRunSpec, path, ["a..b=1"], part_of=SweepSpec)


def test_set_reaches_search_ranges_by_dotted_key_by_a_start_of_it_and_by_brackets(tmp_path):
    path = write(tmp_path, QUICKSTART)
    spec = load_spec(SweepSpec, path, ["sweep.search.trainer.gamma={type: uniform, low: 0.0, high: 0.5}",
                                       "sweep.search.trainer.beta.high=0.2",
                                       "sweep.search[sae.dict_size]={type: choice, values: [32, 64]}",
                                       "sweep.search[sae.dict_size].values=[16, 32]"])
    search = spec.sweep.search
    assert sorted(search) == ["sae.dict_size", "trainer.beta", "trainer.gamma"]
    assert (search["trainer.gamma"].type, search["trainer.gamma"].high) == ("uniform", 0.5)
    assert (search["trainer.beta"].low, search["trainer.beta"].high) == (0.02, 0.2)
    assert search["sae.dict_size"].values == [16, 32]
    with pytest.raises(SpecError, match=r"^--set sweep.search.trainer.beta.high=0.01: sweep.search.trainer.beta: "
                                        r"low \(0.02\) must be below high \(0.01\)$"):
        load_spec(SweepSpec, path, ["sweep.search.trainer.beta.high=0.01"])
    with pytest.raises(SpecError, match=r"sweep.search.trainer.lrr: TrainerConfig has no searchable field 'lrr' "
                                        r"\(did you mean `lr`\?\)"):
        load_spec(SweepSpec, path, ["sweep.search.trainer.lrr={type: choice, values: [0.1]}"])
    with pytest.raises(SpecError, match=r"^--set sweep.search\[trainer.bet\].high=3: sweep.search.trainer.bet.type: "):
        load_spec(SweepSpec, path, ["sweep.search[trainer.bet].high=3"])  # a new entry without its type


def test_a_command_reading_part_of_a_spec_checks_the_other_sections(tmp_path):
    path = write(tmp_path, {**QUICKSTART, "sweep": {"max_concurrent": 0}})
    with pytest.raises(SpecError, match=r"sweep.max_concurrent: Input should be greater than or equal to 1"):
        load_spec(ActivationsRunSpec, path, part_of=SweepSpec)
    spec = load_spec(ActivationsRunSpec, write(tmp_path, QUICKSTART), part_of=SweepSpec)
    assert spec.activations.layer == 1


def test_without_a_spec_file_train_says_which_fields_set_must_give(tmp_path, capsys):
    assert load_spec(ActivationsRunSpec, None).model.name == "embedded"
    assert main(["train", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no spec file: sae: required (give it in the spec file, or with --set sae.dict_size=...)" in err
    assert "no spec file: trainer: required (give it in the spec file, or with --set trainer.steps=...)" in err
    spec = load_spec(TrainRunSpec, None, ["sae.dict_size=64", "trainer.steps=5"])
    assert (spec.sae.dict_size, spec.trainer.steps) == (64, 5)
    with pytest.raises(SystemExit):
        main(["sweep"])  # a sweep needs its spec: argparse says so
    assert "the following arguments are required: spec" in capsys.readouterr().err
