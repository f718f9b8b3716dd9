import math

import pytest
import torch

from csc.sae.archs import build_sae
from csc.sae.archs.relu import ReluConfig
from csc.sae.config import TrainerConfig
from csc.sae.losses import InfoNCE, Sparsity, build_terms
from csc.sae.model import ForwardOutput
from csc.sae.weighting import GradientBalance, L0Controller, ramp


def cfg(**kw):
    return TrainerConfig(**{"steps": 100, **kw})


def weights_at(trainer_cfg, step):
    """The weights in force at `step`, by weight name, as the trainer computes them."""
    terms = build_terms(build_sae(ReluConfig(d_in=4, dict_size=8)), trainer_cfg)
    return {t.weight_name: t.weight(step) for t in terms}


def test_ramp_is_linear_then_one():
    assert [ramp(s, 4) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp(0, 0) == ramp(7, 0) == 1.0


def test_linear_warmup_of_beta_and_gamma():
    c = cfg(alpha=2.0, beta=0.04, gamma=0.1, beta_warmup_steps=10, gamma_warmup_steps=4)
    assert weights_at(c, 0) == {"alpha": 2.0, "beta": 0.0, "gamma": 0.0}
    assert weights_at(c, 5)["beta"] == pytest.approx(0.02)
    assert weights_at(c, 2)["gamma"] == pytest.approx(0.05)
    assert weights_at(c, 4)["gamma"] == weights_at(c, 50)["gamma"] == 0.1
    assert weights_at(c, 10)["beta"] == weights_at(c, 99)["beta"] == 0.04
    no_warmup = weights_at(cfg(beta_warmup_steps=0, gamma_warmup_steps=0), 0)
    assert (no_warmup["beta"], no_warmup["gamma"]) == (0.04, 0.1)
    default = cfg()  # warm-ups unset: a tenth of the 100 steps
    assert weights_at(default, 5) == {"alpha": 1.0, "beta": pytest.approx(0.02), "gamma": pytest.approx(0.05)}
    assert weights_at(default, 10) == {"alpha": 1.0, "beta": 0.04, "gamma": 0.1}


def test_balance_rule_and_ema():
    b = GradientBalance(share=1 / 3, ema=0.9)  # share 1/3: the weighted term's gradient is half the reference's
    assert b.weight(0.1) == 0.1  # before any measurement: the configured weight
    b.observe(2.0, 4.0)  # first measurement sets the averages: 0.5 * 2 / 4 = 0.25
    assert b.weight(0.1) == pytest.approx(0.25)
    b.observe(2.0, 1.0)  # ema: reference 2.0, term 0.9 * 4 + 0.1 * 1 = 3.7
    assert b.weight(0.1) == pytest.approx(0.5 * 2.0 / 3.7)
    for _ in range(2000):
        b.observe(100.0, 1.0)  # far from gamma: no clamp, the share is what is reached
    assert b.weight(0.1) == pytest.approx(50.0, rel=1e-6)


def test_l0_controller_is_an_integral_controller_in_log_space():
    c = L0Controller(target=20.0, rate=0.1)
    assert c.multiplier == 1.0
    c.observe(20.0)
    assert c.multiplier == 1.0  # at the target: no change
    c.observe(62.0)  # ln(63) - ln(21) = ln 3
    assert c.multiplier == pytest.approx(3 ** 0.1)
    c.observe(6.0)  # ln(7) - ln(21) = -ln 3: back
    assert c.multiplier == pytest.approx(1.0)
    d = L0Controller(target=20.0, rate=0.1)
    d.load_state_dict({**c.state_dict(), "log_multiplier": 0.5})
    assert d.multiplier == pytest.approx(math.exp(0.5))


def test_target_l0_multiplies_beta_after_its_warmup():
    term = Sparsity("l1", cfg(beta=0.04, beta_warmup_steps=10, target_l0=20.0, target_l0_rate=0.1))
    dense = ForwardOutput(x=None, pre=None, z=torch.ones(3, 62), x_hat=None)
    term.after_step(5, dense)  # during the warm-up: not observed
    assert term.weight(10) == pytest.approx(0.04)
    term.after_step(10, dense)
    assert term.weight(10) == pytest.approx(0.04 * 3 ** 0.1)
    assert term.weight(5) == pytest.approx(0.02 * 3 ** 0.1)
    assert Sparsity("l1", cfg(beta=0.04)).control is None


def test_info_nce_weight_is_balanced_gamma_times_ramp():
    term = InfoNCE(cfg(gamma=0.1, gamma_warmup_steps=10, balance=True, balance_share=1 / 3, balance_ema=0.9), 8)
    assert term.weight(20) == 0.1  # before any measurement: the configured gamma
    assert term.weight(5) == pytest.approx(0.05)
    term.balance.observe(2.0, 4.0)
    assert term.weight(20) == pytest.approx(0.25)
    assert term.weight(5) == pytest.approx(0.125)  # still scaled by the warm-up ramp
    assert term.weight(0) == 0.0


def test_balance_off_ignores_measurements_and_gamma_zero_stays_zero():
    off = InfoNCE(cfg(gamma=0.1, gamma_warmup_steps=0), 8)
    assert off.balance is None  # nothing to measure: the trainer never observes
    assert off.weight(3) == 0.1
    zero = InfoNCE(cfg(gamma=0.0, balance=True), 8)
    zero.balance.observe(5.0, 1.0)
    assert all(zero.weight(s) == 0.0 for s in range(0, 3000, 100))
    assert "gamma" not in weights_at(cfg(gamma=0.0, balance=True), 50)  # no InfoNCE term at all


def test_state_round_trip():
    a = InfoNCE(cfg(balance=True), 8)
    a.balance.observe(1.5, 0.3)
    a.balance.observe(1.1, 0.7)
    b = InfoNCE(cfg(balance=True), 8)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == a.balance.state_dict()
    assert b.weight(2000) == a.weight(2000) != 0.1
    assert InfoNCE(cfg(), 8).state_dict() == {}
