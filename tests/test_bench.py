"""The benchmark scripts still run against the current code (tiny sizes; their figures are not checked here:
speed claims live in bench/README.md, printed by these scripts, never asserted in tests)."""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, cache: Path | None = None) -> str:
    env = {**os.environ, **({"CSC_CACHE_DIR": str(cache)} if cache else {})}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_sae_step_prints_its_table():
    out = run("sae_step.py", "--d", "32", "--dict", "64", "--batch", "64", "--steps", "2", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert {"plain PyTorch SAE step", "csc trainer, gamma=0", "csc trainer, gamma=0.1 (contrastive)",
            "partner encode, forward + backward"} <= set(names)
    assert "contrastive term overhead:" in out


def test_producer_throughput_on_the_tiny_model(tmp_path):
    out = run("producer_throughput.py", "--model", "tiny-gemma2", "--layer", "2", "--batch", "2", "--context", "16",
              "--iters", "1", cache=tmp_path)
    assert "csc pipeline" in out and "full forward, eager" in out


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
