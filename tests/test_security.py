"""Security properties that hold by construction, checked so they keep holding: nothing is unpickled or
unsafe-YAML-loaded, names from specs cannot leave their folders, and the servers csc starts listen on
127.0.0.1 only."""

import ast
from pathlib import Path

import pytest
import yaml

from csc.cli import main
from csc.spec_loader import load_spec
from csc.errors import SpecError
from csc.sweep.spec import SweepSpec, sweep_name

PACKAGE = Path(__file__).parent.parent / "csc"
UNSAFE = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"),
          ("dill", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "loads")}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield node, (f.value.id, f.attr)
            elif isinstance(f, ast.Name):
                yield node, ("", f.id)


def test_no_unpickling_unsafe_yaml_or_eval_in_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node, name in calls(ast.parse(path.read_text())):
            if name in UNSAFE or name[1] in ("eval", "exec") and name[0] == "":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {'.'.join(filter(None, name))}")
    assert not found, "weights and state are read as safetensors/JSON, YAML with safe_load:\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "-flag", "x" * 101, "tab\tname"])
def test_a_sweep_name_cannot_leave_the_output_folder(tmp_path, name):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"sae": {"dict_size": 8}, "trainer": {"steps": 200}, "sweep": {"name": name}}))
    with pytest.raises(SpecError, match="sweep.name: String should match pattern"):
        load_spec(SweepSpec, path)


def test_a_spec_file_stem_that_is_no_folder_name_needs_sweep_name(tmp_path, capsys):
    path = tmp_path / ".odd name.yaml"
    path.write_text(yaml.safe_dump({"sae": {"dict_size": 8}, "trainer": {"steps": 200}}))
    with pytest.raises(SpecError, match="is not a plain folder name: set sweep.name"):
        sweep_name(load_spec(SweepSpec, path), path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert "set sweep.name" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_servers_bind_loopback_only():
    from csc.sweep.ui import MlflowServer

    server = MlflowServer("sqlite:///unused.db")  # not started: the URL and command are fixed at construction
    assert server.url.startswith("http://127.0.0.1:")
    source = (PACKAGE / "sweep" / "ui.py").read_text()
    assert '"--host", "127.0.0.1"' in source and "0.0.0.0" not in source
    run_source = (PACKAGE / "sweep" / "run.py").read_text()
    assert "include_dashboard=False" in run_source  # a local Ray starts no dashboard on any interface
