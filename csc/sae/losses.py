"""Training losses. Each returns a scalar; conventions match csc.sae.metrics.

- mse_loss(x, x_hat) = mean_i sum_d (x_id - x_hat_id)^2
- l1_loss(z)         = mean_i sum_j |z_ij|
- info_nce_loss: see its docstring.
- auxk_loss: see its docstring.
"""

import torch

from csc.sae.metrics import l1, mse, unit_codes

NEG_INF = float("-inf")


def mse_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return mse(x, x_hat)


def l1_loss(z: torch.Tensor) -> torch.Tensor:
    return l1(z)


def info_nce_loss(z_anchor: torch.Tensor, z_partner: torch.Tensor, seq_id: torch.Tensor,
                  temperature: float, hard_negatives: int = 0) -> torch.Tensor:
    """InfoNCE over SAE codes with cosine similarity.

    With a_i, p_i the unit-norm codes of anchor i and its partner (all-zero codes stay zero, so
    their cosines are 0 rather than NaN) and tau the temperature:

        pos_i  = (a_i . p_i) / tau
        neg_ij = (a_i . a_j) / tau   for anchors j with seq_id[j] != seq_id[i]
                                     (same-sequence anchors, i itself included, are masked out)
        loss_i = logsumexp([pos_i, neg_i*]) - pos_i

    hard_negatives = m > 0 keeps only the m largest neg_ij of each anchor (fewer if it has fewer).
    The result is the mean of loss_i over anchors with at least one negative. An anchor without
    negatives has no contrastive task (its loss_i would be exactly 0 with zero gradient), so it is
    left out of the mean rather than diluting it; a batch where no anchor has a negative returns 0.
    """
    a = unit_codes(z_anchor.float())
    p = unit_codes(z_partner.float())
    pos = (a * p).sum(dim=-1) / temperature
    valid = seq_id[:, None] != seq_id[None, :]
    neg = (a @ a.T / temperature).masked_fill(~valid, NEG_INF)
    if 0 < hard_negatives < neg.shape[1]:
        neg = neg.topk(hard_negatives, dim=1).values
    logits = torch.cat([pos[:, None], neg], dim=1)
    per_anchor = torch.logsumexp(logits, dim=1) - pos
    has_neg = valid.any(dim=1)
    if not has_neg.any():
        return pos.sum() * 0.0 + 0.0  # keeps the graph; "+ 0.0" turns -0.0 into 0.0
    return per_anchor[has_neg].mean()


def auxk_loss(x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, W_dec: torch.Tensor,
              dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): let dead latents reconstruct what the live ones miss.

    e = x - x_hat (detached: only dead latents learn from this term). Among dead latents take the
    k_aux largest pre-activations per token, ReLU them, decode without bias to e_hat, and return
    sum ||e - e_hat||^2 / sum ||e - mean(e)||^2. With TopK, dead latents still have positive
    pre-activations that merely lose the top-k race, so they receive gradient here.
    Returns 0 when no latent is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.sum() * 0.0 + 0.0
    e = (x - x_hat).detach().float()
    masked = pre.float().masked_fill(~dead, NEG_INF)
    values, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    e_hat = torch.zeros_like(pre, dtype=torch.float32).scatter(-1, idx, values.relu()) @ W_dec.float()
    total = (e - e.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return (e - e_hat).pow(2).sum() / total
