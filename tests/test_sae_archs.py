"""Each architecture against its definition (csc/sae/archs/), on tiny tensors and short real training runs."""

import json
import math

import pytest
import torch
from pydantic import ValidationError

from csc.errors import CscError
from csc.sae.archs import ARCHITECTURES, build_sae, sae_class
from csc.sae.archs.batchtopk import BatchTopKConfig
from csc.sae.archs.jumprelu import JumpReluConfig
from csc.sae.archs.matryoshka import MatryoshkaConfig
from csc.sae.checkpoint import load_checkpoint, save_checkpoint
from csc.sae.config import TrainerConfig, parse_sae_config
from csc.sae.losses import PrefixReconstruction, StepInputs
from csc.sae.metrics import l0, mse
from csc.sae.model import ForwardOutput, SparseAutoencoder
from csc.sae.synthetic import sparse_dictionary_batches
from csc.sae.trainer import Trainer
from tests.conftest import fit, sae_config, without_clock

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, N_FEAT, DICT, B = 16, 24, 48, 64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def data(n_batches, seed=1):
    return list(sparse_dictionary_batches(D, N_FEAT, B, n_batches, seed=seed))


def tcfg(steps, **kw):
    base = dict(steps=steps, lr=3e-3, lr_warmup_start=1e-3, gamma=0.0, log_every=steps, device="cpu")
    return TrainerConfig(**{**base, **kw})


def with_random_b_enc(sae: SparseAutoencoder, seed: int = 2) -> SparseAutoencoder:
    with torch.no_grad():
        sae.b_enc.copy_(rand(sae.cfg.dict_size, seed=seed) * 0.5)
    return sae


def record_after_step(monkeypatch, model, before, after=lambda out: None):
    """Call before(out) and after(out) around each model.after_step(out) the trainer makes."""
    original = model.after_step

    def wrapped(out):
        before(out)
        original(out)
        after(out)

    monkeypatch.setattr(model, "after_step", wrapped)


# ---------------------------------------------------------------------------------------------- batchtopk


def test_batchtopk_training_keeps_the_k_times_b_largest_codes_of_the_batch():
    k, n = 3, 10
    sae = with_random_b_enc(build_sae(BatchTopKConfig(d_in=D, dict_size=DICT, k=k, layer_norm=False)))
    sae.train()
    out = sae(rand(n, D, seed=3))
    acts, z = out.pre.relu().flatten(), out.z.flatten()
    assert (acts > 0).sum() > k * n  # the budget binds
    # Reference: sort every (ReLU'd pre-activation, position) of the batch, keep the k * B largest.
    ranked = sorted(range(acts.numel()), key=lambda i: acts[i].item(), reverse=True)
    kept = torch.zeros_like(acts, dtype=torch.bool)
    kept[ranked[:k * n]] = True
    assert torch.equal(z != 0, kept)
    assert torch.equal(z[kept], acts[kept])
    assert acts[kept].min() > acts[~kept].max()
    per_token = (out.z != 0).sum(dim=-1)
    assert per_token.sum() == k * n
    assert len(set(per_token.tolist())) > 1  # tokens share the budget: their L0 differs


def test_batchtopk_threshold_is_the_moving_average_of_the_smallest_kept_code():
    rate = 0.25
    sae = with_random_b_enc(build_sae(BatchTopKConfig(d_in=D, dict_size=DICT, k=2, threshold_rate=rate)))
    sae.train()
    assert sae.threshold.item() == 0.0 and not sae.threshold_seen
    expected = None
    for seed in range(4):
        out = sae(rand(8, D, seed=10 + seed) * (1 + seed))
        smallest = out.z[out.z > 0].min().item()
        expected = smallest if expected is None else (1 - rate) * expected + rate * smallest
        sae.after_step(out)
        assert sae.threshold_seen
        assert sae.threshold.item() == pytest.approx(expected, rel=1e-6)


def test_batchtopk_threshold_in_real_training(monkeypatch):
    """The trainer feeds after_step the training codes of each step's batch: theta follows their EMA."""
    k, rate = 4, 0.1
    trainer = Trainer(BatchTopKConfig(d_in=D, dict_size=DICT, k=k, threshold_rate=rate), tcfg(20, gamma=0.1))
    smallest, thresholds = [], []

    def smallest_kept(out):
        assert (out.z != 0).sum() == k * B  # the training codes of the step's batch
        smallest.append(out.z[out.z > 0].min().item())

    record_after_step(monkeypatch, trainer.model, before=smallest_kept,
                      after=lambda out: thresholds.append(trainer.model.threshold.item()))
    steps = fit(trainer, data(20)).steps
    assert len(thresholds) == 20
    assert all(m["l0"] == k for m in steps)  # training L0 is exactly k on average
    expected = smallest[0]
    assert thresholds[0] == pytest.approx(expected, rel=1e-6)  # the first batch sets it
    for s, got in zip(smallest[1:], thresholds[1:]):
        expected = (1 - rate) * expected + rate * s
        assert got == pytest.approx(expected, rel=1e-5)
    assert len(set(smallest)) > 10  # the average has something to follow


def test_batchtopk_eval_mode_gates_each_code_at_the_threshold():
    sae = with_random_b_enc(build_sae(BatchTopKConfig(d_in=D, dict_size=DICT, k=2)))
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    sae.eval()
    x = rand(12, D, seed=4)
    out = sae(x)
    assert torch.equal(out.z, out.pre * (out.pre > 0.3))
    assert torch.equal(out.x_hat, sae.decode(out.z, x))
    assert (out.z != 0).sum() != 2 * 12  # no batch budget at inference
    assert torch.allclose(sae(x[:1]).z, out.z[:1], atol=1e-6)  # a token's codes do not depend on its batch
    assert sae.activate(torch.tensor([[0.3, 0.30001, -1.0]])).tolist() == [[0.0, pytest.approx(0.30001), -0.0]]


def test_batchtopk_held_out_l0_after_training_is_near_k():
    k = 4
    batches = data(64)
    trainer = Trainer(BatchTopKConfig(d_in=D, dict_size=DICT, k=k, threshold_rate=0.1),
                      tcfg(60, lr=1e-2, gamma=0.1))
    trainer.fit(batches[:60])
    assert trainer.last_report["ev"] > 0.4
    held_out = torch.cat([b.anchors for b in batches[60:]])  # same stream, tokens not trained on
    trainer.model.eval()
    with torch.no_grad():
        held_out_l0 = l0(trainer.model.encode(held_out)).item()
    assert abs(held_out_l0 - k) < 0.15 * k


# ---------------------------------------------------------------------------------------------- jumprelu


def test_jumprelu_forward_gates_each_code_at_its_threshold():
    sae = with_random_b_enc(build_sae(JumpReluConfig(d_in=D, dict_size=DICT)))
    with torch.no_grad():
        sae.threshold.copy_(rand(DICT, seed=5).abs() * 0.5)
    out = sae(rand(12, D, seed=6))
    assert torch.equal(out.z, out.pre * (out.pre > sae.threshold))
    assert 0 < (out.z != 0).sum() < (out.pre > 0).sum()  # the thresholds act
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0, 1, DICT))
    pre = sae.threshold.detach().clone()[None]
    assert not sae.activate(pre).any()  # exactly at the threshold: off


# The tiny example of the STE formulas: bandwidth eps = 0.1, thresholds theta = (0.5, 0.2, 0), three tokens.
EPS = 0.1
THETA = [0.5, 0.2, 0.0]
PRE = [[0.52, 0.10, 0.01],   # |pre - theta| < eps / 2 (inside the kernel): (0,0) (1,0) (1,1) (2,1) (0,2)
       [0.47, 0.24, -0.30],
       [0.60, 0.20, 0.50]]
UPSTREAM = [[1.0, 1.0, 2.0],
            [2.0, 3.0, 3.0],
            [4.0, 5.0, 7.0]]


def tiny_jumprelu():
    sae = build_sae(JumpReluConfig(d_in=4, dict_size=3, bandwidth=EPS))
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor(THETA))
    return sae, torch.tensor(PRE, requires_grad=True)


def test_jumprelu_code_gradients_match_the_ste_formulas():
    sae, pre = tiny_jumprelu()
    z = sae.activate(pre)
    assert z.tolist() == [[pytest.approx(0.52), 0.0, pytest.approx(0.01)],
                          [0.0, pytest.approx(0.24), 0.0],
                          [pytest.approx(0.60), 0.0, pytest.approx(0.50)]]
    (z * torch.tensor(UPSTREAM)).sum().backward()
    # dz/dtheta_j = -(theta_j / eps) K: latent 0 has tokens 0, 1 in its kernel (upstream 1 + 2),
    # latent 1 tokens 1, 2 (3 + 5), latent 2 has theta 0.
    assert sae.threshold.grad.tolist() == pytest.approx([-(0.5 / EPS) * 3, -(0.2 / EPS) * 8, 0.0], rel=1e-6)
    # dz/dpre = H: the upstream gradient where the code fires, 0 elsewhere.
    assert pre.grad.tolist() == [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 7.0]]


def test_jumprelu_l0_penalty_and_its_gradient_match_the_ste_formulas():
    sae, pre = tiny_jumprelu()
    out = ForwardOutput(x=torch.zeros(3, 4), pre=pre, z=sae.activate(pre), x_hat=torch.zeros(3, 4))
    penalty = sae.sparsity_loss(out)
    assert sae.sparsity_term == "l0_penalty"
    assert penalty.item() == pytest.approx(5 / 3)  # fires: latent 0 twice, latent 1 once, latent 2 twice
    penalty.backward()
    # dH/dtheta_j = -(1 / eps) K, mean over the 3 tokens: 2, 2 and 1 tokens in the kernels.
    assert sae.threshold.grad.tolist() == pytest.approx([-2 / EPS / 3, -2 / EPS / 3, -1 / EPS / 3], rel=1e-6)
    assert pre.grad is None  # the penalty trains the thresholds only


def test_jumprelu_encoder_gets_gradient_only_through_firing_codes():
    sae = build_sae(JumpReluConfig(d_in=D, dict_size=DICT, threshold_init=0.1))
    with torch.no_grad():
        sae.threshold[:8] = 100.0  # these latents never fire
    x = rand(20, D, seed=7)
    out = sae(x)
    out.pre.retain_grad()
    out.z.retain_grad()
    mse(x, out.x_hat).backward()
    fires = out.pre > sae.threshold
    assert fires[:, 8:].any() and (~fires[:, 8:]).any()
    assert torch.equal(out.pre.grad, out.z.grad * fires)
    assert not sae.W_enc.grad[:, :8].any() and not sae.b_enc.grad[:8].any()
    assert sae.W_enc.grad[:, 8:].abs().sum(dim=0).gt(0).sum() > 30


def test_jumprelu_threshold_stays_non_negative(monkeypatch):
    # beta = 0: only the reconstruction acts on theta, and it pushes it down (more codes fire).
    trainer = Trainer(JumpReluConfig(d_in=D, dict_size=DICT, threshold_init=0.01), tcfg(30, beta=0.0, data_init=False))
    before, after = [], []
    theta = trainer.model.threshold
    record_after_step(monkeypatch, trainer.model, before=lambda out: before.append(theta.min().item()),
                      after=lambda out: after.append(theta.min().item()))
    trainer.fit(data(30))
    assert len(after) == 30
    assert min(before) < 0  # the optimiser step took some threshold below 0 ...
    assert min(after) == 0.0  # ... and after_step brought it back: theta >= 0 after every step


def test_raising_beta_lowers_jumprelu_l0():
    batches = data(60)
    l0s = {}
    for beta in (0.0, 1.0):
        trainer = Trainer(JumpReluConfig(d_in=D, dict_size=DICT), tcfg(60, beta=beta, log_every=10))
        l0s[beta] = trainer.fit(batches)["l0"]
    assert l0s[1.0] < l0s[0.0] - 2


# ---------------------------------------------------------------------------------------------- matryoshka


def test_matryoshka_widths_nest_and_default_to_doubling_prefixes():
    assert MatryoshkaConfig(d_in=D, dict_size=2048).widths() == [128, 256, 512, 1024, 2048]
    assert MatryoshkaConfig(d_in=D, dict_size=DICT, k=4).widths() == [3, 6, 12, 24, 48]
    assert MatryoshkaConfig(d_in=D, dict_size=DICT, k=4, matryoshka_widths=[8, DICT]).widths() == [8, DICT]
    assert build_sae(MatryoshkaConfig(d_in=D, dict_size=DICT, k=4, matryoshka_widths=[8, DICT])).prefix_widths() == [8]
    for widths, message in (([8, 24], "must end at sae.dict_size"), ([24, 8, DICT], "strictly increasing"),
                            ([0, DICT], "positive"), ([8, 8, DICT], "strictly increasing"), ([], "must end")):
        with pytest.raises(ValidationError, match=message):
            MatryoshkaConfig(d_in=D, dict_size=DICT, k=4, matryoshka_widths=widths)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_matryoshka_prefix_loss_is_the_summed_mse_of_each_inner_prefix(layer_norm):
    sae = with_random_b_enc(build_sae(MatryoshkaConfig(d_in=D, dict_size=DICT, k=6, layer_norm=layer_norm,
                                                       matryoshka_widths=[5, 17, 30, DICT])))
    with torch.no_grad():
        sae.b_dec.copy_(rand(D, seed=4))
    sae.train()
    x = rand(12, D, seed=5) * 3 + 1
    out = sae(x)
    expected = 0.0
    for w in (5, 17, 30):
        z = out.z.clone()
        z[:, w:] = 0  # the prefix's reconstruction is the full one with the later latents silenced
        x_hat = sae.decode(z, x if layer_norm else None)
        expected += ((x - x_hat) ** 2).mean().item()
    term = PrefixReconstruction(TrainerConfig(steps=1), sae.prefix_widths())
    value = term(StepInputs(batch=None, out=out, model=sae, dead=None, encode=None))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(sae.decode_prefixes(out.z, x, [DICT])[0], out.x_hat, atol=1e-5)  # all of it: the SAE


def test_matryoshka_trains_its_first_prefix_to_reconstruct_on_its_own():
    """The architecture's point: at the same seed, data and k, the first group of latents alone reconstructs far
    better than the same latents of a BatchTopK SAE, at a small cost to the full reconstruction."""
    widths, batches = [12, DICT], data(400)
    prefix_mse, full_mse = {}, {}
    for arch in ("batchtopk", "matryoshka_batchtopk"):
        fields = {"matryoshka_widths": widths} if arch != "batchtopk" else {}
        trainer = Trainer(sae_config(arch, D, DICT, k=4, **fields), tcfg(400))
        fit(trainer, batches)
        model = trainer.model.eval()
        x = torch.cat([b.anchors for b in data(4, seed=9)])
        with torch.no_grad():
            out = model(x)
            prefix_mse[arch] = mse(x, model.decode_prefixes(out.z, x, widths[:1])[0]).item()
            full_mse[arch] = mse(x, out.x_hat).item()
    assert prefix_mse["matryoshka_batchtopk"] < 0.8 * prefix_mse["batchtopk"], prefix_mse  # measured: 0.47 vs 0.71
    assert full_mse["matryoshka_batchtopk"] < 1.2 * full_mse["batchtopk"], full_mse  # measured: 0.36 vs 0.38


# ---------------------------------------------------------------------------------------------- registry


def test_the_registry_names_each_architecture_by_its_config():
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"}
    for name, cls in ARCHITECTURES.items():
        assert sae_class(name) is cls and issubclass(cls, SparseAutoencoder)
        assert cls.config_class.model_fields["architecture"].default == name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_with_info_nce(arch):
    sae_cfg = sae_config(arch, D, DICT)
    sae = build_sae(sae_cfg, seed=3)
    assert type(sae) is ARCHITECTURES[arch] and sae.cfg is sae_cfg
    batches = data(8)
    runs = {}
    for gamma in (0.0, 0.5):
        trainer = Trainer(sae_cfg, tcfg(8, gamma=gamma, gamma_warmup_steps=0, log_every=1))
        assert type(trainer.model) is ARCHITECTURES[arch]
        runs[gamma] = (trainer, fit(trainer, batches).steps)
    steps = runs[0.5][1]
    assert all(math.isfinite(m["nce"]) and m["nce"] > 0 for m in steps)
    assert all("nce" not in m for m in runs[0.0][1])
    assert all(math.isfinite(m["loss"]) for m in steps)
    # Same seed and data: the InfoNCE gradient reaches the weights.
    for name in ("W_enc", "b_enc", "W_dec"):
        assert not torch.equal(getattr(runs[0.0][0].model, name), getattr(runs[0.5][0].model, name)), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sae_config_round_trips(arch):
    non_default = {"relu": {}, "topk": {"k": 5}, "batchtopk": {"k": 5, "threshold_rate": 0.2},
                   "jumprelu": {"bandwidth": 0.1, "threshold_init": 0.05},
                   "matryoshka_batchtopk": {"k": 5, "matryoshka_widths": [8, 20, DICT]}}[arch]
    for cfg in (sae_config(arch, D, DICT), sae_config(arch, D, DICT, layer_norm=False, **non_default)):
        back = parse_sae_config(cfg.model_dump())
        assert type(back) is type(cfg) and back == cfg
        assert parse_sae_config(json.loads(cfg.model_dump_json())) == cfg
        assert back.architecture == arch


def test_unknown_architectures_are_refused_listing_the_known_ones():
    known = "relu, topk, batchtopk, jumprelu, matryoshka_batchtopk"
    with pytest.raises(CscError, match=f"unknown SAE architecture 'gated'; known: {known}$"):
        sae_class("gated")
    with pytest.raises(ValidationError, match=f"unknown architecture 'gated'; known: {known}"):
        parse_sae_config({"architecture": "gated", "d_in": D, "dict_size": DICT})


@pytest.mark.parametrize("arch", [a for a, cls in ARCHITECTURES.items() if "k" in cls.config_class.model_fields])
def test_k_larger_than_dict_size_is_refused(arch):
    with pytest.raises(ValidationError, match=rf"k must be in \[1, dict_size={DICT}\], got {DICT + 1}"):
        sae_config(arch, D, DICT, k=DICT + 1)
    assert sae_config(arch, D, DICT, k=DICT).k == DICT


# ---------------------------------------------------------------------------------------------- resume


RESUME_EXTRA = {
    "relu": dict(beta=0.1),
    "topk": dict(revival="auxk", auxk_k=8, dead_window_tokens=2 * B),
    "batchtopk": dict(revival="auxk", auxk_k=8, dead_window_tokens=2 * B, threshold_rate=0.2),
    "jumprelu": dict(beta=0.5),
    "matryoshka_batchtopk": dict(revival="auxk", auxk_k=8, dead_window_tokens=2 * B, threshold_rate=0.2),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resume_is_bit_for_bit(tmp_path, arch):
    extra = dict(RESUME_EXTRA[arch])
    sae_fields = {"threshold_rate": extra.pop("threshold_rate")} if "threshold_rate" in extra else {}
    sae_cfg = sae_config(arch, D, DICT, k=3, **sae_fields)
    n = 20
    cfg = tcfg(n, gamma=0.1, balance=True, balance_ema=0.5, hard_negatives=4, lr_warmup_steps=15,
               beta_warmup_steps=12, gamma_warmup_steps=12, log_every=3, **extra)
    batches = data(n, seed=2)

    straight = Trainer(sae_cfg, cfg)
    reports_straight = fit(straight, batches).reports

    first = Trainer(sae_cfg, cfg)
    reports_resumed = fit(first, batches[: n // 2]).reports
    save_checkpoint(first, tmp_path / "ckpt")
    del first
    resumed = load_checkpoint(tmp_path / "ckpt")
    assert resumed.batches_consumed == n // 2
    reports_resumed += fit(resumed, batches[resumed.batches_consumed:]).reports

    expected = straight.model.state_dict()
    assert resumed.model.state_dict().keys() == expected.keys()
    for name, t in resumed.model.state_dict().items():
        assert torch.equal(t, expected[name]), name
    assert [r["step"] for r in reports_straight] == [3, 6, 9, 12, 15, 18, 20]
    assert without_clock(reports_resumed) == without_clock(reports_straight)
    assert torch.equal(resumed.dead.tokens_since_fired, straight.dead.tokens_since_fired)
    assert [t.state_dict() for t in resumed.terms] == [t.state_dict() for t in straight.terms]
    if "revival" in extra:
        assert any(r["auxk"] > 0 for r in reports_straight)  # the dead-latent state mattered
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert straight.model.threshold_seen and straight.model.threshold > 0  # the buffers mattered
    if arch == "jumprelu":
        assert not torch.equal(straight.model.threshold, torch.full((DICT,), 0.01))
