"""Every measurement formula of csc, on tensors. Tokens are rows: x, x_hat [N, d]; codes z [N, dict].

Conventions (also used by the training losses):
- mse = mean over tokens and features of (x - x_hat)^2 (per dimension: on activations normalised to
  norm sqrt(d) it is ~1 for a reconstruction by zero, whatever d is).
- l1  = mean over tokens of sum over latents of |z|, divided by sqrt(d_in): the L1 of the codes in units
  of the input's norm (codes of unit-norm decoder rows are on the scale of x, whose norm is ~sqrt(d)).
- l0  = mean over tokens of #(z != 0).
- explained variance is centred: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean over tokens
  per feature, so predicting the mean scores 0 and perfect reconstruction 1.
- normalised mse = sum ||x - x_hat||^2 / sum ||x||^2 (relative to predicting zero).
"""

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csc.errors import CscError

COS_EPS = 1e-8


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).mean()


def l1(z: torch.Tensor, d_in: int) -> torch.Tensor:
    return z.abs().sum(dim=-1).mean() / d_in ** 0.5


def l0(z: torch.Tensor) -> torch.Tensor:
    """Mean number of firing latents per token, for codes z >= 0 (every architecture's): sign(z) is 1 where a latent
    fires, and its sum is 4x faster than counting z != 0, whose booleans are summed as int64."""
    return z.sign().sum(dim=-1, dtype=torch.float32).mean()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return 1 - residual / total


def explained_variance_legacy(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token explained variance [N] of SAEBench 0.6.0's `explained_variance_legacy` (evals/core/main.py:
    get_sparsity_and_variance_metrics):

        ev_i = 1 - ||x_i - x_hat_i||^2 / ||x_i - mean_B(x)||^2,   mean_B over the rows given (SAEBench's batch)

    SAEBench reports the mean of ev_i over all tokens of all batches. Unlike `explained_variance` (one ratio of
    sums) every token weighs the same, so one token near its batch's mean can pull it far down. SAEBench's plain
    `explained_variance` is not copied: its total variance E||x||^2 - (mean_d E[x_d^2])^2 squares a second moment
    where sum_d E[x_d]^2 is meant."""
    return 1 - (x - x_hat).pow(2).sum(dim=-1) / (x - x.mean(dim=0)).pow(2).sum(dim=-1)


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum() / x.pow(2).sum()


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of cos(x_i, x_hat_i)."""
    return F.cosine_similarity(x, x_hat, dim=-1, eps=COS_EPS).mean()


def unit_codes(z: torch.Tensor) -> torch.Tensor:
    """Codes scaled to unit norm; all-zero codes stay zero (cosine 0 with everything, no NaN)."""
    return F.normalize(z, dim=-1, eps=COS_EPS)


def dead_fraction(fire_counts: torch.Tensor) -> float:
    """Fraction of latents that never fired, given per-latent firing counts over some tokens."""
    return (fire_counts == 0).float().mean().item()


@dataclass(frozen=True)
class DensityHistogram:
    edges: torch.Tensor
    """[bins + 1] bin edges in log10(firing density)."""
    counts: torch.Tensor
    """[bins] latents per bin; densities below the first edge land in the first bin."""
    n_never_fired: int
    """Latents with density exactly 0 (log10 is -inf, so they are counted apart)."""

    def to_json(self) -> str:
        return json.dumps({"edges": self.edges.tolist(), "counts": self.counts.tolist(),
                           "n_never_fired": self.n_never_fired})

    @classmethod
    def from_json(cls, text: str) -> "DensityHistogram":
        d = json.loads(text)
        return cls(torch.tensor(d["edges"], dtype=torch.float64), torch.tensor(d["counts"]), int(d["n_never_fired"]))


def feature_density_histogram(fire_counts: torch.Tensor, n_tokens: int, bins: int = 40,
                              log10_min: float = -8.0) -> DensityHistogram:
    """Histogram of log10(fires / n_tokens) over [log10_min, 0] for latents that fired at all."""
    density = fire_counts.double() / n_tokens
    fired = density > 0
    logd = density[fired].log10().clamp(min=log10_min, max=0.0)
    edges = torch.linspace(log10_min, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(logd, bins=bins, min=log10_min, max=0.0).long()
    return DensityHistogram(edges, counts, int((~fired).sum()))


def token_cross_entropy(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [N] of log-probabilities [N, V] (log_softmax of the logits) against targets [N].

    log_probs[i] must already be the prediction for targets[i] (the caller shifts). Callers take the log_softmax
    once per run and share it between its CE and its KL: over a 262k vocabulary one costs about a sixth of the
    unembedding matmul that makes the logits (measured on CPU)."""
    return -log_probs.gather(1, targets[:, None]).squeeze(1)


def token_kl(clean_log_probs: torch.Tensor, other_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(clean || other) [N] in nats, from log-probabilities [N, V]."""
    return (clean_log_probs.exp() * (clean_log_probs - other_log_probs)).sum(dim=-1)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 = SAE as good as the clean model,
    0 = as bad as zero-ablating the layer."""
    if ce_ablated == ce_clean:
        raise CscError("CE loss recovered is undefined: zero-ablation CE equals the clean CE")
    return (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)


def kl_div_score(kl_spliced: float, kl_ablated: float) -> float:
    """(KL_ablated - KL_spliced) / KL_ablated, SAEBench's `kl_div_score` (evals/core/main.py:
    get_downstream_reconstruction_metrics), KLs from the clean model: 1 = the SAE leaves the output distribution
    as it is, 0 = it moves it as far as zero-ablating the layer. (SAEBench's `ce_loss_score` is `ce_loss_recovered`'s
    formula.)"""
    if kl_ablated == 0:
        raise CscError("kl_div_score is undefined: zero-ablation leaves the output distribution unchanged")
    return (kl_ablated - kl_spliced) / kl_ablated


def decoder_max_cosine(W_dec: torch.Tensor) -> float:
    """Mean over decoder rows of the largest |cos| similarity to any OTHER row (1 = duplicates)."""
    v = F.normalize(W_dec.float(), dim=-1, eps=COS_EPS)
    sim = (v @ v.T).abs()
    sim.fill_diagonal_(-1.0)
    return sim.max(dim=-1).values.mean().item()


def code_similarity(z_anchor: torch.Tensor, z_partner: torch.Tensor,
                    seq_id: torch.Tensor) -> tuple[float, float]:
    """(mean cos of each anchor's code with its partner's code,
        mean cos over all anchor pairs (i, j) from different sequences).

    A contrastive SAE should raise the first relative to the second."""
    a = unit_codes(z_anchor.float())
    p = unit_codes(z_partner.float())
    positive = (a * p).sum(dim=-1).mean().item()
    other = seq_id[:, None] != seq_id[None, :]
    if not other.any():
        raise CscError("code_similarity needs anchors from at least two sequences")
    negative = (a @ a.T)[other].mean().item()
    return positive, negative


class StreamingStats:
    """Exact reconstruction statistics over many batches (sums, never averages of averages).

    The centred total variance is merged per feature with Chan's parallel formula in float64:
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n, so explained variance equals the one-batch formula
    applied to all tokens at once.
    """

    def __init__(self, d_in: int, dict_size: int):
        self.n = 0
        self.mean = torch.zeros(d_in, dtype=torch.float64)
        self.m2 = torch.zeros(d_in, dtype=torch.float64)
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_counts = torch.zeros(dict_size, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        x_hat = x_hat.detach().double().cpu()
        z = z.detach().cpu()
        nb = x.shape[0]
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).pow(2).sum(dim=0)
        n = self.n + nb
        delta = mean_b - self.mean
        self.m2 += m2_b + delta.pow(2) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n
        self.sse += (x - x_hat).pow(2).sum().item()
        self.sum_sq += x.pow(2).sum().item()
        self.sum_l0 += (z != 0).sum().item()
        self.sum_l1 += z.double().abs().sum().item()
        self.fire_counts += (z != 0).sum(dim=0)

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise CscError("no tokens were evaluated")
        return {
            "tokens": float(self.n),
            "mse": self.sse / (self.n * self.mean.numel()),
            "explained_variance": 1 - self.sse / self.m2.sum().item(),
            "normalized_mse": self.sse / self.sum_sq,
            "l0": self.sum_l0 / self.n,
            "l1": self.sum_l1 / self.n / self.mean.numel() ** 0.5,
            "dead_fraction": dead_fraction(self.fire_counts),
        }
