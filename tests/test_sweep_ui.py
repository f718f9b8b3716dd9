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
