import pytest

from csc.sae.config import TrainerConfig
from csc.sae.weighting import LossWeighting


def cfg(**kw):
    return TrainerConfig(**{"steps": 100, **kw})


def test_linear_warmup_of_beta_and_gamma():
    w = LossWeighting(cfg(alpha=2.0, beta=0.04, gamma=0.1, beta_warmup_steps=10, gamma_warmup_steps=4))
    assert w.at(0) == type(w.at(0))(alpha=2.0, beta=0.0, gamma=0.0)
    assert w.at(5).beta == pytest.approx(0.02)
    assert w.at(2).gamma == pytest.approx(0.05)
    assert w.at(4).gamma == w.at(50).gamma == 0.1
    assert w.at(10).beta == w.at(99).beta == 0.04
    no_warmup = LossWeighting(cfg(beta_warmup_steps=0, gamma_warmup_steps=0))
    assert (no_warmup.at(0).beta, no_warmup.at(0).gamma) == (0.04, 0.1)


def test_balance_rule_ema_and_clamps():
    w = LossWeighting(cfg(gamma=0.1, gamma_warmup_steps=10, balance=True, balance_ratio=0.5,
                          balance_ema=0.9, balance_min=0.5, balance_max=4.0))
    assert w.at(20).gamma == 0.1  # before any measurement: the configured gamma
    w.observe(2.0, 4.0)  # first measurement sets the averages: target 0.5 * 2 / 4 = 0.25
    assert w.at(20).gamma == pytest.approx(0.25)
    assert w.at(5).gamma == pytest.approx(0.125)  # still scaled by the warm-up ramp
    w.observe(2.0, 1.0)  # ema: mse 2.0, nce 0.9 * 4 + 0.1 * 1 = 3.7
    assert w.at(20).gamma == pytest.approx(0.5 * 2.0 / 3.7)
    for _ in range(200):
        w.observe(100.0, 1.0)  # target 50: clamped at 4 * gamma
    assert w.at(20).gamma == pytest.approx(0.4)
    for _ in range(200):
        w.observe(0.001, 1.0)  # target ~0: clamped at 0.5 * gamma
    assert w.at(20).gamma == pytest.approx(0.05)


def test_balance_off_ignores_measurements_and_gamma_zero_stays_zero():
    w = LossWeighting(cfg(gamma=0.1, gamma_warmup_steps=0))
    w.observe(5.0, 1.0)
    assert w.at(3).gamma == 0.1
    z = LossWeighting(cfg(gamma=0.0, balance=True))
    z.observe(5.0, 1.0)
    assert all(z.at(s).gamma == 0.0 for s in range(0, 3000, 100))


def test_state_round_trip():
    a = LossWeighting(cfg(balance=True))
    a.observe(1.5, 0.3)
    a.observe(1.1, 0.7)
    b = LossWeighting(cfg(balance=True))
    b.load_state_dict(a.state_dict())
    assert b.at(2000) == a.at(2000)
