"""The benchmark scripts still run against the current code (tiny sizes; their figures are not checked here:
speed claims live in bench/README.md, printed by these scripts, never asserted in tests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, cache: Path | None = None) -> str:
    env = {**os.environ, **({"CSC_CACHE_DIR": str(cache)} if cache else {})}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_sae_step_prints_its_table():
    out = run("sae_step.py", "--d", "32", "--dict", "64", "--batch", "64", "--steps", "2", "--rounds", "1",
              "--negatives", "16")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert {"plain PyTorch SAE step", "csc trainer, gamma=0", "csc trainer, gamma=0.1, partners in the batch",
            "csc trainer, gamma=0.1, encoded partners", "csc trainer, gamma=0.1, partners in the batch, 16 negatives",
            "dense, all B (csc)", "sparse codes, all B (CSR x dense)"} <= set(names)
    # one line per contrastive row; bounds from the shapes: 4·B²·m, + 4·B·d·m, 6·B·N·m over 10·B·d·m
    bounds = re.findall(r"contrastive overhead: -?\d+% \(arithmetic bound: (\d+)%\); rounds -?\d+ to -?\d+%", out)
    assert bounds == ["80", "120", "30"]


def test_producer_throughput_on_the_tiny_model(tmp_path):
    out = run("producer_throughput.py", "--model", "tiny-gemma2", "--layer", "2", "--batch", "2", "--context", "16",
              "--iters", "1", cache=tmp_path)
    assert "csc pipeline" in out and "full forward, eager" in out


def test_eval_cost_on_the_tiny_model(tmp_path):
    out = run("eval_cost.py", "--model", "tiny-gemma2", "--layer", "1", "--contexts", "4", "--context", "16",
              "--dict", "64", "--rounds", "2", cache=tmp_path)
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["row", "former, per SAE", "now, once (clean_runs)", "now, per SAE (spliced_scores)",
                    "now, one SAE alone (splice_scores)"]
    # tiny Gemma 2: 4 layers of b = 37,120 weights, V h = 260 x 64; former 4 (4 b + V h), now (4 - 2) b + 2 V h
    assert "(arithmetic bound 6.14x: 0.6605M against 0.1075M multiply-adds per token)" in out
    assert re.search(r"8 SAEs: [\d.]+ s former, [\d.]+ s now \([\d.]+x\)", out)


def test_pairing_stats_on_the_tiny_model(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("model: {name: tiny-gemma2}\nactivations: {layer: 2, context_length: 16, contexts_per_shard: 4, "
                    "train_tokens: 128, eval_tokens: 64}\n")
    out = run("pairing_stats.py", "--spec", str(spec), "--shards", "1", cache=tmp_path / "cache")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["rule", "similar_attention", "attended", "previous", "random"]
    assert "anchors' mean attention to BOS" in out


def test_quality_interpolates_in_log_l0():
    sys.path.insert(0, str(BENCH))
    try:
        from quality import interpolate
    finally:
        sys.path.remove(str(BENCH))
    pts = [{"l0": 10.0, "ev": 0.5}, {"l0": 1000.0, "ev": 0.9}, {"l0": 100.0, "ev": 0.7}]
    assert abs(interpolate(pts, 100.0, "ev") - 0.7) < 1e-12
    assert abs(interpolate(pts, 10 ** 1.5, "ev") - 0.6) < 1e-12  # halfway between 10 and 100 in log L0
    assert interpolate(pts, 5.0, "ev") is None and interpolate(pts, 2000.0, "ev") is None


def test_contrastive_grid_table_pairs_each_trial_with_its_gamma_zero_twin(tmp_path):
    import json

    def row(gamma, pairing, seed, nce, ev, outcome="finished", **params):
        return {"trial": f"t{gamma}{pairing}{seed}", "outcome": outcome,
                "params": {"trainer.gamma": gamma, "activations.pairing": pairing, "trainer.seed": seed, **params},
                "metrics": {"eval/l0": 60.0, "eval/explained_variance": ev, "eval/delta_ce": 1.0, "eval/kl_spliced": 1.0,
                            "eval/ce_loss_recovered": 0.9, "eval/nce": nce, "eval/nce_chance": 6.0,
                            "eval/code_sim_positive": 0.1, "eval/code_sim_negative": 0.0,
                            "eval/probe_seq_sae_top_5": 0.7 + gamma}}

    spec = {"spec": {"activations": {"pairing": "previous"}, "trainer": {"gamma": 0.1, "seed": 0, "balance": False},
                     "sweep": {"method": "grid"}}}
    grid, balance = tmp_path / "grid", tmp_path / "balance"
    for d in grid, balance:
        d.mkdir()
        (d / "csc_sweep.json").write_text(json.dumps(spec))
    rows = [row(0.0, "previous", s, 6.0 - 0.01 * s, 0.5 + 0.01 * s) for s in range(3)]
    rows += [row(0.1, "previous", s, 5.9 - 0.01 * s, 0.48 + 0.01 * s) for s in range(3)]
    rows.append(row(0.1, "previous", 3, 1.0, 0.0, outcome="failed"))  # not finished: left out
    (grid / "trials.json").write_text(json.dumps(rows))
    # a second sweep without gamma = 0 trials: its twins come from the first (balance is inert at gamma = 0)
    rows = [row(0.1, "previous", s, 5.8 - 0.01 * s, 0.47 + 0.01 * s, **{"trainer.balance": True}) for s in range(3)]
    (balance / "trials.json").write_text(json.dumps(rows))
    out = run("contrastive_grid.py", str(grid), str(balance))
    assert "9 finished trials" in out
    diff = [line for line in out.splitlines() if line.startswith("| 0.1 | False | 3 |")]
    assert len(diff) == 4  # per section (reconstruction, features): the cell table and the paired differences
    cells = [c.strip() for c in diff[1].split("|")]
    # paired differences are constant over seeds here: EV -0.020 +/- 0, nce -0.100 +/- 0
    assert cells[5] == "-0.020 ± 0.000" and cells[9] == "-0.100 ± 0.000"
    features = [c.strip() for c in diff[3].split("|")]
    assert features[6] == "0.100 ± 0.000"  # genre top-5: the only feature figure these trials report...
    assert features[7] == "-"  # ...the others show as missing, not as zero
    balanced = [line for line in out.splitlines() if line.startswith("| 0.1 | True | 3 |")]
    cells = [c.strip() for c in balanced[1].split("|")]
    assert cells[1:4] == ["0.1", "True", "3"]  # pairing is the same everywhere: not a column
    assert cells[5] == "-0.030 ± 0.000" and cells[9] == "-0.200 ± 0.000"
    # A third sweep with another pairing rule and no twin of its own: its features pair with the gamma = 0 trials
    # of the first (the rule only changes what a gamma = 0 SAE is measured with), its InfoNCE with none.
    control = tmp_path / "control"
    control.mkdir()
    (control / "csc_sweep.json").write_text(json.dumps(spec))
    (control / "trials.json").write_text(json.dumps([row(0.1, "random", s, 5.95, 0.49) for s in range(3)]))
    out = run("contrastive_grid.py", str(grid), str(balance), str(control))
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 0.1 | random | False |")]
    assert [r[4].strip() for r in rows] == ["3", "0", "3", "3"]  # per section: seeds, then pairs
    assert rows[1][10].strip() == "-" and rows[3][7].strip() == "0.100 ± 0.000"


def test_contrastive_grid_pairs_with_the_twin_named_by_against(tmp_path):
    """--against FIELD=VALUE: each trial's twin has VALUE there (here the store), the same gamma and seed; --inert
    leaves a field that differs between the arms out of the matching."""
    import json

    def row(store, gamma, seed, ev, probe):
        return {"trial": f"t{store}{gamma}{seed}", "outcome": "finished",
                "params": {"trainer.gamma": gamma, "activations.store_dtype": store, "trainer.seed": seed,
                           "eval.probe_examples_per_class": probe},
                "metrics": {"eval/explained_variance": ev, "eval/nce_chance": 6.0}}

    spec = {"spec": {"trainer": {"gamma": 0.1, "seed": 0}, "sweep": {"method": "grid"}}}
    arms = {"fp32": [row("float32", g, s, 0.5 + g + 0.01 * s, 128) for g in (0.0, 0.1) for s in range(3)],
            "bf16": [row("bfloat16", g, s, 0.49 + g + 0.01 * s + 0.001 * s, 16) for g in (0.0, 0.1) for s in range(3)]}
    for name, rows in arms.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "csc_sweep.json").write_text(json.dumps(spec))
        (tmp_path / name / "trials.json").write_text(json.dumps(rows))
    dirs = [str(tmp_path / "fp32"), str(tmp_path / "bf16")]
    out = run("contrastive_grid.py", *dirs, "--against", "activations.store_dtype=float32",
              "--inert", "eval.probe_examples_per_class")
    assert "Paired differences from the store_dtype = float32 twin" in out
    paired = out.split("Paired differences from the store_dtype = float32 twin")[1].split("##")[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in paired.splitlines() if line.startswith("| 0")]
    assert [r[:5] for r in rows] == [["0", "bfloat16", "16", "3", "-"], ["0.1", "bfloat16", "16", "3", "-"]]
    assert rows[0][5] == rows[1][5] == "-0.009 ± 0.001"  # EV, bf16 - fp32 per seed: -0.01 + 0.001 * seed
    # without --inert the probing field differs between the arms, so no trial has a twin
    out = run("contrastive_grid.py", *dirs, "--against", "activations.store_dtype=float32")
    paired = out.split("Paired differences from the store_dtype = float32 twin")[1].split("##")[0]
    assert [line.split("|")[4].strip() for line in paired.splitlines() if line.startswith("| 0")] == ["0", "0"]


def test_scale_study_lines_up_budgets_and_pairs_each_trial_with_its_twin(tmp_path):
    """bench/scale_study.py: one row per setting and budget (steps x batch), gamma = 0 trials one setting whatever their
    tau and pairing, paired differences against the twin of the same architecture, budget and seed; the plot."""
    import json

    def row(steps, gamma, tau, pairing, seed, dce, arch="relu"):
        return {"trial": f"t{steps}{gamma}{tau}{pairing}{seed}{arch}", "outcome": "finished",
                "params": {"trainer.gamma": gamma, "trainer.temperature": tau, "activations.pairing": pairing,
                           "trainer.seed": seed, "sae.architecture": arch},
                "metrics": {"eval/delta_ce": dce, "eval/l0": 60.0, "eval/context_locality": 0.5 + gamma,
                            "eval/nce": 6.0 - gamma}}

    dirs = []
    for steps in (160, 2560):
        d = tmp_path / f"s{steps}"
        d.mkdir()
        spec = {"spec": {"trainer": {"steps": steps, "batch_size": 512, "seed": 0}, "sweep": {"method": "grid"}}}
        (d / "csc_sweep.json").write_text(json.dumps(spec))
        base = 3.5 if steps == 160 else 0.6
        rows = [row(steps, 0.0, 1.0, "similar_attention", s, base + 0.01 * s) for s in range(3)]
        rows += [row(steps, 0.1, 1.0, "previous", s, base + 0.3 + 0.02 * s) for s in range(3)]
        rows.append(row(steps, 0.0, 1.0, "similar_attention", 0, base - 0.2, arch="topk"))
        (d / "trials.json").write_text(json.dumps(rows))
        dirs.append(str(d))
    png = tmp_path / "scale.png"
    out = run("scale_study.py", *dirs, "--plot", str(png))
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in line.split("|")[4:-1]]
             for line in out.splitlines() if line.startswith("| relu") or line.startswith("| topk")}
    assert lines[("relu", "81,920", "3")][0] == "3.510 ± 0.010"
    assert lines[("relu", "1,310,720", "3")][0] == "0.610 ± 0.010"
    assert lines[("topk", "1,310,720", "1")][0] == "0.400 ± 0.000"
    paired = out.split("Paired differences")[1]
    diff = [line for line in paired.splitlines() if line.startswith("| relu, gamma 0.1, tau 1, previous | 1,310,720")]
    cells = [c.strip() for c in diff[0].split("|")]
    assert cells[3:5] == ["3", "0.310 ± 0.010"]  # 0.3 + 0.01 * seed per pair
    assert cells[8] == "-"  # held-out InfoNCE: the twins were measured with the paper's pairs, this trial with previous
    assert png.stat().st_size > 10_000
    # A sweep given twice (or a variant of the same setting beside it) would overwrite seeds silently: refused
    out = subprocess.run([sys.executable, str(BENCH / "scale_study.py"), dirs[0], dirs[0]], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "both hold relu at" in out.stderr and "seed 0" in out.stderr


def test_saebench_crosscheck_runs_its_help_and_table_without_saebench():
    # the script itself runs in a separate SAEBench venv (bench/saebench_env.sh); here only what needs neither
    out = run("saebench_crosscheck.py", "--help")
    assert "--csc-python" in out and "--seeds" in out
    sys.path.insert(0, str(BENCH))
    try:
        from saebench_crosscheck import format_table
    finally:
        sys.path.remove(str(BENCH))
    table = format_table([{"figure": "ce_loss_score", "csc": 0.9, "saebench": 0.85},
                          {"figure": "probe_seq_llm, SAEBench's torch probe", "saebench": 0.5, "saebench_spread": 0.01},
                          {"figure": "kl_div_score", "csc": 0.5, "saebench": float("nan")}])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()]
    assert rows[0][:4] == ["figure", "csc", "SAEBench", "difference"]
    assert rows[2][1:6] == ["0.9000", "0.8500", "0.0500", "-", "-"]
    assert rows[3][1:6] == ["-", "0.5000", "-", "-", "0.0100"]
    assert rows[4][2:4] == ["nan", "nan"]


@pytest.mark.usefixtures("one_torch_thread")
def test_contrastive_grid_computes_absorption_post_hoc_once(tmp_path, capsys, monkeypatch):
    """--absorption: trials whose rows lack absorption get the figures absorption_scores gives their exported SAE
    (on the LM part of their spec), cached beside the sweep and read back on a rerun; a sweep whose LM probe finds
    too few letters shows why, not numbers."""
    import json

    import torch
    import yaml

    from csc.activations.source import Activations
    from csc.spec_loader import load_spec
    from csc.pipeline import absorption
    from csc.pipeline.run import hook_info
    from csc.sae.archs import build_sae
    from csc.sae.export import load_sae, save_sae
    from csc.sweep.spec import SweepSpec

    sys.path.insert(0, str(BENCH))
    try:
        import contrastive_grid
    finally:
        sys.path.remove(str(BENCH))
    search = {"trainer.gamma": {"type": "choice", "values": [0.0, 0.1]},
              "trainer.seed": {"type": "choice", "values": [0, 1]}}
    # Layer 1 of the tiny LM: its letter probe finds one letter of 52 words, enough at absorption_min_letters 1
    data = {"model": {"name": "tiny-gemma2"}, "sae": {"dict_size": 64, "layer_norm": False},
            "activations": {"layer": 1, "context_length": 32, "contexts_per_shard": 8, "lm_batch_size": 4,
                            "train_tokens": 512, "eval_tokens": 256, "cache_dir": str(tmp_path / "cache")},
            "trainer": {"steps": 200}, "eval": {"absorption_min_letters": 1},
            "sweep": {"method": "grid", "search": search}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(SweepSpec, tmp_path / "s.yaml")

    def sweep(name: str, sweep_spec: dict, params: list[dict], done: dict[int, dict] | None = None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "csc_sweep.json").write_text(json.dumps({"spec": sweep_spec}))
        rows = []
        for i, p in enumerate(params):
            torch.manual_seed(i)
            sae = build_sae(spec.sae.model_copy(update={"d_in": 64}))
            save_sae(sae, folder / f"trial_{i:02d}" / "sae", hook_info(spec.trial(p), 0.5))
            rows.append({"trial": f"trial_{i:02d}", "outcome": "finished", "params": p,
                         "metrics": {"eval/l0": 30.0 + i, "eval/nce_chance": 6.0, **(done or {}).get(i, {})}})
        (folder / "trials.json").write_text(json.dumps(rows))
        return folder

    params = [{"trainer.gamma": g, "trainer.seed": s} for g in (0.0, 0.1) for s in (0, 1)]
    measured = {"eval/absorption_fraction": 0.5, "eval/absorption_letters": 1.0}
    grid = sweep("grid", spec.model_dump(mode="json"), params, {3: measured})  # trial_03 measured when it trained
    # A sweep from before absorption: its spec lacks the fields, which take their defaults (20 letters: too many)
    old = spec.model_dump(mode="json")
    old["eval"] = {k: v for k, v in old["eval"].items() if not k.startswith("absorption")}
    before = sweep("before", old, [{"trainer.gamma": 0.1, "trainer.seed": 0}])

    contrastive_grid.main([str(grid), str(before), "--absorption"])
    out = capsys.readouterr().out
    cached = json.loads((grid / contrastive_grid.POSTHOC_FILE).read_text())["trials"]
    assert sorted(cached) == ["trial_00", "trial_01", "trial_02"]  # trial_03 has its own
    trial = spec.trial(params[0])
    lm_part = absorption.absorption_set(trial, Activations(trial))
    for name in cached:
        sae, _ = load_sae(grid / name / "sae")
        want = absorption.absorption_scores(sae, lm_part, 0.5, trial.eval.absorption_seed)
        assert set(want) == {"absorption_fraction", "absorption_full", "absorption_split_features",
                             "absorption_letters"}, "the tiny LM's probe no longer finds a letter at layer 1"
        assert cached[name]["figures"] == {f"eval/{k}": v for k, v in want.items()}
        assert cached[name]["fields"]["eval.absorption_min_letters"] == 1 and cached[name]["commit"]
    assert "(3 computed now, 0 read from" in out and "abs. letters†" in out
    old_entry = json.loads((before / contrastive_grid.POSTHOC_FILE).read_text())["trials"]["trial_00"]
    assert old_entry["figures"] == {"eval/absorption_letters": 1.0}  # the letter is there, 19 short
    assert old_entry["fields"]["eval.absorption_min_letters"] == 20
    assert "absorption's SAE figures left out for before/trial_00: the LM's first-letter probe reaches F1" in out

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(absorption, "absorption_set", refuse)
    monkeypatch.setattr(absorption, "absorption_scores", refuse)
    contrastive_grid.main([str(grid), str(before), "--absorption"])
    again = capsys.readouterr().out
    assert "(0 computed now, 3 read from" in again
    table = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(again) == table(out)
    # Paired differences of the features (the last row of gamma 0.1 of the first sweep, whose spec has
    # eval.absorption True where the second's has none: a column): seed 0's post-hoc figures against its twin's
    # (seed 1's trials.json has no absorption_full)
    paired = [line.split("|") for line in table(out) if line.startswith("| 0.1 | True |")]
    want = cached["trial_02"]["figures"]["eval/absorption_full"] - cached["trial_00"]["figures"]["eval/absorption_full"]
    assert paired[-1][-4].strip() == f"{want:.3f} ± 0.000"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_hypervolume_of_known_boxes():
    hv = _bench_module("scheduler_replay").hypervolume
    assert hv([[0.5, 0.5]], [1, 1]) == pytest.approx(0.25)
    assert hv([[0.0, 0.5], [0.5, 0.0]], [1, 1]) == pytest.approx(0.75)
    assert hv([[0.0, 0.0, 0.5], [0.5, 0.5, 0.0]], [1, 1, 1]) == pytest.approx(0.5 + 0.25 - 0.125)
    assert hv([[0.2, 0.2, 0.2], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0]], [1, 1, 1]) == pytest.approx(0.8 ** 3)


def test_scheduler_replay_on_a_full_budget_sweep_folder(tmp_path):
    """A sweep folder as a full-budget sweep leaves it, with synthetic curves: trial n's figures get better with n."""
    import json

    sweep = tmp_path / "grid"
    objectives = [{"metric": "eval/delta_ce", "mode": "min"}, {"metric": "eval/l0", "mode": "min"}]
    sweep.mkdir()
    (sweep / "csc_sweep.json").write_text(json.dumps({"spec": {"sweep": {"objectives": objectives},
                                                                 "trainer": {"steps": 40}}}))
    for n in range(1, 7):
        name = f"trial_{n:02d}"
        (sweep / name).mkdir()
        reports = [{"step": s, "ev": 0.1 * n, "heldout/explained_variance": 1 - 1 / (n * s),
                    "heldout/normalized_mse": 1 / (n * s), "heldout/l0": 100 - n,
                    "config": {"trainer.gamma": 0.1 * (n % 2)}, "time_total_s": s / 10 + 2 * (s == 40)}
                   for s in range(10, 41, 10)]
        reports[-1].update({"eval/delta_ce": 3.0 - 0.1 * n, "eval/l0": 100.0 - n})  # the final report's
        (sweep / name / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
    (sweep / "trial_07").mkdir()  # still running: not replayed
    (sweep / "trial_07" / "result.json").write_text(json.dumps({"step": 10, "ev": 0.1}) + "\n")
    out = run("scheduler_replay.py", str(sweep), "--orders", "4", "--grace", "15", "--rf", "2",
              "--plot", str(tmp_path / "replay.png"))
    table = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}
    assert "orders of all 6 trials" in out
    assert set(table) == {"scheduler", "none", "ASHA, training ev", "ASHA, held-out ev", "MO-ASHA, epsilon-net",
                          "MO-ASHA, crowding", "random"}
    assert [c.strip() for c in table["none"][:6]] == ["1.000 ± 0.000", "1.000", "1.000 ± 0.000", "1.000 ± 0.000",
                                                      "1.000 ± 0.000", "1.000 ± 0.000"]
    # trial_06 dominates every other trial: it alone makes the front, and the schedulers that rank on figures
    # which grow with n keep it whatever the order (it is never behind another trial)
    for name in ("ASHA, training ev", "MO-ASHA, epsilon-net"):
        assert table[name][0].strip() == "1.000 ± 0.000" and float(table[name][3].split("±")[0]) < 1
    assert (tmp_path / "replay.png").read_bytes().startswith(b"\x89PNG")


def test_optuna_pruned_prints_both_arms():
    out = run("optuna_pruned.py", "--seeds", "2", "--trials", "14", "--startup", "6")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["stopped trials told as", "pruned", "failed"]


def test_rung_slice_on_the_tiny_model(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "model: {name: tiny-gemma2}\nactivations: {layer: 2, context_length: 16, contexts_per_shard: 4, "
        "train_tokens: 256, eval_tokens: 64}\nsae: {dict_size: 32}\ntrainer: {steps: 12, batch_size: 32, "
        "lr_warmup_steps: 2, beta_warmup_steps: 2, gamma_warmup_steps: 2, log_every: 4}\n"
        "sweep: {search: {trainer.beta: {type: loguniform, low: 0.01, high: 0.1}, "
        "sae.dict_size: {type: choice, values: [16, 32]}}, scheduler: null}\n")
    out = run("rung_slice.py", "--spec", str(spec), "--configs", "3", "--at", "6", "12", "--slices", "2", "3",
              "--reference", "4", cache=tmp_path / "cache")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows[:3] == ["figure", "explained_variance", "explained_variance"] and rows[-4:] == ["C", "2", "3", "4"]


def test_eval_noise_on_two_tiny_runs(tmp_path):
    """bench/eval_noise.py: per-context CE/KL of each SAE, whose mean is `csc eval`'s pooled figure, and the table of
    the seed spread against the standard errors of one SAE and of a paired difference."""
    import json

    from csc.config import TrainRunSpec
    from csc.pipeline.run import train_run
    from csc.spec_loader import load_spec

    tiny = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
            "activations.contexts_per_shard=8", "activations.train_tokens=512", "activations.eval_tokens=256",
            f"activations.cache_dir={tmp_path / 'cache'}", "sae.dict_size=32", "trainer.steps=8",
            "trainer.batch_size=32", "trainer.lr_warmup_steps=2", "trainer.beta_warmup_steps=2",
            "trainer.gamma_warmup_steps=2", "trainer.log_every=4", "eval.ce_contexts=4", "eval.absorption=false",
            "eval.probe_examples_per_class=16"]
    runs = []
    for name, seed, gamma in (("seed0", 0, 0.0), ("seed1", 1, 0.0), ("gamma", 0, 0.5)):  # two twins; one paired
        spec = load_spec(TrainRunSpec, None, [*tiny, f"trainer.seed={seed}", f"trainer.gamma={gamma}"])
        train_run(spec, tmp_path / name)
        runs.append(tmp_path / name)
    out = run("eval_noise.py", str(runs[0]), str(runs[1]), "--paired", str(runs[2]), "--contexts", "4",
              cache=tmp_path / "cache")
    pooled = json.loads((runs[0] / "eval.json").read_text())
    first = next(line for line in out.splitlines() if line.startswith(f"{runs[0]} (seed 0)"))
    assert f"delta_ce {pooled['delta_ce']:.4f}" in first  # the per-context mean is the pooled figure
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(table) == {"figure", "delta_ce", "kl_spliced"}
    assert len(table["delta_ce"][1].split("/")) == 3 and table["delta_ce"][2].strip() != "-"


def test_sweep_amortisation_on_the_tiny_model(tmp_path):
    """bench/sweep_amortisation.py's three arms at K = 2 (shared producer, own LM, one process): the one-process arm
    runs the LM once for both trainers, as the shared producer does; the issue's target line is printed."""
    spec = tmp_path / "tiny.yaml"  # the bench sets steps to one pass over --train-tokens (7 batches of 32 here)
    spec.write_text("model: {name: tiny-gemma2}\nactivations: {layer: 2, context_length: 16, contexts_per_shard: 4, "
                    "eval_tokens: 64}\nsae: {dict_size: 32}\ntrainer: {steps: 1, batch_size: 32, log_every: 4}\n")
    out = run("sweep_amortisation.py", "--spec", str(spec), "--k", "2", "--train-tokens", "256",
              "--set", "trainer.lr=1e-3", cache=tmp_path / "cache")
    header = next(line for line in out.splitlines() if line.startswith("| K |"))
    assert "wall one process" in header and "service cost per trial (shared - one) / K" in header
    row = [c.strip() for c in next(line for line in out.splitlines() if line.startswith("| 2 |")).split("|")[1:-1]]
    assert len(row) == len(header.split("|")) - 2
    shared, own, one = float(row[1]), float(row[2]), float(row[9])
    assert one == pytest.approx(own / 2, abs=1e-3) and one == pytest.approx(shared, abs=1e-3)  # the LM ran once
    assert "Target (issue 30)" in out and "K=8 not run" in out


@pytest.mark.usefixtures("one_torch_thread")
def test_absorption_seeds_on_four_tiny_runs(tmp_path, capsys):
    """bench/absorption_seeds.py: one LM part per probe seed, shared by the four SAEs; each SAE's absorption at each
    probe seed is what absorption_scores gives it on the LM part made at that eval.absorption_seed; the paired table
    holds the differences from the twin of the same trainer.seed, (b) their pooled probe-seed sd; a probe seed whose
    LM probe finds too few letters shows "-" and stays out of the verdict."""
    import math
    import statistics

    from csc.activations.source import Activations
    from csc.config import TrainRunSpec
    from csc.pipeline.absorption import absorption_scores, absorption_set
    from csc.pipeline.run import train_run
    from csc.sae.export import load_sae
    from csc.spec_loader import load_spec

    absorption_seeds = _bench_module("absorption_seeds")
    # Layer 2 of the tiny LM (52 words): its letter probe finds letters at absorption seeds 5 and 21, none at 0
    tiny = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
            "activations.contexts_per_shard=8", "activations.lm_batch_size=4", "activations.train_tokens=512",
            "activations.eval_tokens=256", f"activations.cache_dir={tmp_path / 'cache'}", "sae.dict_size=32",
            "trainer.steps=40", "trainer.batch_size=32", "trainer.lr_warmup_steps=2", "trainer.beta_warmup_steps=2",
            "trainer.gamma_warmup_steps=2", "trainer.log_every=20", "eval.ce_contexts=4", "eval.absorption=false",
            "eval.absorption_min_letters=1", "eval.probe_examples_per_class=16"]
    runs = {}
    for gamma in (0.0, 0.5):
        for seed in (0, 1):
            spec = load_spec(TrainRunSpec, None, [*tiny, f"trainer.seed={seed}", f"trainer.gamma={gamma}"])
            runs[gamma, seed] = tmp_path / f"gamma{gamma}-seed{seed}"
            train_run(spec, runs[gamma, seed])
    twins, paired = [str(runs[0.0, s]) for s in (0, 1)], [str(runs[0.5, s]) for s in (0, 1)]
    absorption_seeds.main([*twins, "--paired", *paired, "--seeds", "0", "5", "21"])
    out, err = capsys.readouterr()
    assert out.startswith(f"$ python bench/absorption_seeds.py {' '.join(twins)} --paired {' '.join(paired)} "
                          f"--seeds 0 5 21\n")
    parts = [line for line in out.splitlines() if line.startswith("probe seed ")]
    assert [p.split(":")[0] for p in parts] == ["probe seed 0", "probe seed 5", "probe seed 21"]  # one each
    assert parts[0].endswith("no figures") and err.count("LM part (") == 6  # started and done, once per seed

    # The figures themselves, computed here as a run computes them, at each probe seed
    direct = {}
    for probe_seed in (5, 21):  # the four specs differ only in trainer fields: one LM part (from the last) for all
        at_seed = spec.model_copy(update={"eval": spec.eval.model_copy(update={"absorption_seed": probe_seed})})
        lm_part = absorption_set(at_seed, Activations(at_seed))
        for key, folder in runs.items():
            sae, meta = load_sae(folder / "sae")
            direct[key, probe_seed] = absorption_scores(sae, lm_part, meta["csc_norm_scale"], probe_seed)
            assert "absorption_fraction" in direct[key, probe_seed], "the tiny LM's probe no longer finds a letter"

    def table(title: str) -> dict[str, list[str]]:
        block = out.split(f"### {title}\n\n")[1].split("\n\n")[0]
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in block.splitlines()[2:]]
        return {r[0]: r[1:] for r in rows}

    def mean_sd(values: list[float]) -> str:
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    for figure in ("absorption_fraction", "absorption_full"):
        per_sae = table(f"{figure} per SAE")
        assert set(per_sae) == {str(folder) for folder in runs.values()}
        for (gamma, seed), folder in runs.items():
            values = [direct[(gamma, seed), s][figure] for s in (5, 21)]
            arm = "twin" if gamma == 0 else "paired"
            assert per_sae[str(folder)] == [str(seed), arm, "-", *(f"{v:.4f}" for v in values), mean_sd(values)]
        pairs = table(f"{figure}, paired: SAE minus the twin of its trainer.seed")
        diffs = {seed: [direct[(0.5, seed), s][figure] - direct[(0.0, seed), s][figure] for s in (5, 21)]
                 for seed in (0, 1)}
        assert pairs == {str(runs[0.5, seed]): [str(runs[0.0, seed]), str(seed), "-",
                                                *(f"{d:.4f}" for d in diffs[seed]), mean_sd(diffs[seed])]
                         for seed in (0, 1)}
        verdict = out.split(f"Verdict for {figure}, over the 2 probe seeds at which every SAE has it "
                            f"(left out: probe seed 0):\n")[1]
        pooled = math.sqrt(statistics.fmean(statistics.variance(d) for d in diffs.values()))
        assert f"(b)  probe-seed sd of a paired difference (pooled over 2 pairs): {pooled:.4f};" in verdict
        assert "  verdict: " in verdict.split("\n\n")[0]
