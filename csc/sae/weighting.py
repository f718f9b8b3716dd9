"""Weight schedules of the loss terms: linear warm-ups, gradient balancing and an L0 target.

For step t (0-based) and a warm-up of W steps, ramp(t, W) = min(1, t / W) (1 when W = 0): beta and gamma
rise linearly from 0 to their values.

GradientBalance (trainer.balance) sets the InfoNCE weight so that InfoNCE's share of the gradient on the
anchors' pre-activations (what reaches the encoder from the anchors) is `balance_share` = s. On every step
where the term is computed, two norms are measured,

    m_t = ||d(alpha * L_mse)/d pre||,   c_t = ||d L_nce / d pre||   (L_nce unweighted)

and tracked as exponential moving averages M, C (decay `balance_ema`; the first measurement sets them).
The weight is (s / (1 - s)) * M / C, so the weighted share ||gamma_t c|| / (||gamma_t c|| + m) is s when the
norms are steady (gamma itself before any measurement; no clamp, so the target is reached, not approximated).
Weights for step t only use measurements from steps < t, so they are known (and logged) before the step runs,
and resuming from a checkpoint reproduces them exactly. The warm-up ramp multiplies the balanced weight.

L0Controller (trainer.target_l0) multiplies beta by exp(a), where after every step past beta's warm-up

    a <- a + rate * (ln(L0_t + 1) - ln(target + 1))       (L0_t: the step's mean L0 over the batch)

an integral controller in log space: beta grows while the codes are denser than the target and shrinks
while they are sparser, so sweeps compare SAEs at matched sparsity whatever else they change.
"""

from __future__ import annotations

import math


def ramp(step: int, warmup: int) -> float:
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


class GradientBalance:
    def __init__(self, share: float, ema: float):
        self.ratio, self.ema = share / (1 - share), ema
        self.ema_reference: float | None = None
        self.ema_term: float | None = None

    def weight(self, configured: float) -> float:
        if self.ema_reference is None or configured == 0:
            return configured
        return self.ratio * self.ema_reference / max(self.ema_term, 1e-12)

    def observe(self, reference_grad_norm: float, term_grad_norm: float) -> None:
        """Record this step's gradient norms (used from the next step on)."""
        d = self.ema
        if self.ema_reference is None:
            self.ema_reference, self.ema_term = reference_grad_norm, term_grad_norm
        else:
            self.ema_reference = d * self.ema_reference + (1 - d) * reference_grad_norm
            self.ema_term = d * self.ema_term + (1 - d) * term_grad_norm

    def state_dict(self) -> dict:
        return {"ema_reference": self.ema_reference, "ema_term": self.ema_term}

    def load_state_dict(self, state: dict) -> None:
        self.ema_reference = state["ema_reference"]
        self.ema_term = state["ema_term"]


class L0Controller:
    def __init__(self, target: float, rate: float):
        self.target, self.rate = target, rate
        self.log_multiplier = 0.0

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_multiplier)

    def observe(self, l0: float) -> None:
        self.log_multiplier += self.rate * (math.log(l0 + 1) - math.log(self.target + 1))

    def state_dict(self) -> dict:
        return {"log_multiplier": self.log_multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.log_multiplier = state["log_multiplier"]
