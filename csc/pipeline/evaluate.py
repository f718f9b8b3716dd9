"""Evaluate a trained SAE on held-out activations and by splicing it into the LM.

Reconstruction figures (MSE, explained variance, L0, ...) come from `metrics.StreamingStats` over the
held-out batches. Downstream figures splice the SAE into the residual stream after layer L with a
forward hook that returns a replacement, at every position but BOS (the SAE never trains on BOS):

    clean    the model as it is
    spliced  resid_post(L) -> decode(encode(x * scale)) / scale
    ablated  resid_post(L) -> 0

CE is next-token cross entropy over every predicted position, KL is KL(clean || other) per token.
Logits are formed from the final hidden states `chunk_tokens` rows at a time, so memory stays bounded
even with Gemma's 262k vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from csc.activations.capture import base_model, decoder_layers
from csc.errors import CscError
from csc.sae import metrics
from csc.sae.batch import ActivationBatch
from csc.sae.losses import info_nce_loss
from csc.sae.model import SparseAutoencoder


def _final_hidden(model: nn.Module, ids: torch.Tensor, layer: int,
                  replace: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    def hook(_mod, _args, out):
        resid = out[0] if isinstance(out, tuple) else out
        new = resid.clone()
        new[:, 1:] = replace(resid[:, 1:])
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = decoder_layers(model)[layer].register_forward_hook(hook) if replace is not None else None
    try:
        return base_model(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()


def _logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def splice_scores(model: nn.Module, sae: SparseAutoencoder, contexts: torch.Tensor, layer: int, scale: float,
                  lm_batch_size: int = 8, chunk_tokens: int = 128) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered, delta CE = CE_spliced - CE_clean (nats) and mean
    KL(clean || spliced / ablated), over `contexts` [n, T] (BOS first). The keys come in that order, delta CE
    and KL right after CE loss recovered: a ratio alone hides its scale ("0.89 recovered" can be +1.8 nats)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sae_device = sae.W_dec.device

    def through_sae(x: torch.Tensor) -> torch.Tensor:
        x_hat = sae(x.to(sae_device, torch.float32) * scale).x_hat
        return (x_hat / scale).to(device, dtype)

    sums = {k: 0.0 for k in ("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated")}
    n = 0
    for ids in contexts.split(lm_batch_size):
        ids = ids.to(device)
        hidden = {name: _final_hidden(model, ids, layer, fn)[:, :-1].reshape(-1, model.config.get_text_config().hidden_size)
                  for name, fn in (("clean", None), ("spliced", through_sae), ("ablated", torch.zeros_like))}
        targets = ids[:, 1:].reshape(-1)
        for s in range(0, targets.numel(), chunk_tokens):
            sl = slice(s, s + chunk_tokens)
            clean = _logits(model, hidden["clean"][sl])
            sums["ce_clean"] += metrics.token_cross_entropy(clean, targets[sl]).sum().item()
            for name in ("spliced", "ablated"):
                other = _logits(model, hidden[name][sl])
                sums[f"ce_{name}"] += metrics.token_cross_entropy(other, targets[sl]).sum().item()
                sums[f"kl_{name}"] += metrics.token_kl(clean, other).sum().item()
        n += targets.numel()
    mean = {k: v / n for k, v in sums.items()}
    return {"ce_clean": mean["ce_clean"], "ce_spliced": mean["ce_spliced"], "ce_ablated": mean["ce_ablated"],
            "ce_loss_recovered": metrics.ce_loss_recovered(mean["ce_clean"], mean["ce_spliced"], mean["ce_ablated"]),
            "delta_ce": mean["ce_spliced"] - mean["ce_clean"], "kl_spliced": mean["kl_spliced"],
            "kl_ablated": mean["kl_ablated"], "ce_tokens": float(n)}


@torch.no_grad()
def reconstruction_scores(sae: SparseAutoencoder, batches: Iterable[ActivationBatch], *, temperature: float,
                          hard_negatives: int, latents: int | None = None
                          ) -> tuple[dict[str, float], metrics.DensityHistogram]:
    """Exact MSE, EV, NMSE, cosine, L0, L1 and dead fraction over all `batches`, plus the contrastive figures
    over all of them: held-out InfoNCE beside its chance level, and code cosines of positive pairs vs
    other-sequence pairs. Batches should have the training batch size, so that nce reads like the training
    nce (its chance level depends on the number of negatives).

    Within batch b, as in training, anchor i's negatives are the anchors of b from other sequences:
    k_i = #{j in b: seq_j != seq_i}, capped at hard_negatives when it is > 0. V_b = {i in b: k_i > 0}
    (all of b, or none of it when b holds one sequence), L_b = info_nce_loss over b (the mean over V_b of
    the per-anchor loss, at `temperature`, `hard_negatives`, partners = the batch's partners), and

        nce               = sum_b |V_b| L_b / sum_b |V_b|  (the per-anchor loss averaged over every held-out
                                                            anchor with a negative, whatever the batch sizes)
        nce_chance        = sum_b sum_{i in V_b} ln(1 + k_i) / sum_b |V_b|  (nce of codes that carry no
                                                            information: every logit equal)
        code_sim_positive = sum_b |V_b| pos_b / sum_b |V_b|  (mean cos(code_i, partner code_i) over those anchors)
        code_sim_negative = sum_b P_b neg_b / sum_b P_b      (mean cos over every ordered other-sequence pair
                                                            (i, j) of a batch; P_b such pairs in b)

    with pos_b, neg_b = metrics.code_similarity over b. Codes are those of the first `latents` latents (the
    ones the InfoNCE term trains, trainer.nce_latents; all by default)."""
    device = sae.W_dec.device
    stats = metrics.StreamingStats(sae.cfg.d_in, sae.cfg.dict_size)
    cos_sum = nce_sum = chance_sum = pos_sum = neg_sum = 0.0
    n_contrast = n_pairs = 0
    for batch in batches:
        b = batch.to(device)
        out = sae(b.anchors)
        stats.update(b.anchors, out.x_hat, out.z)
        cos_sum += metrics.cosine_similarity(b.anchors, out.x_hat).item() * len(b)
        other = b.seq_id[:, None] != b.seq_id[None, :]
        k = other.sum(dim=1)
        if hard_negatives > 0:
            k = k.clamp(max=hard_negatives)
        n, pairs = int((k > 0).sum()), int(other.sum())
        if n == 0:
            continue  # one sequence: no contrastive task and no other-sequence pair in this batch
        z, z_partner = out.z[:, :latents], sae.encode(b.partners)[:, :latents]
        nce_sum += n * info_nce_loss(z, z_partner, b.seq_id, temperature, hard_negatives).item()
        chance_sum += k.double().log1p().sum().item()
        pos, neg = metrics.code_similarity(z, z_partner, b.seq_id)
        pos_sum += n * pos  # pos is the mean over all of b, and n = len(b) here
        neg_sum += pairs * neg
        n_contrast += n
        n_pairs += pairs
    scores = stats.result()
    if n_contrast == 0:
        raise CscError("no held-out batch has anchors from two sequences: the contrastive figures are undefined")
    scores["cosine_similarity"] = cos_sum / stats.n
    scores["decoder_mean_max_cos"] = metrics.decoder_max_cosine(sae.W_dec)
    scores["nce"] = nce_sum / n_contrast
    scores["nce_chance"] = chance_sum / n_contrast
    scores["code_sim_positive"] = pos_sum / n_contrast
    scores["code_sim_negative"] = neg_sum / n_pairs
    return scores, metrics.feature_density_histogram(stats.fire_counts, stats.n)
