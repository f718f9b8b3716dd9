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

from csc.sae.batch import ActivationBatch
from csc.activations.capture import base_model, decoder_layers
from csc.sae import metrics
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
    """CE clean / spliced / zero-ablated, CE loss recovered and mean KL, over `contexts` [n, T] (BOS first)."""
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
    out = {k: v / n for k, v in sums.items()}
    out["ce_loss_recovered"] = metrics.ce_loss_recovered(out["ce_clean"], out["ce_spliced"], out["ce_ablated"])
    out["ce_tokens"] = float(n)
    return out


@torch.no_grad()
def reconstruction_scores(sae: SparseAutoencoder, batches: Iterable[ActivationBatch],
                          max_code_pairs: int = 1024) -> tuple[dict[str, float], metrics.DensityHistogram]:
    """Exact MSE, EV, NMSE, cosine, L0, L1 and dead fraction over all `batches`, plus disentanglement:
    mean max cosine between decoder rows and code similarity of positive pairs vs other-sequence pairs
    (on the first batch, at most `max_code_pairs` anchors)."""
    device = sae.W_dec.device
    stats = metrics.StreamingStats(sae.cfg.d_in, sae.cfg.dict_size)
    cos_sum, n, first = 0.0, 0, None
    for batch in batches:
        x = batch.anchors.to(device)
        out = sae(x)
        stats.update(x, out.x_hat, out.z)
        cos_sum += metrics.cosine_similarity(x, out.x_hat).item() * x.shape[0]
        n += x.shape[0]
        if first is None:
            first = batch
    out = stats.result()
    out["cosine_similarity"] = cos_sum / n
    out["decoder_mean_max_cos"] = metrics.decoder_max_cosine(sae.W_dec)
    m = min(max_code_pairs, len(first))
    pos, neg = metrics.code_similarity(sae.encode(first.anchors[:m].to(device)),
                                       sae.encode(first.partners[:m].to(device)), first.seq_id[:m].to(device))
    out["code_sim_positive"], out["code_sim_negative"] = pos, neg
    return out, metrics.feature_density_histogram(stats.fire_counts, stats.n)
