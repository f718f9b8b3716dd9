"""The sweep UI end to end: a real `mlflow server` on a SQLite store, its runs page rendered by headless
Chromium, and the server gone afterwards."""

import os
import shutil
import time
from pathlib import Path

import pytest

from csc.sweep.ui import MlflowServer, _group_alive, default_tracking, render_page, runs_page_url

CHILDREN = ["trial_alpha_7f3", "trial_bravo_2c9", "trial_charlie_5d1"]


def make_store(root: Path) -> tuple[str, str, str]:
    """A sweep-shaped store: one parent run, three nested child runs with params and metric steps."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep_ui_test", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, run_name="sweep_parent_q1")
    for i, name in enumerate(CHILDREN):
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id})
        client.log_param(run.info.run_id, "lr", 10 ** -(i + 2))
        for step in range(3):
            client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1 + i), step=step)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    return uri, str(root / "mlartifacts"), exp


def test_default_tracking_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, root = default_tracking()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert root == str(tmp_path.resolve() / "mlartifacts")


def test_runs_page_lists_every_child_run(tmp_path):
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (CI installs the Debian package `chromium`)")
        pytest.skip("needs headless Chromium (Debian package `chromium`)")
    uri, root, exp = make_store(tmp_path)

    with MlflowServer(uri, root) as server:
        proc = server.proc
        nested = runs_page_url(server.url, exp)
        assert nested == f"{server.url}/#/experiments/{exp}/runs"
        # By default the children sit collapsed under their parent; the flat view lists them as rows.
        dom = render_page(runs_page_url(server.url, exp, flat=True))

    for name in ["sweep_parent_q1", *CHILDREN]:
        assert name in dom, f"{name} not in the rendered runs table"
    assert proc.poll() is not None
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "a process of the server's group outlived the context"


def _servers_on(port: int) -> list[int]:
    """PIDs of processes whose command line serves `port` (the mlflow server and its uvicorn worker)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in args and str(port).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def test_csc_ui_takes_its_server_down_on_sigint_sigterm_and_sighup(tmp_path):
    import selectors
    import signal
    import subprocess
    import sys
    import urllib.request

    from csc.sweep.ui import free_port

    make_store(tmp_path)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    ports = {sig: free_port() for sig in sigs}
    uis = {}
    try:
        for sig in sigs:  # three at once, one per signal: each a session of its own, as `kill PID` would reach it
            uis[sig] = subprocess.Popen([sys.executable, "-m", "csc.cli", "ui", "--port", str(ports[sig])],
                                        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        for sig, ui in uis.items():
            # csc ui prints its URL once the server answers (a signal before that is the start's to handle)
            ready = selectors.DefaultSelector()
            ready.register(ui.stdout, selectors.EVENT_READ)
            assert ready.select(timeout=120), f"{sig.name}: csc ui printed nothing within 120 s"
            first = ui.stdout.readline()
            assert f"MLflow UI for sqlite:///{tmp_path.resolve() / 'mlflow.db'} at http://127.0.0.1:{ports[sig]}" \
                in first
            with opener.open(f"http://127.0.0.1:{ports[sig]}/health", timeout=5) as r:
                assert r.status == 200
            assert _servers_on(ports[sig]), "the server's process is not found by its port"
        for sig, ui in uis.items():
            ui.send_signal(sig)
        for sig, ui in uis.items():
            _, err = ui.communicate(timeout=60)
            assert ui.returncode == 128 + sig, (sig, ui.returncode, err)
            assert f"csc ui: {sig.name} received; the MLflow server on 127.0.0.1:{ports[sig]} is stopped" in err
            assert "activation cache" not in err and "Traceback" not in err
            assert _servers_on(ports[sig]) == [], f"{sig.name}: a server process outlived csc ui"
            free_port(ports[sig])  # the port is free again
    finally:
        for ui in uis.values():
            if ui.poll() is None:
                ui.kill()


def test_csc_ui_refuses_a_missing_store_naming_the_path(tmp_path, monkeypatch, capsys):
    from csc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["ui"]) == 2
    assert f"csc: error: no MLflow store at {tmp_path.resolve() / 'mlflow.db'}: run `csc ui` where" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
