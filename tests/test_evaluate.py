"""Splicing an SAE into the LM: CE/KL against transformers' own loss, and the reconstruction scores."""

import pytest
import torch

from csc.activations.models import build_tiny_gemma2
from csc.config import ModelSpec
from csc.pipeline.evaluate import _final_hidden, reconstruction_scores, splice_scores
from csc.sae.archs import build_sae
from csc.sae.archs.relu import ReluConfig


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny_gemma2(ModelSpec(name="tiny-gemma2"))
    return model.eval()


def _ids(n=5, T=24):
    ids = torch.randint(4, 260, (n, T), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    return ids


def test_chunked_clean_ce_equals_transformers_loss_with_softcapping(tiny):
    assert tiny.config.final_logit_softcapping  # Gemma2 caps logits: the test covers that path
    ids = _ids()
    sae = build_sae(ReluConfig(d_in=64, dict_size=128))
    with torch.no_grad():
        ref = tiny(input_ids=ids, labels=ids).loss.item()
    out = splice_scores(tiny, sae, ids, layer=1, scale=1.0, lm_batch_size=2, chunk_tokens=7)
    assert out["ce_clean"] == pytest.approx(ref, rel=1e-5)
    assert out["ce_tokens"] == ids.shape[0] * (ids.shape[1] - 1)
    assert out["ce_ablated"] != pytest.approx(out["ce_clean"])
    assert out["kl_spliced"] >= 0 and out["kl_ablated"] > 0
    assert out["ce_loss_recovered"] == pytest.approx(
        (out["ce_ablated"] - out["ce_spliced"]) / (out["ce_ablated"] - out["ce_clean"]))


def test_identity_splice_reproduces_clean_and_bos_is_untouched(tiny):
    ids = _ids(2)
    clean = _final_hidden(tiny, ids, 2, None)
    assert torch.equal(_final_hidden(tiny, ids, 2, lambda x: x), clean)
    seen = []
    _final_hidden(tiny, ids, 2, lambda x: seen.append(x.shape) or torch.zeros_like(x))
    assert seen == [(2, ids.shape[1] - 1, 64)]


def test_kl_and_ce_of_a_perfect_reconstruction(tiny):
    """An SAE whose decoder inverts its encoder exactly (dict = d, identity-like) leaves the LM unchanged."""
    sae = build_sae(ReluConfig(d_in=64, dict_size=128, layer_norm=False))
    with torch.no_grad():  # z = [x, -x]+ and W_dec = [I, -I]/1 reconstructs x exactly
        eye = torch.eye(64)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    out = splice_scores(tiny, sae, _ids(3), layer=1, scale=0.5)
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], abs=1e-4)
    assert out["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_reconstruction_scores_over_batches():
    from csc.sae.batch import ActivationBatch

    g = torch.Generator().manual_seed(1)
    batches = [ActivationBatch(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g),
                               torch.arange(32) // 4, torch.full((32,), 5)) for _ in range(3)]
    sae = build_sae(ReluConfig(d_in=16, dict_size=48))
    out, hist = reconstruction_scores(sae, batches)
    x = torch.cat([b.anchors for b in batches])
    x_hat, z = sae(x).x_hat, sae(x).z
    assert out["tokens"] == 96
    assert out["explained_variance"] == pytest.approx(
        (1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-5)
    assert out["l0"] == pytest.approx((z != 0).sum(-1).float().mean().item())
    assert int(hist.counts.sum()) + hist.n_never_fired == 48
    assert -1 <= out["code_sim_negative"] <= 1 and -1 <= out["code_sim_positive"] <= 1
