"""Evaluate a trained SAE on held-out activations and by splicing it into the LM.

Reconstruction figures (MSE, explained variance, L0, ...) come from `metrics.StreamingStats` over the
held-out batches. Downstream figures splice the SAE into the residual stream after layer L (splice_scores): the
clean run is a full forward whose resid_post(L) is kept; the ablated and spliced runs resume from it, the layers up
to L skipped. What needs no SAE (CleanRuns) is made once per set of contexts.

CE is next-token cross entropy over every predicted position, KL is KL(clean || other) per token. Beside them,
SAEBench's figures under SAEBench's names (`splice_scores`, `saebench_sparsity_scores`). Logits are formed from
the final hidden states `chunk_tokens` rows at a time, so memory stays bounded even with Gemma's 262k vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from csc.activations.capture import base_model, decoder_layers, run_from_layer, thread_hook
from csc.activations.models import LanguageModel
from csc.activations.probe_labels import special_ids
from csc.errors import CscError
from csc.sae import metrics
from csc.sae.batch import ActivationBatch
from csc.sae.locality import ContextLocality
from csc.sae.losses import info_nce_loss
from csc.sae.model import SparseAutoencoder

SAEBENCH_BATCH_PROMPTS = 16
"""Contexts per batch of SAEBench's core evaluation (CoreEvalConfig.batch_size_prompts, and its scripts'):
explained_variance_legacy centres each token on its batch's mean."""


def special_token_ids(lm: LanguageModel) -> frozenset[int]:
    """SAEBench's ignore_tokens (csc.activations.probe_labels.special_ids) of the LM's tokenizer."""
    return special_ids(lm.tokenizer, lm.bos_token_id)


def _final_hidden(model: nn.Module, ids: torch.Tensor, layer: int,
                  replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [b, T, h] of `ids` [b, T] in one full forward; with `replace`, resid_post(layer) becomes
    replace(resid) except at the positions where `keep` [b, T] is True."""
    def hook(_mod, _args, out):
        return torch.where(keep[..., None], out, replace(out))

    handle = thread_hook(decoder_layers(model)[layer], hook) if replace is not None else None
    try:
        return base_model(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()


def _log_probs(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The LM's next-token log-probabilities [n, V] (fp32) from final hidden states h [n, d]."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return (torch.tanh(logits / cap) * cap if cap else logits).log_softmax(dim=-1)


# (figure, run, per-token measure, tokens it is averaged over): csc's over every predicted position, SAEBench's
# over its non-special tokens (splice_scores' docstring). The runs without an SAE are CleanRuns'.
_SPLICE_TERMS = (("ce_clean", "clean", "ce", "csc"), ("ce_spliced", "spliced", "ce", "csc"),
                 ("ce_ablated", "ablated", "ce", "csc"), ("kl_spliced", "spliced", "kl", "csc"),
                 ("kl_ablated", "ablated", "kl", "csc"),
                 ("ce_loss_without_sae", "clean", "ce", "sb_ce"), ("ce_loss_with_sae", "sb_spliced", "ce", "sb_ce"),
                 ("ce_loss_with_ablation", "sb_ablated", "ce", "sb_ce"),
                 ("kl_div_with_sae", "sb_spliced", "kl", "sb_kl"),
                 ("kl_div_with_ablation", "sb_ablated", "kl", "sb_kl"))
_CLEAN_RUNS = ("clean", "ablated", "sb_ablated")
_SAE_RUNS = ("spliced", "sb_spliced")


@dataclass
class _CleanBatch:
    ids: torch.Tensor
    """[b, T] the contexts of one LM batch."""
    resid: torch.Tensor
    """[b, T, d] their clean resid_post(L), in the LM's dtype and on its device."""
    hidden: torch.Tensor
    """[b * T, h] their clean final hidden states."""
    bos: torch.Tensor
    """[b, T] True at position 0 (csc's runs keep it clean)."""
    in_s: torch.Tensor
    """[b, T] True at SAEBench's special tokens (its spliced run keeps them clean)."""
    masks: dict[str, torch.Tensor]
    """Which of the b * T per-token terms each mean counts (1.0 or 0.0): "csc", "sb_ce", "sb_kl"."""


@dataclass
class CleanRuns:
    """What splice_scores needs that no SAE changes, for one set of contexts: the clean run's resid_post(L) and
    final hidden states of each LM batch, and the sums and token counts of every figure without an SAE (clean CE
    and both ablations' CE and KL). A sweep makes it once and measures each trial's SAE against it
    (`spliced_scores`): per SAE, one run from layer L + 1 on and two unembeddings per token instead of four full
    forwards and four unembeddings."""
    layer: int
    batches: list[_CleanBatch]
    sums: dict[str, float]
    counts: dict[str, int]

    @property
    def nbytes(self) -> int:
        """The memory its tensors hold."""
        return sum(t.numel() * t.element_size() for b in self.batches
                   for t in (b.ids, b.resid, b.hidden, b.bos, b.in_s, *b.masks.values()))


def _per_token(model: nn.Module, hidden: dict[str, torch.Tensor], targets: torch.Tensor,
               chunk_tokens: int) -> Iterable[tuple[slice, dict[str, dict[str, torch.Tensor]]]]:
    """Per chunk of `chunk_tokens` tokens: {run: {"ce": CE [n], and but for "clean" "kl": KL(clean || run) [n]}}
    over the final hidden states [N, h] of each run in `hidden` ("clean" among them)."""
    for s in range(0, targets.numel(), chunk_tokens):
        sl = slice(s, s + chunk_tokens)
        clean = _log_probs(model, hidden["clean"][sl])
        per_run = {"clean": {"ce": metrics.token_cross_entropy(clean, targets[sl])}}
        for name, h in hidden.items():
            if name != "clean":
                other = _log_probs(model, h[sl])
                per_run[name] = {"ce": metrics.token_cross_entropy(other, targets[sl]),
                                 "kl": metrics.token_kl(clean, other)}
        yield sl, per_run


def _add(sums: dict[str, float], model: nn.Module, b: _CleanBatch, hidden: dict[str, torch.Tensor],
         runs: Collection[str], chunk_tokens: int) -> None:
    """Add batch b's per-token terms of `runs` to `sums`, from the final hidden states of its runs ("clean" among
    them; SAEBench's spliced run is csc's where it is not given)."""
    for sl, per_run in _per_token(model, hidden, _targets(b.ids), chunk_tokens):
        if "spliced" in per_run:
            per_run.setdefault("sb_spliced", per_run["spliced"])
        for key, run, kind, tokens in _SPLICE_TERMS:
            if run in runs:
                sums[key] += (per_run[run][kind] * b.masks[tokens][sl]).sum().item()


def _count(counts: dict[str, int], b: _CleanBatch) -> None:
    for k, m in b.masks.items():
        counts[k] += int(m.sum().item())


def _targets(ids: torch.Tensor) -> torch.Tensor:
    return ids.roll(-1, dims=1).reshape(-1)  # ids[t + 1]; the last column is masked out


def _clean_batch(model: nn.Module, ids: torch.Tensor, layer: int, special: torch.Tensor
                 ) -> tuple[_CleanBatch, dict[str, torch.Tensor]]:
    """One LM batch's runs without an SAE: the clean forward (its resid_post(L) kept) and both ablations from layer
    L + 1 on; the batch, and the final hidden states [b * T, h] of the three runs."""
    store: dict[str, torch.Tensor] = {}
    handle = thread_hook(decoder_layers(model)[layer], lambda _m, _a, out: store.__setitem__("resid", out))
    try:
        clean = _final_hidden(model, ids, layer)
    finally:
        handle.remove()
    resid = store["resid"]
    if not isinstance(resid, torch.Tensor):
        raise CscError(f"decoder layer {layer} returned {type(resid).__name__}, not a tensor: csc's evaluation "
                       f"needs transformers 5's decoder layers")
    bos = torch.zeros_like(ids, dtype=torch.bool)
    bos[:, 0] = True
    in_s = torch.isin(ids, special)
    predicts = torch.ones_like(bos)
    predicts[:, -1] = False  # the last token has no next token
    masks = {k: m.reshape(-1).float() for k, m in {"csc": predicts, "sb_ce": predicts & ~in_s, "sb_kl": ~in_s}.items()}
    zeros = torch.zeros_like(resid)
    ablated = {"ablated": torch.where(bos[..., None], resid, zeros), "sb_ablated": zeros}
    hidden = {"clean": clean, **{name: run_from_layer(model, ids, layer, x) for name, x in ablated.items()}}
    hidden = {name: h.reshape(-1, h.shape[-1]) for name, h in hidden.items()}
    return _CleanBatch(ids, resid, hidden["clean"], bos, in_s, masks), hidden


def _spliced_hidden(model: nn.Module, sae: SparseAutoencoder, b: _CleanBatch, layer: int,
                    scale: float) -> dict[str, torch.Tensor]:
    """The final hidden states [b * T, h] of batch b's runs with `sae` spliced in, from layer L + 1 on: "spliced",
    and "sb_spliced" where SAEBench's special tokens are more than BOS."""
    device, dtype = b.resid.device, b.resid.dtype
    x = b.resid
    x_hat = (sae(x.reshape(-1, x.shape[-1]).to(sae.W_dec.device, torch.float32) * scale).x_hat / scale
             ).to(device, dtype).reshape(x.shape)
    keep = {"spliced": b.bos}
    if not torch.equal(b.in_s, b.bos):  # else SAEBench's spliced run is csc's: one LM pass fewer
        keep["sb_spliced"] = b.in_s
    return {name: run_from_layer(model, b.ids, layer, torch.where(k[..., None], x, x_hat)).reshape(b.hidden.shape)
            for name, k in keep.items()}


@torch.inference_mode()
def clean_runs(model: nn.Module, contexts: torch.Tensor, layer: int, special_ids: Collection[int],
               lm_batch_size: int = 8, chunk_tokens: int = 128) -> CleanRuns:
    """The runs without an SAE over `contexts` [n, T] (BOS first), `lm_batch_size` contexts per LM batch
    (splice_scores' docstring), kept for `spliced_scores`."""
    special = torch.tensor(sorted(special_ids), device=next(model.parameters()).device)
    batches, sums = [], {key: 0.0 for key, run, *_ in _SPLICE_TERMS if run in _CLEAN_RUNS}
    counts = {"csc": 0, "sb_ce": 0, "sb_kl": 0}
    for ids in contexts.split(lm_batch_size):
        b, hidden = _clean_batch(model, ids.to(special.device), layer, special)
        _add(sums, model, b, hidden, _CLEAN_RUNS, chunk_tokens)
        _count(counts, b)
        batches.append(b)
    return CleanRuns(layer, batches, sums, counts)


@torch.inference_mode()
def spliced_scores(model: nn.Module, sae: SparseAutoencoder, clean: CleanRuns, scale: float,
                   chunk_tokens: int = 128) -> dict[str, float]:
    """splice_scores' figures for `sae` over the contexts of `clean`, bit for bit: each spliced run resumes from the
    clean resid_post(L) (csc.activations.capture.run_from_layer), which gives what a full forward gives."""
    sums = {**clean.sums, **{key: 0.0 for key, run, *_ in _SPLICE_TERMS if run not in _CLEAN_RUNS}}
    for b in clean.batches:
        hidden = {"clean": b.hidden, **_spliced_hidden(model, sae, b, clean.layer, scale)}
        _add(sums, model, b, hidden, _SAE_RUNS, chunk_tokens)
    return _figures(sums, clean.counts)


def _figures(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    mean = {key: sums[key] / counts[tokens] for key, _, _, tokens in _SPLICE_TERMS}
    return {"ce_clean": mean["ce_clean"], "ce_spliced": mean["ce_spliced"], "ce_ablated": mean["ce_ablated"],
            "ce_loss_recovered": metrics.ce_loss_recovered(mean["ce_clean"], mean["ce_spliced"], mean["ce_ablated"]),
            "delta_ce": mean["ce_spliced"] - mean["ce_clean"], "kl_spliced": mean["kl_spliced"],
            "kl_ablated": mean["kl_ablated"], "ce_tokens": float(counts["csc"]),
            "ce_loss_score": metrics.ce_loss_recovered(mean["ce_loss_without_sae"], mean["ce_loss_with_sae"],
                                                       mean["ce_loss_with_ablation"]),
            "ce_loss_with_sae": mean["ce_loss_with_sae"], "ce_loss_without_sae": mean["ce_loss_without_sae"],
            "ce_loss_with_ablation": mean["ce_loss_with_ablation"],
            "kl_div_score": metrics.kl_div_score(mean["kl_div_with_sae"], mean["kl_div_with_ablation"]),
            "kl_div_with_sae": mean["kl_div_with_sae"], "kl_div_with_ablation": mean["kl_div_with_ablation"]}


@torch.inference_mode()
def splice_scores(model: nn.Module, sae: SparseAutoencoder, contexts: torch.Tensor, layer: int, scale: float,
                  special_ids: Collection[int], lm_batch_size: int = 8, chunk_tokens: int = 128) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered, delta CE = CE_spliced - CE_clean (nats) and mean
    KL(clean || spliced / ablated), over `contexts` [n, T] (BOS first) and every predicted position (t < T - 1):

        clean    the model as it is
        spliced  resid_post(L) -> decode(encode(x * scale)) / scale at every position but BOS (the SAE never
                 trains on BOS)
        ablated  resid_post(L) -> 0 at every position but BOS

    The keys come in that order, delta CE and KL right after CE loss recovered: a ratio alone hides its scale
    ("0.89 recovered" can be +1.8 nats).

    Then SAEBench 0.6.0's figures (evals/core/main.py: get_recons_loss and get_downstream_reconstruction_metrics,
    as its scripts run them: exclude_special_tokens_from_reconstruction, ignore_tokens = `special_ids`, SAEBench's
    BOS, EOS and PAD). S = positions whose token is in `special_ids`:

        SAEBench spliced  the SAE at every position not in S (csc's spliced run when BOS is the only special token)
        SAEBench ablated  resid_post(L) -> 0 at every position, BOS included (csc's ablation keeps BOS)
        ce_loss_without_sae / ce_loss_with_sae / ce_loss_with_ablation
                          mean CE, clean / SAEBench spliced / SAEBench ablated, of the predictions made at the
                          positions t < T - 1 not in S (SAEBench drops the predictions made AT a special token)
        kl_div_with_sae / kl_div_with_ablation
                          mean KL(clean || SAEBench spliced / ablated) over every position not in S, the last included
        ce_loss_score     (ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - ce_loss_without_sae)
        kl_div_score      (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation

    Every mean is over tokens pooled across all contexts, as SAEBench's torch.cat(...).mean() over its batches.

    One SAE alone: every run of a batch, the clean run's log-probabilities formed once for all of them. A sweep
    measures each SAE against runs without an SAE made once (clean_runs, then spliced_scores): the same figures."""
    special = torch.tensor(sorted(special_ids), device=next(model.parameters()).device)
    sums = {key: 0.0 for key, *_ in _SPLICE_TERMS}
    counts = {"csc": 0, "sb_ce": 0, "sb_kl": 0}
    for ids in contexts.split(lm_batch_size):
        b, hidden = _clean_batch(model, ids.to(special.device), layer, special)
        hidden.update(_spliced_hidden(model, sae, b, layer, scale))
        _add(sums, model, b, hidden, _CLEAN_RUNS + _SAE_RUNS, chunk_tokens)
        _count(counts, b)
    return _figures(sums, counts)


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
    scores["nce"] = nce_sum / n_contrast
    scores["nce_chance"] = chance_sum / n_contrast
    scores["code_sim_positive"] = pos_sum / n_contrast
    scores["code_sim_negative"] = neg_sum / n_pairs
    return scores, metrics.feature_density_histogram(stats.fire_counts, stats.n)


@torch.no_grad()
def saebench_sparsity_scores(sae: SparseAutoencoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                             special_ids: Collection[int]) -> dict[str, float]:
    """SAEBench 0.6.0's sparsity and legacy variance figures (evals/core/main.py: get_sparsity_and_variance_metrics,
    ignore_tokens = `special_ids`) over `batches` of whole contexts: (x [n, T, d] scaled activations, tokens [n, T]),
    SAEBench's batches of SAEBENCH_BATCH_PROMPTS contexts. Over the tokens i not in `special_ids`, every one
    weighing the same whatever its batch:

        saebench_l0               = mean_i #{j: z_ij != 0}
        saebench_l1               = mean_i sum_j z_ij          (SAEBench's plain sum; csc's l1 divides by sqrt(d))
        explained_variance_legacy = mean_i 1 - ||x_i - x_hat_i||^2 / ||x_i - mean_B(x)||^2,  B = the tokens not in
                                    `special_ids` of i's batch (metrics.explained_variance_legacy)

    Codes are csc's on scaled activations, which are the export's codes on raw ones (csc.sae.export), and both
    ratios are scale-free. SAEBench samples n_eval_sparsity_variance_batches batches; this reads every one given."""
    device = sae.W_dec.device
    special = torch.tensor(sorted(special_ids))
    n, l0, l1, ev = 0, 0.0, 0.0, 0.0
    for x, tokens in batches:
        x = x[~torch.isin(tokens, special)].to(device)
        out = sae(x)
        n += x.shape[0]
        l0 += (out.z != 0).sum().item()
        l1 += out.z.double().sum().item()
        ev += metrics.explained_variance_legacy(x.double(), out.x_hat.double()).sum().item()
    if n == 0:
        raise CscError("no held-out token outside BOS/EOS/PAD: SAEBench's figures are undefined")
    return {"explained_variance_legacy": ev / n, "saebench_l0": l0 / n, "saebench_l1": l1 / n}


@torch.no_grad()
def locality_scores(sae: SparseAutoencoder, contexts: Iterable[torch.Tensor]) -> dict[str, float]:
    """Context locality (csc.sae.locality: context_locality, context_locality_weighted) of the codes of `contexts`,
    batches [n, T, d] of whole contexts' scaled activations, tokens in order."""
    loc = ContextLocality(sae.cfg.dict_size)
    for x in contexts:
        n, T, d = x.shape
        loc.update(sae.encode(x.reshape(-1, d).to(sae.W_dec.device)).reshape(n, T, -1))
    return loc.result()
