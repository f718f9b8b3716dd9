import itertools

import pytest
import torch

from csc.errors import CscError, DivergenceError, SpecError
from csc.sae import losses
from csc.sae.archs import ARCHITECTURES, build_sae
from csc.sae.archs.relu import ReluConfig
from csc.sae.archs.topk import TopKConfig
from csc.sae.batch import ActivationBatch
from csc.sae.config import TrainerConfig
from csc.sae.dead import DeadLatentTracker
from csc.sae.metrics import mse
from csc.sae.optim import ConstrainedAdam
from csc.sae.synthetic import sparse_dictionary_batches
from csc.sae.trainer import TRAINING_METRICS, Trainer, lr_at
from tests.conftest import Recorder, fit, sae_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


D, N_FEAT, DICT, B = 32, 48, 64, 128


def data(n_batches, seed=1):
    return list(sparse_dictionary_batches(D, N_FEAT, B, n_batches, seed=seed))


def tcfg(**kw):
    base = dict(steps=40, lr=3e-3, lr_warmup_start=1e-3, lr_warmup_steps=10, beta=0.02,
                beta_warmup_steps=5, gamma_warmup_steps=5, log_every=10, device="cpu")
    return TrainerConfig(**{**base, **kw})


def test_lr_warmup_is_linear():
    cfg = TrainerConfig(steps=5000, lr=3e-4, lr_warmup_start=1e-4, lr_warmup_steps=1000)
    assert lr_at(cfg, 0) == 1e-4
    assert lr_at(cfg, 500) == pytest.approx(2e-4)
    assert lr_at(cfg, 1000) == lr_at(cfg, 5000) == 3e-4
    assert lr_at(cfg.model_copy(update={"lr_warmup_steps": 0}), 0) == 3e-4
    default = TrainerConfig(steps=5000, lr=3e-4, lr_warmup_start=1e-4)  # warm-up: a tenth of steps
    assert lr_at(default, 250) == pytest.approx(2e-4)
    assert lr_at(default, 499) < 3e-4 == lr_at(default, 500)


def test_lr_decay_falls_linearly_over_the_last_steps():
    cfg = TrainerConfig(steps=100, lr=3e-4, lr_warmup_steps=10, lr_decay_steps=20, lr_end=1e-5)
    assert lr_at(cfg, 79) == lr_at(cfg, 80) == 3e-4  # the decay's first step still has lr
    assert lr_at(cfg, 90) == pytest.approx(1e-5 + (3e-4 - 1e-5) * 10 / 20)
    assert lr_at(cfg, 99) == pytest.approx(1e-5 + (3e-4 - 1e-5) / 20)  # the last step still moves
    lrs = [lr_at(cfg, s) for s in range(80, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(cfg.model_copy(update={"lr_decay_steps": 0}), 99) == 3e-4


def test_lr_decay_may_not_start_inside_the_warm_up():
    with pytest.raises(ValueError, match="lr_decay_steps"):
        TrainerConfig(steps=100, lr_warmup_steps=30, lr_decay_steps=80)
    TrainerConfig(steps=100, lr_warmup_steps=20, lr_decay_steps=80)  # they may meet


def test_training_on_sparse_synthetic_data_learns():
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT),
                      tcfg(steps=200, beta=0.07, gamma=0.1, log_every=1))
    logs = fit(trainer, data(200)).reports
    final = logs[-1]
    assert final["ev"] > 0.8
    assert final["ev"] > logs[0]["ev"] + 0.2
    assert final["l0"] < DICT / 2
    assert final["step"] == 200 and final["tokens"] == 200 * B
    assert trainer.done
    assert (trainer.model.W_dec.norm(dim=-1) - 1).abs().max() < 1e-5


def test_topk_with_auxk_revival_learns_and_trains_dead_latents():
    sae_cfg = TopKConfig(d_in=D, dict_size=2 * DICT, k=4, layer_norm=False)
    batches = data(200)
    runs = {}
    for revival in ("none", "auxk"):
        trainer = Trainer(sae_cfg, tcfg(steps=200, beta=0.0, gamma=0.05, revival=revival,
                                        auxk_k=32, dead_window_tokens=10 * B, log_every=1))
        runs[revival] = (trainer, fit(trainer, batches).steps)
    logs = runs["auxk"][1]
    assert logs[-1]["ev"] > 0.7
    assert max(m["l0"] for m in logs) <= 4
    # AuxK acts exactly on the steps that follow one ending with dead latents.
    assert all((now["auxk"] > 0) == (before["dead_frac"] > 0) for before, now in zip(logs, logs[1:]))
    assert any(m["auxk"] > 0 for m in logs)
    # The AuxK term reaches the weights: same seed and data, different result.
    assert not torch.equal(runs["auxk"][0].model.W_dec, runs["none"][0].model.W_dec)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auxk_needs_topk_codes(arch):
    sae_cfg = sae_config(arch, D, DICT)
    if ARCHITECTURES[arch].supports_auxk:
        assert arch in ("topk", "batchtopk", "matryoshka_batchtopk")
        Trainer(sae_cfg, tcfg(revival="auxk"))
    else:
        with pytest.raises(SpecError, match=rf"topk, batchtopk, matryoshka_batchtopk\), not '{arch}'"):
            Trainer(sae_cfg, tcfg(revival="auxk"))


def test_zero_steps_are_refused():
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT), tcfg())
    with pytest.raises(CscError, match="0 steps"):
        trainer.fit(iter([]))


def test_hook_cadence_and_keys():
    rec = Recorder()
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT), tcfg(steps=25, log_every=10, gamma=0.1))
    assert trainer.fit(data(30), hooks=[rec]) is trainer.last_report is rec.reports[-1]
    logs = rec.reports
    assert [m["step"] for m in rec.steps] == list(range(1, 26))  # on_step: every step, batches beyond steps unused
    assert [m["step"] for m in logs] == [10, 20, 25]  # on_report: every log_every, and the last step
    step_keys = {"step", "tokens", "lr", "alpha", "beta", "gamma", "loss", "mse", "l1", "nce",
                 "l0", "ev", "dead_frac", "grad_norm", "nce_grad_share"}
    # gamma is 0 at step 0: InfoNCE not computed, nor its share of the gradient
    assert set(rec.steps[0]) == step_keys - {"nce", "nce_grad_share"}
    # the share costs two backward passes: measured at the last step of each report only
    assert all(set(m) == step_keys - ({"nce_grad_share"} if m["step"] not in (10, 20, 25) else set())
               for m in rec.steps[1:])
    assert all(set(m) == step_keys | {"tokens_per_s"} for m in logs)
    assert all(isinstance(v, float) for v in logs[-1].values())
    assert logs[-1]["tokens"] == 25 * B
    assert all(m["tokens_per_s"] > 0 for m in logs)
    # A report averages each per-step metric over the steps since the previous report (a term absent
    # at some steps over its own steps) and carries step, tokens, lr and weights of its last step.
    for report, window in zip(logs, (rec.steps[0:10], rec.steps[10:20], rec.steps[20:25])):
        for key in TRAINING_METRICS:
            values = [m[key] for m in window if key in m]
            if not values:
                assert key not in report, key
                continue
            assert report[key] == pytest.approx(sum(values) / len(values), rel=1e-12), key
        for key in ("step", "tokens", "lr", "alpha", "beta", "gamma"):
            assert report[key] == window[-1][key], key
    assert logs[0]["nce"] == pytest.approx(sum(m["nce"] for m in rec.steps[1:10]) / 9, rel=1e-12)
    expected = logs[-1]["alpha"] * logs[-1]["mse"] + logs[-1]["beta"] * logs[-1]["l1"] \
        + logs[-1]["gamma"] * logs[-1]["nce"]
    assert logs[-1]["loss"] == pytest.approx(expected, rel=1e-5)


def test_update_refuses_out_of_order_steps():
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT), tcfg())
    with pytest.raises(ValueError):
        trainer.update(3, data(1)[0])


def test_inf_in_a_batch_raises_divergence_naming_step_and_term():
    batches = data(6)
    bad = batches[4]
    anchors = bad.anchors.clone()
    anchors[7, 3] = float("inf")
    batches[4] = ActivationBatch(anchors, bad.partners, bad.seq_id, bad.position)
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT, layer_norm=False), tcfg(gamma=0.0))
    with pytest.raises(DivergenceError, match=r"step 4: loss term 'mse' is (inf|nan)"):
        trainer.fit(batches)
    assert trainer.step == 4  # the bad step was not applied
    assert torch.isfinite(trainer.model.W_enc).all()


def test_absurd_learning_rate_diverges_loudly():
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT, layer_norm=False),
                      tcfg(lr=1e30, lr_warmup_start=1e30, gamma=0.1))
    with pytest.raises(DivergenceError, match=r"step \d+: (loss term '\w+'|the gradient norm) is"):
        trainer.fit(data(40))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gamma_zero_is_exactly_the_plain_sae(monkeypatch, arch):
    """gamma=0 must be the plain SAE bit for bit: compare with a hand-written plain loop."""
    sae_cfg = sae_config(arch, D, DICT)
    cfg = tcfg(steps=30, gamma=0.0, balance=True)
    batches = data(30)

    def no_nce(*a, **k):
        raise AssertionError("InfoNCE computed although gamma = 0")

    monkeypatch.setattr("csc.sae.losses.info_nce_loss", no_nce)
    monkeypatch.setattr(losses.InfoNCE, "__call__", no_nce)
    trainer = Trainer(sae_cfg, cfg)
    trainer.fit(batches)

    model = build_sae(sae_cfg, seed=cfg.seed)
    opt = ConstrainedAdam(model.parameters(), [model.W_dec], lr=cfg.lr)
    for step, batch in enumerate(batches):
        x = batch.anchors.float()
        if step == 0:
            model.init_from_data(x, cfg.start_l0(DICT))
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        out = model(x)
        loss = cfg.alpha * mse(x, out.x_hat)
        if model.prefix_widths():  # Matryoshka's nested reconstructions
            loss = loss + cfg.alpha * sum(mse(x, r) for r in model.decode_prefixes(out.z, x, model.prefix_widths()))
        if model.sparsity_term is not None:
            beta = cfg.beta * min(1.0, step / cfg.beta_warmup_steps)
            loss = loss + beta * model.sparsity_loss(out)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        model.after_step(out)
    expected = model.state_dict()
    assert trainer.model.state_dict().keys() == expected.keys()
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(t, expected[name]), name


def test_gamma_changes_training():
    """The converse of the exactness test: with gamma > 0 the InfoNCE term does act."""
    sae_cfg = ReluConfig(d_in=D, dict_size=DICT)
    a = Trainer(sae_cfg, tcfg(steps=10, gamma=0.0))
    b = Trainer(sae_cfg, tcfg(steps=10, gamma=0.5))
    batches = data(10)
    a.fit(batches)
    b.fit(batches)
    assert not torch.equal(a.model.W_enc, b.model.W_enc)


def test_contrastive_term_lowers_held_out_info_nce():
    batches = data(120)
    held_out = data(1, seed=99)[0]
    nce = {}
    for gamma in (0.0, 10.0):
        t = Trainer(ReluConfig(d_in=D, dict_size=DICT),
                    tcfg(steps=120, beta=0.07, gamma=gamma, temperature=0.1))
        t.fit(batches)
        with torch.no_grad():
            nce[gamma] = losses.info_nce_loss(t.model.encode(held_out.anchors),
                                              t.model.encode(held_out.partners),
                                              held_out.seq_id, 0.1).item()
    assert nce[10.0] < nce[0.0] - 0.03


def test_balancing_reaches_its_target_share():
    share = 0.3
    cfg = tcfg(steps=60, gamma=0.1, gamma_warmup_steps=0, balance=True, balance_share=share, balance_ema=0.5,
               log_every=1)
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT), cfg)
    logs = fit(trainer, data(60)).steps
    gammas = [m["gamma"] for m in logs]
    assert gammas[0] == 0.1  # nothing measured yet
    assert len(set(gammas[1:])) > 5  # it follows the measured gradient norms
    (nce,) = [t for t in trainer.terms if t.name == "nce"]
    ema = nce.state_dict()
    assert nce.weight(60) == pytest.approx(share / (1 - share) * ema["ema_reference"] / ema["ema_term"])
    late = [m["nce_grad_share"] for m in logs[20:]]
    assert sum(late) / len(late) == pytest.approx(share, abs=0.03)
    # without balancing, the same gamma gives another share: the target is the controller's doing
    plain = fit(Trainer(ReluConfig(d_in=D, dict_size=DICT), cfg.model_copy(update={"balance": False})),
                data(60)).steps
    assert abs(sum(m["nce_grad_share"] for m in plain[20:]) / 40 - share) > 0.1


def test_target_l0_is_reached():
    sae_cfg = ReluConfig(d_in=D, dict_size=DICT)
    final = {}
    for target in (4.0, 16.0):
        cfg = tcfg(steps=300, beta=0.02, gamma=0.0, target_l0=target, target_l0_rate=0.05, log_every=1)
        logs = fit(Trainer(sae_cfg, cfg), data(300)).steps
        final[target] = sum(m["l0"] for m in logs[-50:]) / 50
        assert final[target] == pytest.approx(target, rel=0.25)
    with pytest.raises(SpecError, match="set sae.k instead"):
        Trainer(TopKConfig(d_in=D, dict_size=DICT, k=4), tcfg(target_l0=4.0))


def test_dead_latents_are_tracked():
    tracker = DeadLatentTracker(4, window=10)
    tracker.update(torch.tensor([[1.0, 0, 0, 0]] * 6))
    assert tracker.tokens_since_fired.tolist() == [0, 6, 6, 6]
    tracker.update(torch.tensor([[0, 2.0, 0, 0]] * 4))
    assert tracker.tokens_since_fired.tolist() == [4, 0, 10, 10]
    assert tracker.dead_mask().tolist() == [False, False, True, True]
    assert tracker.dead_fraction().item() == 0.5

    sae_cfg = ReluConfig(d_in=D, dict_size=DICT)
    model = build_sae(sae_cfg)
    with torch.no_grad():
        model.b_enc[:8] = -1e4  # these latents can never fire
    trainer = Trainer(sae_cfg, tcfg(steps=12, gamma=0.0, dead_window_tokens=10 * B, log_every=1, data_init=False),
                      model=model)
    assert trainer.model is model
    logs = fit(trainer, data(12)).steps
    assert logs[8]["dead_frac"] < 8 / DICT  # step 9: window not yet reached
    assert logs[10]["dead_frac"] >= 8 / DICT


def test_training_is_reproducible():
    runs = []
    for _ in range(2):
        t = Trainer(ReluConfig(d_in=D, dict_size=DICT), tcfg(steps=15, gamma=0.1, hard_negatives=5))
        t.fit(itertools.islice(sparse_dictionary_batches(D, N_FEAT, B, 100, seed=4), 15))
        runs.append(t.model.W_enc.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_partners_in_the_batch_cost_no_second_encoder_pass():
    batches = [ActivationBatch(b.anchors, None, b.seq_id, b.position, partner_index=torch.arange(len(b)) ^ 1)
               for b in data(12)]  # rows 2k and 2k + 1 share a sequence and pair up
    trainer = Trainer(ReluConfig(d_in=D, dict_size=DICT), tcfg(steps=12, gamma=0.1, gamma_warmup_steps=0))

    def refuse(x):
        raise AssertionError("a partner was encoded apart")
    trainer._encode = refuse
    logs = fit(trainer, batches).steps
    assert all(m["nce"] > 0 for m in logs)
