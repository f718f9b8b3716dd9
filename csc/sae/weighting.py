"""Dynamic loss weights: the alpha, beta, gamma in force at each step.

Rule, for step t (0-based):

    alpha_t = alpha
    beta_t  = beta * min(1, t / beta_warmup_steps)          (beta itself when warm-up is 0)
    gamma_t = w_t * g,  w_t = min(1, t / gamma_warmup_steps)

g is `gamma` unless `balance` is on. With balance, two gradient norms on the anchor codes z are
measured on every step where the InfoNCE term is computed:

    m_t = ||d(alpha_t * L_mse)/dz||,   c_t = ||d L_c / dz||   (L_c unweighted)

and tracked as exponential moving averages M, C (decay `balance_ema`; the first measurement sets
them). Then g = clamp(balance_ratio * M / C, balance_min * gamma, balance_max * gamma), i.e. gamma
is chosen so that the contrastive gradient on the codes is balance_ratio times the reconstruction
gradient, within a bounded factor of the configured gamma. Before any measurement g = gamma.
Weights for step t only use measurements from steps < t, so they are known (and logged) before the
step runs, and resuming from a checkpoint reproduces them exactly.

gamma = 0 gives gamma_t = 0 at every step, and the trainer then never computes the InfoNCE term:
that is exactly the plain SAE.
"""

from dataclasses import dataclass

from csc.sae.config import TrainerConfig


@dataclass(frozen=True)
class Weights:
    alpha: float
    beta: float
    gamma: float


def _ramp(step: int, warmup: int) -> float:
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


class LossWeighting:
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.ema_mse_grad: float | None = None
        self.ema_nce_grad: float | None = None

    def balanced_gamma(self) -> float:
        cfg = self.cfg
        if not cfg.balance or self.ema_mse_grad is None or cfg.gamma == 0:
            return cfg.gamma
        target = cfg.balance_ratio * self.ema_mse_grad / max(self.ema_nce_grad, 1e-12)
        return min(max(target, cfg.balance_min * cfg.gamma), cfg.balance_max * cfg.gamma)

    def at(self, step: int) -> Weights:
        cfg = self.cfg
        return Weights(
            alpha=cfg.alpha,
            beta=cfg.beta * _ramp(step, cfg.beta_warmup_steps),
            gamma=self.balanced_gamma() * _ramp(step, cfg.gamma_warmup_steps),
        )

    def observe(self, mse_grad_norm: float, nce_grad_norm: float) -> None:
        """Record this step's gradient norms on the codes (used from the next step on)."""
        d = self.cfg.balance_ema
        if self.ema_mse_grad is None:
            self.ema_mse_grad, self.ema_nce_grad = mse_grad_norm, nce_grad_norm
        else:
            self.ema_mse_grad = d * self.ema_mse_grad + (1 - d) * mse_grad_norm
            self.ema_nce_grad = d * self.ema_nce_grad + (1 - d) * nce_grad_norm

    def state_dict(self) -> dict:
        return {"ema_mse_grad": self.ema_mse_grad, "ema_nce_grad": self.ema_nce_grad}

    def load_state_dict(self, state: dict) -> None:
        self.ema_mse_grad = state["ema_mse_grad"]
        self.ema_nce_grad = state["ema_nce_grad"]
