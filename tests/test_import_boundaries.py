"""Imports point one way (README, "How csc is built"): cli -> sweep -> pipeline -> (sae, activations, config);
csc/sae is torch + pydantic (+ safetensors for its files) only; Ray and MLflow stay in csc/sweep, and every
MLflow call in csc/sweep/tracking/mlflow.py."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CSC = Path(__file__).resolve().parent.parent / "csc"


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (anywhere in it, functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def modules(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(CSC.parent)): imports(p) for p in sorted((CSC / package).rglob("*.py"))}


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_sae_is_torch_and_pydantic_only():
    allowed = {"torch", "pydantic", "safetensors"}
    for path, names in modules("sae").items():
        for name in names:
            top = name.split(".")[0]
            if top == "csc":
                assert under(name, "csc.sae", "csc.errors"), f"{path} imports {name}"
            else:
                assert top in allowed or top in sys.stdlib_module_names, f"{path} imports {name}"


@pytest.mark.parametrize("package, forbidden", [
    ("activations", ("csc.pipeline", "csc.sweep", "csc.cli", "ray", "mlflow", "sae_lens")),
    ("pipeline", ("csc.sweep", "csc.cli", "ray", "mlflow", "sae_lens")),
    ("sweep", ("csc.cli", "sae_lens")),
])
def test_lower_packages_never_import_higher_ones(package, forbidden):
    for path, names in modules(package).items():
        bad = sorted(n for n in names if under(n, *forbidden))
        assert not bad, f"{path} imports {bad}"


def test_every_mlflow_import_of_the_sweep_is_in_its_tracker():
    for path, names in modules("sweep").items():
        if path != "csc/sweep/tracking/mlflow.py":
            assert not any(under(n, "mlflow") for n in names), f"{path} imports mlflow"


def test_math_packages_never_import_ray_or_mlflow():
    """The same at run time, with transitive imports: loading every module of these packages loads neither."""
    code = (
        "import sys, pkgutil, importlib, csc.sae, csc.activations, csc.pipeline\n"
        "for pkg in (csc.sae, csc.activations, csc.pipeline):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'mlflow', 'sae_lens'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_trial_workers_import_neither_transformers_nor_matplotlib():
    """A trial trains and evaluates through the producer, which holds the LM, and never draws: importing transformers
    and matplotlib would cost each of a sweep's trial workers ~5 s of CPU for nothing."""
    code = ("import sys, csc.sweep.trial\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'transformers', 'matplotlib'}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


def test_the_scheduler_logic_and_the_sweep_folder_layout_import_no_ray():
    """The replay benchmark drives successive halving without Ray, and what only reads a sweep folder needs its
    names only."""
    code = ("import sys, csc.sweep.halving, csc.sweep.layout\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'mlflow', 'optuna'}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
