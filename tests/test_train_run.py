"""`csc train` / `csc eval`: a whole run on the tiny model, interruption and resume, the CLI."""

import itertools
import json
import math
import re
import shutil

import pytest
import torch

from csc.activations.source import Activations
from csc.cli import main
from csc.config import TrainRunSpec
from csc.spec_loader import load_spec
from csc.errors import CscError
from csc.pipeline.run import train_run, training_stream
from csc.sae.export import load_sae

TINY = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
        "activations.contexts_per_shard=8", "activations.train_tokens=1024", "activations.eval_tokens=512",
        "sae.dict_size=128", "trainer.steps=40", "trainer.batch_size=64", "trainer.lr_warmup_steps=5",
        "trainer.beta_warmup_steps=5", "trainer.gamma_warmup_steps=5", "trainer.log_every=5",
        "eval.ce_contexts=4", "checkpoint_every=10",
        "eval.probe_examples_per_class=16"]  # sparse probing: few held-out shards beyond the evaluation's


def spec(cache, *extra) -> TrainRunSpec:
    return load_spec(TrainRunSpec, None, [*TINY, f"activations.cache_dir={cache}", *extra])


def test_training_stream_resumes_at_any_batch_across_passes(cache):
    acts = Activations(spec(cache))
    full = list(itertools.islice(training_stream(acts, 64, seed=1), 30))  # 14 batches a pass: crosses 2 passes
    resumed = list(itertools.islice(training_stream(acts, 64, seed=1, start=17), 13))
    for a, b in zip(full[17:], resumed):
        assert torch.equal(a.anchors, b.anchors) and torch.equal(a.seq_id, b.seq_id)
    assert not torch.equal(full[0].anchors, full[14].anchors), "each pass is shuffled anew"


def test_run_exports_and_eval_reproduces_metrics(cache, tmp_path, capsys):
    out = tmp_path / "run"
    results = train_run(spec(cache), out, progress=False)
    assert results["train_steps"] == 40 and results["tokens"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5.0 * i for i in range(1, 9)]
    for png in ("curves.png", "density.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sae, meta = load_sae(out / "sae")
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["csc_norm_scale"] == Activations(spec(cache)).scale
    made = (out / "dashboard.html").read_text()
    (out / "dashboard.html").unlink()
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    # `csc eval` rewrites the dashboard (test_dashboard.py checks its content): the same SAE shows the same latents
    latents = re.compile(r'data-latent="(\d+)"')
    assert latents.findall((out / "dashboard.html").read_text()) == latents.findall(made) != []
    assert f"{results['explained_variance']:.6g}" in printed and f"{results['ce_spliced']:.6g}" in printed
    assert results["delta_ce"] == results["ce_spliced"] - results["ce_clean"]
    # Held-out batches are training's (64 anchors): at most 63 negatives each.
    assert 0 < results["nce"] and math.log(2) < results["nce_chance"] <= math.log(64)
    assert f"{results['nce']:.6g}" in printed and f"{results['delta_ce']:.6g}" in printed
    # Context locality (trial side) and SAEBench's figures (LM side) reach eval.json and the table, reproducibly
    for key in ("context_locality", "context_locality_weighted", "ce_loss_score", "kl_div_score",
                "explained_variance_legacy", "saebench_l0", "saebench_l1"):
        assert f"{results[key]:.6g}" in printed, key
    # Feature absorption: the tiny LM's letter probe finds too few letters, so only their number is reported, and why
    assert "absorption_letters" in results and "absorption_fraction" not in results
    assert "csc: feature absorption left out" in printed


def _table(printed: str) -> dict[str, float]:
    """csc's metric table, label: value."""
    rows = re.findall(r"^(\S.*?)\s+(-?[\d.]+(?:e[-+]\d+)?|nan)$", printed, re.M)
    return {label: float(value) for label, value in rows}


def test_eval_of_a_folder_saelens_wrote_matches_the_run(cache, tmp_path, capsys):
    """SAELens loads csc's export and writes it again in its own layout (SAELens 6's cfg.json, raw-activation
    weights): `csc eval` on that folder, with the model and layer from its cfg.json, measures what the run did."""
    from sae_lens import SAE  # the interop extra, installed by scripts/setup.sh

    out = tmp_path / "run"
    train_run(spec(cache, "sae.layer_norm=false"), out, progress=False)  # the scale folded into the weights
    assert main(["eval", str(out)]) == 0
    ours = _table(capsys.readouterr().out)
    SAE.load_from_disk(str(out / "sae")).save_model(str(tmp_path / "theirs"))
    assert "csc_sae_config" not in (tmp_path / "theirs" / "cfg.json").read_text()
    data = [s for s in TINY if not s.startswith(("model.name", "activations.layer"))]
    assert main(["eval", str(tmp_path / "theirs"), *(f"--set={s}" for s in data),
                 f"--set=activations.cache_dir={cache}"]) == 0
    printed = capsys.readouterr().out
    theirs = _table(printed)
    assert (tmp_path / "theirs" / "dashboard.html").is_file() and str(tmp_path / "theirs" / "dashboard.html") in printed
    for label in ("explained variance (centred)", "L0", "delta CE (nats)", "KL(clean || SAE)", "CE loss recovered",
                  "InfoNCE (held out)", "context locality, median latent"):
        assert theirs[label] == pytest.approx(ours[label], rel=1e-4, abs=1e-6), label
    # csc's own export alone, away from its run folder (no spec.json): read as SAELens reads it, the same figures
    shutil.copytree(out / "sae", tmp_path / "alone")
    assert main(["eval", str(tmp_path / "alone"), *(f"--set={s}" for s in data),
                 f"--set=activations.cache_dir={cache}"]) == 0
    alone = _table(capsys.readouterr().out)
    assert alone["explained variance (centred)"] == pytest.approx(ours["explained variance (centred)"], rel=1e-4)
    # A folder that is no SAE, and cfg.json naming a model by its TransformerLens name: distinct errors
    assert main(["eval", str(cache)]) == 2
    assert "not an SAE folder csc knows" in capsys.readouterr().err
    cfg_path = tmp_path / "theirs" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["model_name"] = "gemma-2-2b"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["eval", str(tmp_path / "theirs")]) == 2
    err = capsys.readouterr().err
    assert f"{cfg_path}: model_name 'gemma-2-2b'" in err and "--set model.name=" in err
    assert main(["eval", str(out), "--spec", "x.yaml"]) == 2
    assert "each measured with the spec it was trained on; change that spec with --set" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_interrupted_run_resumes_bit_for_bit(cache, tmp_path, arch):
    """Every architecture trains, checkpoints, resumes bit for bit, exports and evaluates through `csc train`."""
    extra = [f"sae.architecture={arch}"] + (["sae.k=8"] if "topk" in arch else [])
    whole = tmp_path / "whole"
    results = train_run(spec(cache, *extra), whole, progress=False)
    assert 0 < results["explained_variance"] <= 1 and results["ce_spliced"] < results["ce_ablated"]
    assert json.loads((whole / "sae" / "cfg.json").read_text())["csc_sae_config"]["architecture"] == arch

    class Interrupt(Exception):
        pass

    def stop_at_25(m):
        if m["step"] == 25:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train_run(spec(cache, *extra), cut, callback=stop_at_25, progress=False)
    assert not (cut / "sae").exists()
    with pytest.raises(CscError, match="not empty: pass --resume"):
        train_run(spec(cache, *extra), cut, progress=False)
    with pytest.raises(CscError, match="different sae/trainer spec"):
        train_run(spec(cache, *extra, "trainer.gamma=0.5"), cut, resume=True, progress=False)
    train_run(spec(cache, *extra), cut, resume=True, progress=False)
    reports = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, cut)]
    assert [r["step"] for r in reports[0]] == [r["step"] for r in reports[1]], \
        "reports of the interrupted steps 21-25 must not appear twice"
    for r in (*reports[0], *reports[1]):
        del r["tokens_per_s"]  # wall-clock
    assert reports[0] == reports[1]
    a, _ = load_sae(whole / "sae")
    b, _ = load_sae(cut / "sae")
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_cli_train_prints_the_table_and_eval_measures_its_run_folder_again(cache, tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "r")] + [f"--set={s}" for s in [
        *TINY, f"activations.cache_dir={cache}", "trainer.gamma=0"]]  # the plain SAE gets held-out InfoNCE too
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "explained variance (centred)" in out and "CE loss recovered" in out and "SAE exported to" in out
    assert "delta CE (nats)" in out and "InfoNCE (held out)" in out and "InfoNCE at chance" in out
    assert main(["eval", str(tmp_path / "r")]) == 0  # the run folder, measured again
    assert "explained variance (centred)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such file or folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert f"{tmp_path}: not an SAE folder csc knows: expected a run folder of `csc train`" in capsys.readouterr().err
    assert main(["train", "--set=trainer.steps=0", f"--set=activations.cache_dir={cache}"]) == 2
    assert "trainer.steps: Input should be greater than 0" in capsys.readouterr().err
