"""Weight schedules of the loss terms: linear warm-ups and gradient balancing.

For step t (0-based) and a warm-up of W steps, ramp(t, W) = min(1, t / W) (1 when W = 0): beta and gamma
rise linearly from 0 to their values.

GradientBalance (trainer.balance) rescales a term's weight so that its gradient on the anchor codes z keeps
a fixed ratio to the reconstruction's. On every step where the term is computed, two norms are measured,

    m_t = ||d(alpha * L_mse)/dz||,   c_t = ||d L_term / dz||   (L_term unweighted)

and tracked as exponential moving averages M, C (decay `balance_ema`; the first measurement sets them).
The balanced weight is clamp(balance_ratio * M / C, balance_min * w, balance_max * w) for the configured
weight w (w itself before any measurement). Weights for step t only use measurements from steps < t, so they
are known (and logged) before the step runs, and resuming from a checkpoint reproduces them exactly.
"""

from __future__ import annotations


def ramp(step: int, warmup: int) -> float:
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


class GradientBalance:
    def __init__(self, ratio: float, ema: float, low: float, high: float):
        self.ratio, self.ema, self.low, self.high = ratio, ema, low, high
        self.ema_reference: float | None = None
        self.ema_term: float | None = None

    def weight(self, configured: float) -> float:
        if self.ema_reference is None or configured == 0:
            return configured
        target = self.ratio * self.ema_reference / max(self.ema_term, 1e-12)
        return min(max(target, self.low * configured), self.high * configured)

    def observe(self, reference_grad_norm: float, term_grad_norm: float) -> None:
        """Record this step's gradient norms on the codes (used from the next step on)."""
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
