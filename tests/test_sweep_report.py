import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import matplotlib.pyplot as plt
from matplotlib.container import ErrorbarContainer

from csc.sweep.report import (best_trials, configurations, format_best, pareto_figure, pareto_front, pareto_plot,
                              progression_plot, repeated, write_configs_table, write_trials_table)


def trial(i, outcome, gamma, beta, temp, dict_size, steps_done, metrics, **extra):
    return {"trial": f"trial_{i:05d}", "outcome": outcome, "steps_done": steps_done, "steps_total": 300,
            "dict_size": dict_size, "metrics": metrics, **extra,
            "params": {"trainer.beta": beta, "trainer.gamma": gamma, "trainer.temperature": temp,
                       "sae.dict_size": dict_size}}


def train(loss, mse, ev, l0, nce=0.1):
    m = {"loss": loss, "mse": mse, "l1": 0.3, "ev": ev, "l0": l0, "dead_frac": 0.01}
    return m if nce is None else {**m, "nce": nce}


def held_out(ev, l0, ce, kl=0.1):
    m = {"eval/explained_variance": ev, "eval/l0": l0, "eval/ce_loss_recovered": ce, "eval/mse": 0.5,
         "eval/delta_ce": 2 * (1 - ce)}
    return m if kl is None else {**m, "eval/kl_spliced": kl}


@pytest.fixture
def rows():
    """A realistic mix: four finished (one without nce / kl), one stopped early, two failed (one with metrics that
    would beat every other trial, to show failures are excluded), one running."""
    return [
        trial(0, "finished", 0.0, 0.01, 0.5, 1024, 300, {**train(0.9, 0.5, 0.80, 40), **held_out(0.78, 42, 0.90)}),
        trial(1, "finished", 0.2, 0.03, 0.5, 1024, 300, {**train(0.8, 0.6, 0.75, 20), **held_out(0.74, 21, 0.88)}),
        trial(2, "finished", 1.0, 0.1, 0.1, 4096, 300, {**train(1.1, 0.7, 0.70, 8), **held_out(0.65, 9, 0.80)}),
        trial(3, "stopped_early", 0.5, 0.3, 0.5, 1024, 100, train(1.5, 0.4, 0.85, 60)),
        trial(4, "failed", 2.0, 0.01, 0.5, 1024, 0, {"ev": 0.99, "l0": 1.0}, reason="CUDA out of memory"),
        trial(5, "finished", 0.2, 0.01, 1.0, 4096, 300,
              {**train(0.95, 0.55, 0.72, 45, nce=None), **held_out(0.70, 48, 0.85, kl=None)}),
        trial(6, "failed", 0.05, 1.0, 0.5, 1024, 12, {}, reason="loss became NaN at step 12"),
        trial(7, "running", 0.1, 0.02, 0.2, 1024, 150, train(1.2, 0.8, 0.6, 30)),
    ]


def names(rs):
    return [r["trial"] for r in rs]


def test_trials_table_columns_and_cells(rows, tmp_path):
    rows[1]["params"]["trainer.lr"] = 3e-4  # searched by one trial only: still a column, empty elsewhere
    path = tmp_path / "trials.csv"
    write_trials_table(rows, path)
    with open(path, newline="") as f:
        header, *body = list(csv.reader(f))
    params = ["sae.dict_size", "trainer.beta", "trainer.gamma", "trainer.lr", "trainer.temperature"]
    # Whatever the trials reported, in order of first appearance, but delta CE and KL beside CE loss recovered.
    metrics = ["loss", "mse", "l1", "ev", "l0", "dead_frac", "nce", "eval/explained_variance", "eval/l0",
               "eval/ce_loss_recovered", "eval/delta_ce", "eval/kl_spliced", "eval/mse"]
    assert header == ["trial", "outcome", "steps_done", "steps_total", *params, *metrics, "reason"]
    table = {r["trial"]: r for r in (dict(zip(header, b)) for b in body)}
    assert list(table) == names(rows)
    t0 = table["trial_00000"]
    assert (t0["outcome"], t0["steps_done"], t0["steps_total"]) == ("finished", "300", "300")
    assert float(t0["eval/ce_loss_recovered"]) == 0.90 and float(t0["trainer.gamma"]) == 0.0
    assert t0["trainer.lr"] == "" and float(table["trial_00001"]["trainer.lr"]) == 3e-4
    assert table["trial_00005"]["nce"] == "" and table["trial_00005"]["eval/kl_spliced"] == ""
    assert float(table["trial_00005"]["eval/l0"]) == 48
    assert table["trial_00003"]["eval/l0"] == "" and float(table["trial_00003"]["ev"]) == 0.85
    failed = table["trial_00006"]
    assert failed["reason"] == "loss became NaN at step 12" and failed["steps_done"] == "12"
    assert all(failed[k] == "" for k in metrics)
    assert t0["reason"] == ""


def brute_front(points, minimize_x, maximize_y):
    def better_eq(a, b, minimize):
        return a <= b if minimize else a >= b

    def dominates(p, q):
        return (better_eq(p[0], q[0], minimize_x) and better_eq(p[1], q[1], not maximize_y)) and p != q

    return {i for i, q in enumerate(points) if not any(dominates(p, q) for p in points)}


@settings(max_examples=300, deadline=None)
@given(points=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=25),  # small grid: many ties
       minimize_x=st.booleans(), maximize_y=st.booleans())
def test_pareto_front_matches_brute_force(points, minimize_x, maximize_y):
    front = pareto_front([(float(x), float(y)) for x, y in points], minimize_x, maximize_y)
    assert len(front) == len(set(front))
    assert set(front) == brute_front(points, minimize_x, maximize_y)
    xs = [points[i][0] * (1 if minimize_x else -1) for i in front]
    assert xs == sorted(xs)  # best x first, so the front draws as a staircase


def test_pareto_front_example_with_duplicates_and_nan():
    points = [(1, 1), (1, 1), (2, 2), (0, 0), (2, 1), (math.nan, 5), (3, math.nan)]
    assert pareto_front(points) == [3, 0, 1, 2]
    assert pareto_front([]) == []


def test_best_trials_single_objective(rows):
    assert names(best_trials(rows, [("eval/explained_variance", "max")], n=2)) == ["trial_00000", "trial_00001"]
    # Only four trials have held-out metrics; n larger than that returns them all.
    assert names(best_trials(rows, [("eval/explained_variance", "max")])) == [
        "trial_00000", "trial_00001", "trial_00005", "trial_00002"]
    # The failed trial_00004 reports l0 = 1 but never appears.
    assert names(best_trials(rows, [("l0", "min")], n=3)) == ["trial_00002", "trial_00001", "trial_00007"]


def test_best_trials_multi_objective(rows):
    # Training figures: trial_00005 (0.72, 45) is dominated by trial_00000 (0.80, 40), trial_00007 (0.6, 30) by
    # trial_00001 (0.75, 20); the failed trial_00004 (0.99, 1) would dominate them all but is excluded.
    assert names(best_trials(rows, [("ev", "max"), ("l0", "min")])) == [
        "trial_00003", "trial_00000", "trial_00001", "trial_00002"]
    # Held-out figures exist for finished trials only; trial_00005 (48, 0.85) is dominated by trial_00000 (42, 0.90).
    assert names(best_trials(rows, [("eval/l0", "min"), ("eval/ce_loss_recovered", "max")])) == [
        "trial_00002", "trial_00001", "trial_00000"]
    with pytest.raises(ValueError):
        best_trials(rows, [("ev", "maximise")])


def test_format_best(rows):
    objectives = [("ev", "max"), ("l0", "min")]
    best = best_trials(rows, objectives)
    text = format_best(best, objectives, ["trainer.beta", "trainer.gamma"])
    lines = text.splitlines()
    assert len(lines) == 2 + len(best)
    assert lines[0].split() == ["trial", "outcome", "steps", "trainer.beta", "trainer.gamma", "ev", "(max)", "l0",
                                "(min)", "eval/explained_variance", "eval/ce_loss_recovered", "eval/delta_ce",
                                "eval/kl_spliced"]
    for r in best:
        assert r["trial"] in text
    early = next(line for line in lines if "trial_00003" in line)
    assert early.split()[-4:] == ["-"] * 4 and "100/300" in early  # stopped early: no held-out figures
    t0 = next(line for line in lines if "trial_00000" in line)
    assert t0.split()[-4:] == ["0.78", "0.9", "0.2", "0.1"]
    assert format_best([{"trial": "x", "metrics": {"ev": 1 / 3}}], [("ev", "max")], ["p"]).splitlines()[-1].split() \
        == ["x", "-", "-/-", "-", "0.3333"]


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_realistic_mix(rows, tmp_path):
    pareto_plot(rows, tmp_path / "pareto.png")
    progression_plot(rows, tmp_path / "progression.png")
    assert_png(tmp_path / "pareto.png")
    assert_png(tmp_path / "progression.png")


def test_plots_without_gamma_with_categorical_param(rows, tmp_path):
    for r in rows:
        activation = "topk" if r["steps_done"] else "relu"
        r["params"] = {"trainer.beta": r["params"]["trainer.beta"], "sae.activation": activation}
    pareto_plot(rows, tmp_path / "pareto.png")
    progression_plot(rows, tmp_path / "progression.png")
    assert_png(tmp_path / "pareto.png")
    assert_png(tmp_path / "progression.png")


@pytest.mark.parametrize("which", ["all_failed", "empty"])
def test_plots_without_finished_trials(rows, tmp_path, which):
    rows = [r for r in rows if r["outcome"] == "failed"] if which == "all_failed" else []
    pareto_plot(rows, tmp_path / "pareto.png")
    progression_plot(rows, tmp_path / "progression.png")
    assert_png(tmp_path / "pareto.png")
    assert_png(tmp_path / "progression.png")


def test_report_never_imports_ray_or_mlflow():
    code = ("import sys, csc.sweep.report\n"
            "sys.exit(sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'mlflow')) != [])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def seeded(i, beta, seed, outcome, ev=0.0, l0=0.0):
    """A trial of a sweep that runs each configuration (trainer.beta) over seeds 0, 1, 2."""
    metrics = {**train(1.0, 0.5, ev + 0.02, l0 - 1), **held_out(ev, l0, ev + 0.1)} if outcome == "finished" else \
        train(1.5, 0.4, 0.3, 60) if outcome == "stopped_early" else {}
    return {"trial": f"trial_{i:02d}", "outcome": outcome, "steps_done": 300 if outcome == "finished" else 100,
            "steps_total": 300, "dict_size": 1024, "metrics": metrics,
            "params": {"trainer.beta": beta, "trainer.seed": seed}}


@pytest.fixture
def seeded_rows():
    """Three configurations over three seeds: every seed finished; ASHA stopped them; one seed failed."""
    return [seeded(1, 0.01, 0, "finished", 0.80, 40), seeded(2, 0.01, 1, "finished", 0.70, 44),
            seeded(3, 0.01, 2, "finished", 0.75, 42),
            *(seeded(4 + s, 0.1, s, "stopped_early") for s in range(3)),
            seeded(7, 0.03, 0, "finished", 0.60, 20), seeded(8, 0.03, 1, "failed"),
            seeded(9, 0.03, 2, "finished", 0.64, 22)]


def test_configurations_have_the_mean_and_spread_over_their_seeds(seeded_rows, rows):
    configs = configurations(seeded_rows)
    assert [c["config"] for c in configs] == ["config_01", "config_02", "config_03"] and repeated(configs)
    a, b, c = configs
    assert a["trials"] == ["trial_01", "trial_02", "trial_03"] and a["seeds"] == [0, 1, 2]
    assert a["params"] == {"trainer.beta": 0.01} and (a["outcome"], a["n"], a["steps_done"]) == ("finished", 3, 300)
    assert a["metrics"]["eval/explained_variance"] == pytest.approx(0.75)
    assert a["spread"]["eval/explained_variance"] == pytest.approx(0.05)  # sample std of 0.80, 0.70, 0.75
    assert a["metrics"]["eval/l0"] == pytest.approx(42) and a["spread"]["eval/l0"] == pytest.approx(2)
    assert (b["outcome"], b["n"], b["metrics"], b["spread"], b["steps_done"]) == ("stopped_early", 0, {}, {}, 100)
    assert (c["outcome"], c["n"]) == ("failed", 2)  # its two finished seeds still have their mean in the table
    assert c["metrics"]["eval/l0"] == pytest.approx(21) and c["spread"]["eval/l0"] == pytest.approx(2 ** 0.5)
    assert not repeated(configurations(rows))  # one trial per configuration: the reports show trials


def test_configs_table_and_trials_table_link_by_configuration(seeded_rows, tmp_path):
    configs = configurations(seeded_rows)
    write_configs_table(configs, tmp_path / "configs.csv")
    with open(tmp_path / "configs.csv", newline="") as f:
        header, *body = list(csv.reader(f))
    assert header[:6] == ["config", "outcome", "seeds", "finished", "trials", "trainer.beta"]
    assert header[6:8] == ["loss mean", "loss std"] and "trainer.seed" not in header
    table = {r["config"]: r for r in (dict(zip(header, b)) for b in body)}
    a = table["config_01"]
    assert (a["outcome"], a["seeds"], a["finished"]) == ("finished", "3", "3")
    assert a["trials"] == "trial_01 trial_02 trial_03"
    assert float(a["eval/explained_variance mean"]) == pytest.approx(0.75)
    assert float(a["eval/explained_variance std"]) == pytest.approx(0.05)
    assert table["config_02"]["ev mean"] == "" and table["config_03"]["finished"] == "2"

    of = {t: c["config"] for c in configs for t in c["trials"]}
    write_trials_table([{**r, "config": of[r["trial"]]} for r in seeded_rows], tmp_path / "trials.csv")
    with open(tmp_path / "trials.csv", newline="") as f:
        header, *body = list(csv.reader(f))
    assert header[:3] == ["trial", "config", "outcome"] and body[4][:2] == ["trial_05", "config_02"]


def test_best_configurations_show_mean_and_spread(seeded_rows):
    configs = [c for c in configurations(seeded_rows) if c["outcome"] == "finished"]
    objectives = [("eval/explained_variance", "max")]
    best = best_trials(configs, objectives)
    assert [c["config"] for c in best] == ["config_01"]
    header, _, line = format_best(best, objectives, ["trainer.beta"]).splitlines()
    assert header.split()[:5] == ["configuration", "seeds", "outcome", "steps", "trainer.beta"]
    assert line.split()[:8] == ["config_01", "3", "finished", "300/300", "0.01", "0.75", "±", "0.05"]


def test_pareto_plot_draws_configurations_with_error_bars(seeded_rows, rows, tmp_path):
    fig = pareto_figure(seeded_rows)
    a, bars = fig.axes[0], [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2]) == 2  # one x and one y error bar collection
    assert [seg[:, 1].tolist() for seg in bars[0].lines[2][1].get_segments()] == \
        [pytest.approx([0.70, 0.80])]  # config_01 only: ev 0.75 +- 0.05 (config_03 has a failed seed)
    assert [t.get_text() for t in a.texts] == ["c1", "4", "5", "6"]  # configurations, and the stopped trials
    plain = pareto_figure(rows)
    assert not any(isinstance(c, ErrorbarContainer) for c in plain.axes[0].containers)
    plt.close(fig)
    plt.close(plain)
    pareto_plot(seeded_rows, tmp_path / "pareto.png")
    assert_png(tmp_path / "pareto.png")


def test_pareto_plot_shows_an_objective_the_four_panels_lack_and_rings_the_sweeps_pareto_set(rows):
    """A sweep on delta CE, L0 and context locality: locality against delta CE in a fifth panel, and the trials of
    the Pareto set in all three objectives ringed in every panel."""
    for r, loc in zip(rows, [1.1, 1.3, 1.2, None, None, 1.0, None, None]):
        if loc is not None:
            r["metrics"]["eval/context_locality"] = loc
    objectives = [("eval/delta_ce", "min"), ("eval/l0", "min"), ("eval/context_locality", "max")]
    fig = pareto_figure(rows, objectives)
    visible = [ax for ax in fig.axes if ax.axison and ax.get_title()]
    assert [ax.get_title() for ax in visible][-1] == "(e) context_locality vs delta CE"
    extra = visible[-1]
    # trial 1 (delta CE 0.24, locality 1.3), trial 2 (0.4, 1.2), trial 0 (0.2, 1.1) and trial 5 (0.3, 1.0) finished
    xs = sorted(x for x, _ in extra.collections[0].get_offsets().tolist())
    assert xs == pytest.approx([0.2, 0.24, 0.3, 0.4])
    # the Pareto set in (delta CE, L0, locality): trial 0 (best delta CE), 1 (best locality), 2 (best L0); not 5
    ringed = sorted(x for x, _ in extra.collections[1].get_offsets().tolist())
    assert ringed == pytest.approx([0.2, 0.24, 0.4])
    assert len(pareto_figure(rows).axes) == 4 + 1  # without objectives: the four panels and the gamma colour bar
    # a stopped trial is drawn at its training figures, or where it has them, at its held-out rung figures
    offsets = [c.get_offsets().tolist() for c in visible[0].collections]
    assert [[60.0, 0.85]] in offsets
    rows[3]["metrics"].update({"heldout/l0": 55.0, "heldout/explained_variance": 0.7})
    offsets = [c.get_offsets().tolist() for c in pareto_figure(rows, objectives).axes[0].collections]
    assert [[55.0, 0.7]] in offsets and [[60.0, 0.85]] not in offsets
    plt.close("all")
