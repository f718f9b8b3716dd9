"""End-to-end sweeps on the tiny model with real Ray (local) and real MLflow (SQLite): early stopping, a
diverging trial recorded as FAILED while the sweep goes on, the parent/child runs and their contents, one
LM run per shard, the sweep's view of the MLflow runs table (tests/test_sweep_faults.py kills, interrupts and resumes
sweeps)."""

import os
import re
import shutil
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from csc.activations.source import Activations
from csc.cli import main
from csc.spec_loader import load_spec
from csc.errors import CscError
from csc.pipeline.probing import held_out_labels
from csc.sae.export import load_sae
from csc.sweep.reported import EVAL_PREFIX, TIME_PREFIX, WALL_TIME
from csc.sweep.run import run_sweep
from csc.sweep.spec import SweepSpec
from tests.test_probing import labelled_corpus


LM_SHARDS = 4 + 2 + 2
"""Shards the tiny sweep's LM makes on a fresh cache: 4 train, 2 eval, and the 2 held-out shards beyond them that
sparse probing reads once a trial finishes."""


def tiny_sweep(tmp_path: Path, cache: Path, trainer: dict | None = None, checkpoint_every: int = 10,
               **sweep) -> Path:
    """A sweep spec on the tiny model; `trainer` updates its trainer section, `sweep` its sweep section."""
    data = {
        "model": {"name": "tiny-gemma2"},
        "activations": {"layer": 2, "context_length": 32, "contexts_per_shard": 8, "lm_batch_size": 4,
                        "train_tokens": 1024, "eval_tokens": 512, "cache_dir": str(cache)},
        "sae": {"dict_size": 128},
        "trainer": {"steps": 40, "batch_size": 64, "lr_warmup_steps": 5, "beta_warmup_steps": 5,
                    "gamma_warmup_steps": 5, "log_every": 5, **(trainer or {})},
        # Sparse probing reads 2 held-out shards beyond the evaluation's (31 at the default 128 examples).
        "eval": {"ce_contexts": 4, "probe_examples_per_class": 16},
        "checkpoint_every": checkpoint_every,
        "sweep": {"num_samples": 5, "max_concurrent": 1,
                  "objectives": [{"metric": "ev", "mode": "max"}, {"metric": "l0", "mode": "min"}],
                  "search": {"trainer.beta": {"type": "loguniform", "low": 0.001, "high": 0.01},
                             "trainer.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3}},
                  "scheduler": {"type": "mo-asha", "grace_period": 10, "reduction_factor": 2},
                  "resources": {"trial_cpus": 0.5, "producer_cpus": 0.5},
                  **sweep},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def child_runs(client: MlflowClient, exp_id: str, parent_id: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default tracking store is ./mlflow.db
    yield tmp_path
    ray.shutdown()


def test_sweep_stops_early_survives_divergence_and_records_everything(in_tmp, cache, capsys, monkeypatch):
    points = [{"trainer.beta": 0.001, "trainer.lr": 1e-3},
              {"trainer.beta": 0.01, "trainer.lr": 3e-4},  # reconstructs worse at step 10: MO-ASHA stops it
              {"trainer.beta": 0.005, "trainer.lr": 1e20}]  # outside the searched range; diverges at step 2
    spec = load_spec(SweepSpec, tiny_sweep(in_tmp, cache, points_to_evaluate=points, num_samples=4))
    secret = "hf_csc_sentinel_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)  # every Ray worker inherits it; nothing may record it
    result = run_sweep(spec, "tiny", in_tmp / "runs", verbose=0)

    rows = {r["trial"]: r for r in result.rows}
    assert sorted(rows) == [f"trial_{i:02d}" for i in range(1, 5)] and not result.interrupted
    assert rows["trial_01"]["outcome"] == "finished"
    assert rows["trial_02"]["outcome"] == "stopped_early" and rows["trial_02"]["steps_done"] < 40
    assert rows["trial_03"]["outcome"] == "failed"
    assert rows["trial_03"]["reason"].startswith("csc.errors.DivergenceError: step 2: ")
    assert rows["trial_04"]["outcome"] in ("finished", "stopped_early"), "the sweep goes on after a failure"

    # The LM ran once per shard (fresh cache), though four trials read them.
    st = result.producer
    assert st["lm_shards_computed"] == LM_SHARDS and st["requests"] > 6 * 3
    assert st["evaluations"] == sum(r["outcome"] == "finished" for r in rows.values())
    assert st["evaluation_seconds"] > st["clean_runs_seconds"] > 0 and st["clean_runs_mb"] > 0
    # Where each finished trial's time went, waiting for shards within training.
    for row in (r for r in rows.values() if r["outcome"] == "finished"):
        took = {k.removeprefix(TIME_PREFIX): v for k, v in row["metrics"].items() if k.startswith(TIME_PREFIX)}
        absorbed = any(k.startswith(EVAL_PREFIX + "absorption") for k in row["metrics"])
        assert set(took) == {key for key, _ in WALL_TIME} - (set() if absorbed else {"eval_absorption"})
        assert all(v >= 0 for v in took.values()) and took["shard_wait"] <= took["train"]

    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["csc.role"] == "sweep"
    assert parent.data.params["trainer.steps"] == "40"
    assert parent.data.metrics["producer.lm_shards_computed"] == LM_SHARDS
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= \
        {"trials.csv", "trials.json", "pareto.png", "progression.png", "scheduler.jsonl"}
    assert Path(client.get_experiment(result.experiment_id).artifact_location.removeprefix("file://")) == \
        in_tmp / "mlartifacts"

    runs = child_runs(client, result.experiment_id, result.parent_run_id)
    assert sorted(runs) == sorted(rows)
    d_model = str(Activations(spec.trial({})).d_model)
    for name, run in runs.items():
        assert float(run.data.params["trainer.beta"]) == pytest.approx(rows[name]["params"]["trainer.beta"])
        assert run.data.tags["csc.outcome"] == rows[name]["outcome"]
        assert run.data.tags["csc.searched"] == "trainer.beta, trainer.lr"
        assert not any(k.startswith("searched.") for k in run.data.params)  # each field once
        # as resolved where the trial ran (its reports say), not the spec's "auto", "bf16" and null
        resolved = [run.data.params.get(k) for k in ("trainer.device", "trainer.autocast", "sae.d_in")]
        assert resolved == (["cpu", "fp32", d_model] if name != "trial_03" else [None] * 3), name  # 03: no report
    assert client.get_experiment(result.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    done = runs["trial_01"]
    assert done.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(done.info.run_id, "loss")]
    assert steps == list(range(5, 41, 5))
    assert 0 < done.data.metrics["eval/explained_variance"] <= 1
    assert {"eval/ce_loss_recovered", "eval/delta_ce", "eval/kl_spliced", "eval/nce", "eval/nce_chance"} <= set(
        done.data.metrics)  # every held-out figure, the headline's scale and InfoNCE's chance level included
    arts = {a.path for a in client.list_artifacts(done.info.run_id)} | \
        {a.path for a in client.list_artifacts(done.info.run_id, "sae")}
    assert arts >= {"curves.png", "density.png", "eval.json", "dashboard.html", "sae/cfg.json",
                    "sae/sae_weights.safetensors"}
    assert (result.sweep_dir / "trial_01" / "density.png").read_bytes().startswith(b"\x89PNG")
    # The feature dashboard (logit tables and token strings from the producer) opens from the run, and the sweep
    # folder keeps it too; tests/test_dashboard.py checks what it shows.
    page = Path(client.download_artifacts(done.info.run_id, "dashboard.html", str(in_tmp / "dl"))).read_text()
    assert page == (result.sweep_dir / "trial_01" / "dashboard.html").read_text()
    assert len(re.findall(r'<section class="latent" id="latent-\d+" data-latent=', page)) == 32
    assert "Feature dashboard: tiny-gemma2 layer 2" in page
    sae, meta = load_sae(Path(client.download_artifacts(done.info.run_id, "sae", str(in_tmp / "dl"))))
    assert sae.cfg.dict_size == 128 and meta["hook_layer"] == 2

    stopped = runs["trial_02"]
    # early stopping is an outcome, not a crash: FINISHED, its tag says how
    assert stopped.info.status == "FINISHED" and stopped.data.tags["csc.outcome"] == "stopped_early"
    # MO-ASHA on the objectives' rung figures: held-out EV and L0; trial_01 was alone at the rung before it
    reason = stopped.data.tags["csc.stop_reason"]
    assert reason.startswith("stopped at the rung at step 10 (reported at step 10): heldout/explained_variance ")
    assert reason.endswith("placed 2 of the 2 trials at that rung, and only the top 1/2 (1) continue") and \
        ("dominated by trial_01" in reason or "on the first front, placed after the others there" in reason)
    assert reason == rows["trial_02"]["reason"]
    # the rung figures are curves of every trial's run, beside the training figures
    assert [m.step for m in client.get_metric_history(done.info.run_id, "heldout/context_locality")] == \
        list(range(5, 41, 5))
    assert {"heldout/explained_variance", "heldout/l0", "heldout/nce", "heldout/seconds"} <= set(done.data.metrics)
    assert "sae" in {a.path for a in client.list_artifacts(stopped.info.run_id)}
    assert "dashboard.html" not in {a.path for a in client.list_artifacts(stopped.info.run_id)}  # not evaluated

    failed = runs["trial_03"]
    assert failed.info.status == "FAILED"
    assert "DivergenceError" in failed.data.tags["csc.failure_reason"]
    error = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(in_tmp / "dl"))).read_text()
    assert 'csc/sae/trainer.py", line' in error and "in _check_finite" in error and "\x1b[" not in error

    for run in [parent, *runs.values()]:
        assert not any(secret in v for v in [*run.data.params.values(), *run.data.tags.values()])
    for path in [*(in_tmp / "runs").rglob("*"), *(in_tmp / "mlartifacts").rglob("*")]:
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    assert secret not in "".join(capsys.readouterr())

    assert main(["report", str(result.sweep_dir)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("sweep 'tiny': 4 of 4 trials: ") and "1 failed" in summary
    assert f"the LM made {LM_SHARDS} shards" in summary
    assert re.search(r"CE/KL evaluations \([\d.]+ s beside the shards, [\d.]+ s of it the runs without an SAE, "
                     r"made once\)", summary)
    assert "where the trials' time went (seconds, summed over the " in summary and all(
        label in summary for _, label in WALL_TIME)
    assert "best trials (ev max, l0 min; the Pareto set):" in summary
    assert "\ntrial_0" in summary.split("the Pareto set")[1]
    # every rung decision, with the figures it was made on
    decisions = summary.split("early stopping: MO-ASHA on heldout/explained_variance (max), heldout/l0 (min), ties by "
                              "crowding distance; rungs at steps 10, 20 of 40, the top 1/2 of each continue; every "
                              "decision:\n")[1]
    assert decisions.startswith("  rung at step 10: heldout/explained_variance (max), heldout/l0 (min)\n"
                                "    trial_01  step 10    continue  place 1 of 1  [")
    assert re.search(r"\n    trial_02  step 10    stop      place 2 of 2  \[[0-9.]+  [0-9.]+\]", decisions)
    view = f"#/experiments/{result.experiment_id}/runs?viewStateShareKey=csc-tiny"
    assert f"open it with: csc ui; the sweep's view of the runs table (outcomes, searched values, figures): {view}\n" \
        in summary

    # csc eval measures a trial's exported SAE again, on the trial's own spec: the figures its run reported
    (result.sweep_dir / "trial_01" / "dashboard.html").unlink()
    assert main(["eval", str(result.sweep_dir / "trial_01")]) == 0
    out = capsys.readouterr().out
    ev = rows["trial_01"]["metrics"]["eval/explained_variance"]
    assert re.search(rf"^explained variance \(centred\) +{re.escape(f'{ev:.6g}')}$", out, re.M), out
    assert (result.sweep_dir / "trial_01" / "dashboard.html").is_file()
    assert main(["eval", str(result.sweep_dir), "--best", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n== tiny/trial_0") == 0 and out.count("explained variance (centred)") == 1  # one: no header
    assert main(["eval", str(result.sweep_dir / "trial_03")]) == 2
    assert "trial_03: the trial has no exported SAE (sae/cfg.json): it did not finish" in capsys.readouterr().err

    # The sweep's view of the runs table in the MLflow UI (a real server on this store, headless Chromium): each
    # trial's row shows its outcome, so finished, stopped and failed trials tell apart at a glance
    if shutil.which("chromium") is None and not os.environ.get("CI"):
        pytest.skip("the rest passed; rendering the runs page needs headless Chromium (Debian package `chromium`)")
    from csc.sweep.ui import MlflowServer, render_page, runs_page_url, screenshot, sweep_view

    with MlflowServer(f"sqlite:///{in_tmp / 'mlflow.db'}", str(in_tmp / "mlartifacts")) as server:
        url = runs_page_url(server.url, result.experiment_id, view=sweep_view("tiny"))
        dom = render_page(url, size=(2400, 900))
        if os.environ.get("CSC_SCREENSHOT"):  # README's picture (README.md says how it is made)
            screenshot(url, os.environ["CSC_SCREENSHOT"], size=(1800, 700))
    table = table_rows(dom)
    shown = {name: next((o for o in ("stopped_early", "finished", "failed") if o in text), None)
             for name, text in table.items() if name.startswith("trial_")}
    assert shown == {name: row["outcome"] for name, row in rows.items()}, table
    assert all(column in dom for column in ("csc.outcome", "trainer.beta", "trainer.lr", "eval/explained_variance"))


def table_rows(dom: str) -> dict[str, str]:
    """Run name -> the text of its row in a rendered MLflow runs table. The table (ag-grid) draws the pinned run-name
    column and the other columns as separate rows that share a row-index."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div[^>]*\brow-index="(\d+)"', dom)]
    text: dict[str, str] = {}
    for (a, index), b in zip(starts, [s for s, _ in starts[1:]] + [len(dom)]):
        text[index] = text.get(index, "") + " " + re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom[a:b]))
    names = {i: re.search(r"\b(trial_\d+|tiny)\b", t) for i, t in text.items()}
    return {m[1]: text[i] for i, m in names.items() if m}


def test_a_corpus_that_cannot_be_probed_fails_the_sweep_before_any_trial(in_tmp, cache, capsys):
    """The producer makes the probing set as the sweep starts: its error is `csc train`'s, field named."""
    overrides = ["--set", f"corpus.source={labelled_corpus(in_tmp)}", "--set", "corpus.label_field=kind",
                 "--set", "eval.probe_examples_per_class=500"]  # more examples than the held-out documents give
    path = tiny_sweep(in_tmp, cache)
    spec = load_spec(SweepSpec, path, [o for o in overrides if o != "--set"])
    with pytest.raises(CscError) as train_error:
        held_out_labels(spec.trial({}), Activations(spec.trial({})))  # what `csc train` checks before training
    assert "task 'seq' (corpus.label_field): 0 class(es)" in str(train_error.value)

    assert main(["sweep", str(path), *overrides, "--out", str(in_tmp / "runs")]) == 2
    assert f"csc: error: {train_error.value}\n" in capsys.readouterr().err
    assert not list((in_tmp / "runs" / "tiny").glob("trial_*")), "no trial ran"
