"""Context locality on synthetic codes with known answers, and against a loop over its definition."""

import pytest
import torch

from csc.errors import CscError
from csc.sae.locality import ContextLocality


def _slow_ratios(z: torch.Tensor) -> list[float]:
    """r_j = P(fires at t | fired earlier in t's context) / P(fires), token by token."""
    n, T, m = z.shape
    out = []
    for j in range(m):
        fired = seen = fired_seen = 0
        for c in range(n):
            before = False
            for t in range(T):
                on = bool(z[c, t, j] != 0)
                fired += on
                seen += before
                fired_seen += on and before
                before = before or on
        out.append(float("nan") if seen == 0 else (fired_seen / seen) / (fired / (n * T)))
    return out


def _hand_built() -> torch.Tensor:
    """4 contexts of 8 tokens, 5 latents (positions 0..7 of each context)."""
    z = torch.zeros(4, 8, 5)
    z[0, :, 0] = 1.0        # on at every token of 1 context in 4: P(fire) = 1/4, P(fire | seen) = 1 -> r = 4
    z[:3, 3, 1] = 2.0       # once in each of 3 contexts: never again -> r = 0
    z[1, [1, 5], 2] = 0.5   # tokens 1 and 5 of context 1: seen at 2..7 (6 tokens), fires at 1 of them;
    #                         P(fire) = 2/32 -> r = (1/6) / (1/16) = 8/3
    z[2, 7, 4] = 3.0        # only the last token of a context: nothing is seen after it -> not measured
    return z                # latent 3 never fires: not measured


def test_hand_built_ratios_and_summaries():
    loc = ContextLocality(5)
    loc.update(_hand_built())
    r = loc.ratios()
    assert r[:3].tolist() == pytest.approx([4.0, 0.0, 8 / 3])
    assert r[3:].isnan().all()
    out = loc.result()
    assert out["context_locality"] == pytest.approx(8 / 3)  # median of {0, 8/3, 4}
    # firing-weighted: latents fire 8, 3 and 2 times
    assert out["context_locality_weighted"] == pytest.approx((8 * 4 + 3 * 0 + 2 * 8 / 3) / 13)
    assert torch.allclose(r, torch.tensor(_slow_ratios(_hand_built()), dtype=torch.float64), equal_nan=True)


def test_whole_context_latents_score_one_over_their_context_fraction():
    """A latent on at every token of a fraction q of the contexts and off elsewhere: r = 1/q exactly."""
    n, T = 20, 12
    z = torch.zeros(n, T, 3)
    z[:2, :, 0] = 1.0   # q = 1/10
    z[:5, :, 1] = 1.0   # q = 1/4
    z[:, :, 2] = 1.0    # every context: no context structure to find, r = 1
    loc = ContextLocality(3)
    for part in z.split(7):  # batches of whole contexts, any split
        loc.update(part)
    assert loc.ratios().tolist() == pytest.approx([10.0, 4.0, 1.0])
    assert loc.result()["context_locality"] == pytest.approx(4.0)
    assert loc.result()["context_locality_weighted"] == pytest.approx((24 * 10 + 60 * 4 + 240 * 1) / 324)


def test_independent_firing_scores_one():
    """Latents that fire independently at every token, at rates 2% to 40%: r ~ 1 (no context structure)."""
    g = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.4])
    z = (torch.rand(400, 64, 5, generator=g) < rates).float()
    loc = ContextLocality(5)
    loc.update(z)
    assert loc.ratios().tolist() == pytest.approx([1.0] * 5, abs=0.1)
    assert loc.result()["context_locality"] == pytest.approx(1.0, abs=0.03)


def test_random_codes_match_the_loop_and_stream_in_any_batching():
    g = torch.Generator().manual_seed(1)
    z = torch.rand(9, 10, 6, generator=g) * (torch.rand(9, 10, 6, generator=g) < 0.3)
    whole = ContextLocality(6)
    whole.update(z)
    parts = ContextLocality(6)
    for part in (z[5:], z[:2], z[2:5]):  # contexts in any order, any batch sizes
        parts.update(part)
    ref = torch.tensor(_slow_ratios(z), dtype=torch.float64)
    assert torch.allclose(whole.ratios(), ref, equal_nan=True)
    assert torch.equal(parts.ratios(), whole.ratios())


def test_no_latent_seen_is_an_error():
    loc = ContextLocality(2)
    z = torch.zeros(3, 4, 2)
    z[:, -1, 0] = 1.0  # fires only at last tokens
    loc.update(z)
    with pytest.raises(CscError, match="context locality is undefined"):
        loc.result()
