import statistics

import pytest
import torch
import torch.nn.functional as F

from csc.errors import CacheError, CscError
from csc.sae.archs import build_sae
from csc.sae.archs.batchtopk import BatchTopKConfig
from csc.sae.archs.jumprelu import JumpReluConfig
from csc.sae.archs.relu import ReluConfig
from csc.sae.archs.topk import TopKConfig
from csc.sae import metrics
from csc.sae.config import TrainerConfig
from csc.sae.model import ForwardOutput
from csc.sae.trainer import Trainer


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_init_unit_decoder_tied_encoder_zero_biases():
    sae = build_sae(ReluConfig(d_in=16, dict_size=40), seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(40), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    again = build_sae(ReluConfig(d_in=16, dict_size=40), seed=3)
    assert torch.equal(again.W_dec, sae.W_dec)


def test_building_a_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    build_sae(ReluConfig(d_in=16, dict_size=40), seed=1)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_relu_forward_formula(layer_norm):
    sae = build_sae(ReluConfig(d_in=16, dict_size=32, layer_norm=layer_norm), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(rand(16, seed=1))
        sae.b_enc.copy_(rand(32, seed=2) * 0.1)
    x = rand(10, 16, seed=3) * 2 + 1
    n, mu, sigma = x, 0.0, 1.0
    if layer_norm:  # SAELens's layer_norm: unbiased standard deviation, eps added to it
        mu = x.mean(-1, keepdim=True)
        sigma = torch.tensor([[statistics.stdev(row)] for row in (x - mu).tolist()])
        n = (x - mu) / (sigma + 1e-5)
    pre_ref = (n - sae.b_dec) @ sae.W_enc + sae.b_enc
    z_ref = F.relu(pre_ref)
    out = sae(x)
    assert isinstance(out, ForwardOutput)
    assert out.x is x
    assert torch.allclose(out.pre, pre_ref, atol=1e-5)
    assert torch.allclose(out.z, z_ref, atol=1e-5)
    assert torch.allclose(out.x_hat, (z_ref @ sae.W_dec + sae.b_dec) * sigma + mu, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x), x), out.x_hat)
    if layer_norm:
        # the reconstruction follows the token's norm and mean: scaling and shifting x does the same to x_hat
        assert torch.allclose(sae(3 * x + 2).x_hat, 3 * out.x_hat + 2, atol=1e-4)
        with pytest.raises(CscError, match="needs the input x"):
            sae.decode(out.z)


def test_relu_sparsity_loss_is_the_l1_of_the_codes_in_units_of_sqrt_d():
    sae = build_sae(ReluConfig(d_in=16, dict_size=32), seed=0)
    out = sae(rand(5, 16, seed=9))
    assert sae.sparsity_term == "l1"
    assert sae.sparsity_loss(out).item() == pytest.approx(out.z.abs().sum().item() / 5 / 4, rel=1e-6)


def test_topk_keeps_the_k_largest_positive_preactivations():
    sae = build_sae(TopKConfig(d_in=16, dict_size=32, k=5), seed=0)
    x = rand(20, 16, seed=4)
    pre = sae.pre_activations(x)
    z = sae.encode(x)
    for i in range(20):
        top = set(pre[i].topk(5).indices.tolist())
        for j in range(32):
            expected = max(pre[i, j].item(), 0.0) if j in top else 0.0
            assert z[i, j].item() == pytest.approx(expected, abs=1e-6)
    assert ((z != 0).sum(-1) <= 5).all()


@pytest.mark.parametrize("layer_norm", [True, False])
def test_data_init_centres_starts_at_the_asked_l0_and_fits_the_scale(layer_norm):
    d, m, l0 = 64, 512, 16
    sample = rand(2000, d, seed=5) * (1 + torch.arange(d) / 8) + 3  # anisotropic, off-centre
    for cfg in (ReluConfig(d_in=d, dict_size=m, layer_norm=layer_norm),
                JumpReluConfig(d_in=d, dict_size=m, layer_norm=layer_norm)):
        sae = build_sae(cfg, seed=1)
        dense = sae(sample)
        assert metrics.l0(dense.z) > m / 4  # the tied random start: a large share of the dictionary fires
        sae.init_from_data(sample, l0)
        assert torch.allclose(sae.b_dec, sae.normalise(sample)[0].mean(0), atol=1e-5)
        out = sae(sample)
        assert metrics.l0(out.z).item() == pytest.approx(l0, rel=0.05)
        # the least-squares scale: no scalar multiple of the codes reconstructs the (centred) input better
        u = sae.normalise(sample)[0] - sae.b_dec
        r = out.z @ sae.W_dec
        for c in (0.9, 1.1):
            assert (u - r).pow(2).sum() < (u - c * r).pow(2).sum()
        assert metrics.explained_variance(sample, out.x_hat) > 0
        assert metrics.explained_variance(sample, out.x_hat) > metrics.explained_variance(sample, dense.x_hat)


def test_all_zero_weights_are_refused():
    cfg = ReluConfig(d_in=16, dict_size=32)
    for name in ("W_enc", "W_dec"):
        sae = build_sae(cfg)
        with torch.no_grad():
            getattr(sae, name).zero_()
        with pytest.raises(CscError, match=f"{name} is all zero"):
            sae.check_not_degenerate()
        with pytest.raises(CscError, match="all zero"):
            Trainer(cfg, TrainerConfig(steps=1, device="cpu"), model=sae)
        with pytest.raises(CscError, match="all zero"):
            build_sae(cfg).load_tensors(sae.state_dict(), "zeroed")
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    with pytest.raises(CscError, match="NaN"):
        sae.check_not_degenerate()
    with pytest.raises(CscError, match="NaN"):
        build_sae(cfg).load_tensors(sae.state_dict(), "nan")


TENSOR_CASES = {
    "relu": ReluConfig(d_in=16, dict_size=32),
    "topk": TopKConfig(d_in=16, dict_size=32, k=4, layer_norm=False),
    "batchtopk": BatchTopKConfig(d_in=16, dict_size=32, k=4),
    "jumprelu": JumpReluConfig(d_in=16, dict_size=32, threshold_init=0.2),
}


@pytest.mark.parametrize("arch", TENSOR_CASES)
def test_load_tensors_round_trip(arch):
    """load_tensors copies every state_dict tensor, the architecture's own ones included."""
    cfg = TENSOR_CASES[arch]
    sae = build_sae(cfg, seed=9)
    with torch.no_grad():
        sae.b_enc.copy_(rand(32, seed=6))
        sae.b_dec.copy_(rand(16, seed=7))
        if arch == "jumprelu":
            sae.threshold.copy_(rand(32, seed=10).abs())
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
            sae.threshold_seen.fill_(True)
    back = build_sae(cfg, seed=1)
    assert back.load_tensors(sae.state_dict(), "test") is back
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = rand(5, 16, seed=8)
    sae.eval()
    back.eval()
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    assert torch.equal(back(x).z, sae(x).z)


def test_load_tensors_rejects_missing_extra_and_mismatched_tensors():
    cfg = ReluConfig(d_in=16, dict_size=32)
    tensors = dict(build_sae(cfg).state_dict())
    with pytest.raises(CacheError, match=r"src: .*missing \['b_dec'\]"):
        build_sae(cfg).load_tensors({k: v for k, v in tensors.items() if k != "b_dec"}, "src")
    with pytest.raises(CacheError, match=r"unexpected \['threshold'\]"):
        build_sae(cfg).load_tensors({**tensors, "threshold": torch.zeros(32)}, "src")
    wider = build_sae(ReluConfig(d_in=16, dict_size=64)).state_dict()
    with pytest.raises(CacheError, match="shape"):
        build_sae(cfg).load_tensors(wider, "src")
    # An architecture's own tensors are required too.
    with pytest.raises(CacheError, match=r"missing \['threshold'\]"):
        build_sae(JumpReluConfig(d_in=16, dict_size=32)).load_tensors(tensors, "src")
    with pytest.raises(CacheError, match=r"missing \['threshold', 'threshold_seen'\]"):
        build_sae(BatchTopKConfig(d_in=16, dict_size=32, k=4)).load_tensors(tensors, "src")


def test_the_encoder_gives_b_dec_the_plain_formulas_gradient_without_an_input_gradient():
    sae = build_sae(ReluConfig(d_in=16, dict_size=48))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    n = sae.normalise(x)[0]
    plain = (n - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.equal(out.pre, plain)  # the value is exactly the plain one
    g = torch.randn(20, 48, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out.pre * g).sum(), [sae.b_dec, sae.W_enc, sae.b_enc])
    ref = torch.autograd.grad((plain * g).sum(), [sae.b_dec, sae.W_enc, sae.b_enc])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
