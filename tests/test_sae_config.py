import pytest
from pydantic import ValidationError

from csc.sae.archs.relu import ReluConfig
from csc.sae.archs.topk import TopKConfig
from csc.sae.config import WARMUPS, TrainerConfig, parse_sae_config


def test_defaults_follow_the_paper():
    t = TrainerConfig(steps=10)
    assert (t.lr, t.lr_warmup_start, t.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert (t.batch_size, t.alpha, t.beta, t.gamma, t.temperature) == (1024, 1.0, 0.04, 0.1, 1.0)
    sae = parse_sae_config({"d_in": 8, "dict_size": 16})
    assert type(sae) is ReluConfig and sae.architecture == "relu"  # no architecture: the paper's ReLU SAE
    assert sae.layer_norm is True
    assert parse_sae_config({"architecture": "topk", "d_in": 8, "dict_size": 128}).k == 64


@pytest.mark.parametrize("steps", [1, 9, 10, 25, 1000])
def test_default_warmups_are_a_tenth_of_steps(steps):
    t = TrainerConfig(steps=steps)
    for name in WARMUPS:
        assert getattr(t, name) is None
        assert t.warmup(name) == steps // 10
    set_ = TrainerConfig(steps=steps, lr_warmup_steps=0, beta_warmup_steps=steps, gamma_warmup_steps=1)
    assert [set_.warmup(n) for n in WARMUPS] == [0, steps, 1]


@pytest.mark.parametrize("name", WARMUPS)
def test_a_warmup_longer_than_steps_is_refused_naming_the_field(name):
    with pytest.raises(ValidationError, match=rf"trainer\.{name} \(11\) exceeds trainer\.steps \(10\)"):
        TrainerConfig(steps=10, **{name: 11})
    assert TrainerConfig(steps=10, **{name: 10}).warmup(name) == 10  # ending on the last step is fine


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_in=0, dict_size=4), "d_in"),
    (dict(d_in=4, dict_size=-1), "dict_size"),
    (dict(d_in=4, dict_size=8, architecture="topk"), r"k must be in \[1, dict_size=8\], got 64"),
    (dict(d_in=4, dict_size=8, architecture="topk", k=9), "k must be"),
    (dict(d_in=4, dict_size=8, architecture="topk", k=0), r"topk\.k\n"),
    (dict(d_in=4, dict_size=8, k=2), r"relu\.k\n  Extra inputs are not permitted"),
    (dict(d_in=4, dict_size=8, architecture="gated"), "unknown architecture 'gated'; known: relu, topk, batchtopk, jumprelu, matryoshka_batchtopk"),
    (dict(d_in=4, dict_size=8, typo=1), "typo"),
    (dict(d_in=4, dict_size=8, architecture="batchtopk", k=9), "k must be"),
    (dict(d_in=4, dict_size=8, architecture="batchtopk", k=2, threshold_rate=0), "threshold_rate"),
    (dict(d_in=4, dict_size=8, architecture="batchtopk", k=2, threshold_rate=1.5), "threshold_rate"),
    (dict(d_in=4, dict_size=8, architecture="jumprelu", bandwidth=0), "bandwidth"),
    (dict(d_in=4, dict_size=8, architecture="jumprelu", threshold_init=-0.1), "threshold_init"),
])
def test_sae_config_rejects(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        parse_sae_config(kwargs)


def test_concrete_config_classes_reject_too():
    with pytest.raises(ValidationError, match="k must be"):
        TopKConfig(d_in=4, dict_size=8, k=9)
    with pytest.raises(ValidationError, match="typo"):
        ReluConfig(d_in=4, dict_size=8, typo=1)


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "steps"),
    (dict(steps=5, gamma=-0.1), "gamma"),
    (dict(steps=5, temperature=0.0), "temperature"),
    (dict(steps=5, lr=0.0), "lr"),
    (dict(steps=5, hard_negatives=-1), "hard_negatives"),
    (dict(steps=5, max_grad_norm=0), "max_grad_norm"),
    (dict(steps=5, balance_min=2.0, balance_max=1.0), "balance_min"),
    (dict(steps=5, autocast="fp16"), "autocast"),
    (dict(steps=5, lambda_=0.1), "lambda_"),
    (dict(steps=5, lr_warmup_steps=-1), "lr_warmup_steps"),
])
def test_trainer_config_rejects(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        TrainerConfig(**kwargs)
