import subprocess
import sys


def test_math_packages_never_import_ray_or_mlflow():
    code = (
        "import sys, pkgutil, importlib, csc.sae, csc.activations\n"
        "for pkg in (csc.sae, csc.activations):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
