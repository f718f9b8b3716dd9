import pytest
import torch
import torch.nn.functional as F

from csc.errors import CacheError, CscError
from csc.sae.config import SaeConfig, TrainerConfig
from csc.sae.model import SparseAutoencoder
from csc.sae.trainer import Trainer


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_init_unit_decoder_tied_encoder_zero_biases():
    sae = SparseAutoencoder(SaeConfig(d_in=16, dict_size=40), seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(40), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    again = SparseAutoencoder(SaeConfig(d_in=16, dict_size=40), seed=3)
    assert torch.equal(again.W_dec, sae.W_dec)


def test_building_a_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    SparseAutoencoder(SaeConfig(d_in=16, dict_size=40), seed=1)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_relu_forward_formula(layer_norm):
    sae = SparseAutoencoder(SaeConfig(d_in=16, dict_size=32, layer_norm=layer_norm), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(rand(16, seed=1))
        sae.b_enc.copy_(rand(32, seed=2) * 0.1)
    x = rand(10, 16, seed=3) * 2 + 1
    u = x - sae.b_dec
    if layer_norm:
        u = (u - u.mean(-1, keepdim=True)) / torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + 1e-5)
    z_ref = F.relu(u @ sae.W_enc + sae.b_enc)
    x_hat, z = sae(x)
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(x_hat, z_ref @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), x_hat)


def test_topk_keeps_the_k_largest_positive_preactivations():
    sae = SparseAutoencoder(SaeConfig(d_in=16, dict_size=32, architecture="topk", k=5), seed=0)
    x = rand(20, 16, seed=4)
    pre = sae.pre_activations(x)
    z = sae.encode(x)
    for i in range(20):
        top = set(pre[i].topk(5).indices.tolist())
        for j in range(32):
            expected = max(pre[i, j].item(), 0.0) if j in top else 0.0
            assert z[i, j].item() == pytest.approx(expected, abs=1e-6)
    assert ((z != 0).sum(-1) <= 5).all()


def test_init_b_dec_is_the_sample_mean():
    sae = SparseAutoencoder(SaeConfig(d_in=16, dict_size=32))
    sample = rand(50, 16, seed=5) + 3
    sae.init_b_dec(sample)
    assert torch.allclose(sae.b_dec, sample.mean(0))


def test_all_zero_weights_are_refused(tmp_path):
    cfg = SaeConfig(d_in=16, dict_size=32)
    for name in ("W_enc", "W_dec"):
        sae = SparseAutoencoder(cfg)
        with torch.no_grad():
            getattr(sae, name).zero_()
        with pytest.raises(CscError, match=f"{name} is all zero"):
            sae.check_not_degenerate()
        with pytest.raises(CscError, match="all zero"):
            Trainer(cfg, TrainerConfig(steps=1, device="cpu"), model=sae)
        sae.save(tmp_path / name)
        with pytest.raises(CscError, match="all zero"):
            SparseAutoencoder.load(tmp_path / name)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    with pytest.raises(CscError, match="NaN"):
        sae.check_not_degenerate()


def test_save_load_round_trip(tmp_path):
    cfg = SaeConfig(d_in=16, dict_size=32, architecture="topk", k=4, layer_norm=False)
    sae = SparseAutoencoder(cfg, seed=9)
    with torch.no_grad():
        sae.b_enc.copy_(rand(32, seed=6))
        sae.b_dec.copy_(rand(16, seed=7))
    sae.save(tmp_path / "s")
    back = SparseAutoencoder.load(tmp_path / "s")
    assert back.cfg == cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    x = rand(5, 16, seed=8)
    assert torch.equal(back(x)[0], sae(x)[0])


def test_load_rejects_missing_and_mismatched_files(tmp_path):
    with pytest.raises(CacheError):
        SparseAutoencoder.load(tmp_path / "nothing")
    SparseAutoencoder(SaeConfig(d_in=16, dict_size=32)).save(tmp_path / "s")
    (tmp_path / "s" / "sae_config.json").write_text('{"d_in": 16, "dict_size": 64}')
    with pytest.raises(CacheError, match="shape"):
        SparseAutoencoder.load(tmp_path / "s")
