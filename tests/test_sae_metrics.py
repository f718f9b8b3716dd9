import math

import pytest
import torch
import torch.nn.functional as F

from csc.errors import CscError
from csc.sae import metrics
from csc.sae.dead import DeadLatentTracker


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sparse_codes(n, m, seed=0):
    z = rand(n, m, seed=seed).relu()
    z[:, ::3] = 0
    return z


# Slow references: explicit python loops over tokens and features.
def ref_mse(x, x_hat):
    return sum(sum((x[i, j] - x_hat[i, j]).item() ** 2 for j in range(x.shape[1]))
               for i in range(x.shape[0])) / (x.shape[0] * x.shape[1])


def ref_ev(x, x_hat):
    n, d = x.shape
    mean = [sum(x[i, j].item() for i in range(n)) / n for j in range(d)]
    res = sum((x[i, j] - x_hat[i, j]).item() ** 2 for i in range(n) for j in range(d))
    tot = sum((x[i, j].item() - mean[j]) ** 2 for i in range(n) for j in range(d))
    return 1 - res / tot


def test_mse_l1_l0_normalized_mse_cosine_match_loops():
    x, x_hat, z = rand(12, 7, seed=1), rand(12, 7, seed=2), sparse_codes(12, 9)
    assert metrics.mse(x, x_hat).item() == pytest.approx(ref_mse(x, x_hat), rel=1e-5)
    assert metrics.l1(z, 7).item() == pytest.approx(
        sum(abs(v) for v in z.flatten().tolist()) / 12 / 7 ** 0.5, rel=1e-5)
    assert metrics.l0(z).item() == pytest.approx(sum(v != 0 for v in z.flatten().tolist()) / 12)
    num = sum((a - b) ** 2 for a, b in zip(x.flatten().tolist(), x_hat.flatten().tolist()))
    den = sum(a * a for a in x.flatten().tolist())
    assert metrics.normalized_mse(x, x_hat).item() == pytest.approx(num / den, rel=1e-5)
    cos = [sum(a * b for a, b in zip(x[i].tolist(), x_hat[i].tolist()))
           / (math.sqrt(sum(a * a for a in x[i].tolist())) * math.sqrt(sum(b * b for b in x_hat[i].tolist())))
           for i in range(12)]
    assert metrics.cosine_similarity(x, x_hat).item() == pytest.approx(sum(cos) / 12, rel=1e-5)


def test_explained_variance_matches_loop_and_golden_values():
    x = rand(20, 6, seed=3) * 3 + 5  # an offset that an uncentred EV would wrongly reward
    x_hat = rand(20, 6, seed=4)
    assert metrics.explained_variance(x, x_hat).item() == pytest.approx(ref_ev(x, x_hat), rel=1e-5)
    mean_pred = x.mean(dim=0, keepdim=True).expand_as(x)
    assert metrics.explained_variance(x, mean_pred).item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.explained_variance(x, x).item() == 1.0
    # An all-zero SAE output on offset data is far below 0, the kind of number the paper reported.
    assert metrics.explained_variance(x, torch.zeros_like(x)).item() < -1


def test_dead_fractions():
    counts = torch.tensor([0, 3, 0, 1])
    assert metrics.dead_fraction(counts) == 0.5
    tracker = DeadLatentTracker(5, window=100)
    tracker.tokens_since_fired.copy_(torch.tensor([0, 10, 99, 100, 500]))
    assert tracker.dead_fraction().item() == pytest.approx(2 / 5)


def test_feature_density_histogram_against_manual_binning():
    counts = torch.tensor([0, 0, 1, 10, 100, 1000, 5000, 10000])
    h = metrics.feature_density_histogram(counts, n_tokens=10000, bins=4, log10_min=-4.0)
    assert h.n_never_fired == 2
    # log10 densities: -4, -3, -2, -1, log10(.5)=-0.30, 0 ; bins [-4,-3) [-3,-2) [-2,-1) [-1,0]
    assert h.counts.tolist() == [1, 1, 1, 3]
    assert h.edges.tolist() == [-4.0, -3.0, -2.0, -1.0, 0.0]
    below = metrics.feature_density_histogram(torch.tensor([1]), n_tokens=10**9, bins=4, log10_min=-4.0)
    assert below.counts.tolist() == [1, 0, 0, 0]


def test_cross_entropy_and_kl_from_log_probs_match_plain_loops():
    n, v = 37, 11
    clean, other = rand(n, v, seed=5), rand(n, v, seed=6)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(0))
    ce = metrics.token_cross_entropy(clean.log_softmax(-1), targets)
    kl = metrics.token_kl(clean.log_softmax(-1), other.log_softmax(-1))
    for i in range(n):
        lse = math.log(sum(math.exp(a) for a in clean[i].tolist()))
        assert ce[i].item() == pytest.approx(lse - clean[i, targets[i]].item(), rel=1e-5)
        p = F.softmax(clean[i], -1).tolist()
        q = F.softmax(other[i], -1).tolist()
        assert kl[i].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-4, abs=1e-6)
    assert metrics.token_kl(clean.log_softmax(-1), clean.log_softmax(-1)).abs().max().item() < 1e-6


def test_ce_loss_recovered():
    assert metrics.ce_loss_recovered(2.0, 2.0, 10.0) == 1.0
    assert metrics.ce_loss_recovered(2.0, 10.0, 10.0) == 0.0
    assert metrics.ce_loss_recovered(2.9, 4.0, 12.9) == pytest.approx(0.89)
    with pytest.raises(CscError):
        metrics.ce_loss_recovered(3.0, 3.5, 3.0)


def test_kl_div_score():
    assert metrics.kl_div_score(0.0, 4.0) == 1.0
    assert metrics.kl_div_score(4.0, 4.0) == 0.0
    assert metrics.kl_div_score(0.5, 4.0) == 0.875
    with pytest.raises(CscError):
        metrics.kl_div_score(0.1, 0.0)


def test_explained_variance_legacy_by_hand():
    """Per token 1 - ||x_i - x_hat_i||^2 / ||x_i - batch mean||^2, next to csc's ratio of sums."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # batch mean 0
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    per_token = metrics.explained_variance_legacy(x, x_hat)
    assert per_token.tolist() == [1.0, 0.0, 0.75, 1.0]  # mean 0.6875
    assert metrics.explained_variance(x, x_hat).item() == pytest.approx(1 - 2 / 10)  # 0.8: the same errors
    # Centred on the batch's mean: an offset moves neither; predicting the mean scores 0 at every token.
    assert torch.allclose(metrics.explained_variance_legacy(x + 5, x_hat + 5), per_token)
    assert metrics.explained_variance_legacy(x + 5, torch.full_like(x, 5.0)).tolist() == [0.0] * 4


def test_decoder_max_cosine_matches_loop():
    w = rand(9, 5, seed=7)
    w[3] = -2 * w[1]  # an antiparallel duplicate counts as |cos| = 1
    v = [r / r.norm() for r in w]
    ref = sum(max(abs(float(v[i] @ v[j])) for j in range(9) if j != i) for i in range(9)) / 9
    assert metrics.decoder_max_cosine(w) == pytest.approx(ref, rel=1e-5)


def test_code_similarity_matches_loop_and_handles_zero_codes():
    za, zp = sparse_codes(10, 8, seed=8), sparse_codes(10, 8, seed=9)
    za[2] = 0
    seq = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])

    def cos(a, b):
        na, nb = a.norm().item(), b.norm().item()
        return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)

    pos = sum(cos(za[i], zp[i]) for i in range(10)) / 10
    negs = [cos(za[i], za[j]) for i in range(10) for j in range(10) if seq[i] != seq[j]]
    got = metrics.code_similarity(za, zp, seq)
    assert got[0] == pytest.approx(pos, rel=1e-5)
    assert got[1] == pytest.approx(sum(negs) / len(negs), rel=1e-5)
    with pytest.raises(CscError):
        metrics.code_similarity(za, zp, torch.zeros(10, dtype=torch.long))


def test_streaming_stats_equal_the_formulas_on_all_tokens_at_once():
    xs = [rand(n, 6, seed=10 + n) + 4 for n in (7, 1, 30, 12)]
    xh = [x + 0.3 * rand(*x.shape, seed=50 + x.shape[0]) for x in xs]
    zs = [sparse_codes(x.shape[0], 10, seed=90 + x.shape[0]) for x in xs]
    zs[1][:, 5] = 0
    zs[2][:, 5] = 0
    s = metrics.StreamingStats(6, 10)
    for x, x_hat, z in zip(xs, xh, zs):
        s.update(x, x_hat, z)
    x, x_hat, z = torch.cat(xs).double(), torch.cat(xh).double(), torch.cat(zs)
    r = s.result()
    assert r["tokens"] == 50
    assert r["explained_variance"] == pytest.approx(metrics.explained_variance(x, x_hat).item(), rel=1e-9)
    assert r["mse"] == pytest.approx(metrics.mse(x, x_hat).item(), rel=1e-9)
    assert r["normalized_mse"] == pytest.approx(metrics.normalized_mse(x, x_hat).item(), rel=1e-9)
    assert r["l0"] == pytest.approx(metrics.l0(z).item())
    assert r["l1"] == pytest.approx(metrics.l1(z.double(), 6).item(), rel=1e-6)
    fired = (z != 0).sum(0)
    assert r["dead_fraction"] == pytest.approx((fired == 0).float().mean().item())
    # An average of per-batch EVs would differ: the accumulator must not do that.
    naive = sum(metrics.explained_variance(xs[i].double(), xh[i].double()).item() for i in (0, 2, 3)) / 3
    assert abs(naive - r["explained_variance"]) > 1e-3
    with pytest.raises(CscError):
        metrics.StreamingStats(6, 10).result()


def test_density_histogram_round_trips_through_json():
    from csc.sae.metrics import DensityHistogram, feature_density_histogram

    hist = feature_density_histogram(torch.tensor([0, 1, 5, 40, 0, 900]), n_tokens=1000, bins=8)
    back = DensityHistogram.from_json(hist.to_json())
    assert torch.equal(back.edges, hist.edges) and torch.equal(back.counts, hist.counts)
    assert back.n_never_fired == hist.n_never_fired == 2
