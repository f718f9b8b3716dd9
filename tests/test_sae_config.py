import pytest
from pydantic import ValidationError

from csc.sae.config import SaeConfig, TrainerConfig


def test_defaults_follow_the_paper():
    t = TrainerConfig(steps=10)
    assert (t.lr, t.lr_warmup_start, t.lr_warmup_steps, t.max_grad_norm) == (3e-4, 1e-4, 1000, 1.0)
    assert (t.batch_size, t.alpha, t.beta, t.gamma, t.temperature) == (1024, 1.0, 0.04, 0.1, 1.0)
    assert SaeConfig(d_in=8, dict_size=16).layer_norm is True


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_in=0, dict_size=4), "d_in"),
    (dict(d_in=4, dict_size=-1), "dict_size"),
    (dict(d_in=4, dict_size=8, architecture="topk"), "needs k"),
    (dict(d_in=4, dict_size=8, architecture="topk", k=9), "k must be"),
    (dict(d_in=4, dict_size=8, architecture="topk", k=0), "k must be"),
    (dict(d_in=4, dict_size=8, k=2), "only used by"),
    (dict(d_in=4, dict_size=8, architecture="gated"), "architecture"),
    (dict(d_in=4, dict_size=8, typo=1), "typo"),
])
def test_sae_config_rejects(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        SaeConfig(**kwargs)


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
])
def test_trainer_config_rejects(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        TrainerConfig(**kwargs)
