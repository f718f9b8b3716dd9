"""Splicing an SAE into the LM: CE/KL against transformers' own loss, and the reconstruction scores."""

import math
import threading

import pytest
import torch

from csc.activations.models import build_tiny_gemma2
from csc.config import ModelSpec
from csc.activations.capture import decoder_layers, run_from_layer, thread_hook
from csc.pipeline.evaluate import (_final_hidden, clean_runs, locality_scores, reconstruction_scores,
                                   saebench_sparsity_scores, splice_scores, spliced_scores)
from csc.sae.archs import build_sae
from csc.sae.archs.relu import ReluConfig
from csc.sae.batch import ActivationBatch
from csc.sae.losses import info_nce_loss


SPECIAL = frozenset({0, 1, 2})  # the tiny tokenizer's <pad>, <eos>, <bos>


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny_gemma2(ModelSpec(name="tiny-gemma2"))
    return model.eval()


def _ids(n=5, T=24):
    ids = torch.randint(4, 260, (n, T), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    return ids


def test_chunked_clean_ce_equals_transformers_loss_with_softcapping(tiny):
    assert tiny.config.final_logit_softcapping  # Gemma2 caps logits: the test covers that path
    ids = _ids()
    sae = build_sae(ReluConfig(d_in=64, dict_size=128))
    with torch.no_grad():
        ref = tiny(input_ids=ids, labels=ids).loss.item()
    out = splice_scores(tiny, sae, ids, layer=1, scale=1.0, special_ids=SPECIAL, lm_batch_size=2, chunk_tokens=7)
    assert out["ce_clean"] == pytest.approx(ref, rel=1e-5)
    assert out["ce_tokens"] == ids.shape[0] * (ids.shape[1] - 1)
    assert out["ce_ablated"] != pytest.approx(out["ce_clean"])
    assert out["kl_spliced"] >= 0 and out["kl_ablated"] > 0
    assert out["ce_loss_recovered"] == pytest.approx(
        (out["ce_ablated"] - out["ce_spliced"]) / (out["ce_ablated"] - out["ce_clean"]))
    assert out["delta_ce"] == out["ce_spliced"] - out["ce_clean"] != 0  # nats, signed (a random LM can gain)
    keys = list(out)  # eval.json, trials.csv and the printed table keep the scale beside the ratio
    assert keys[keys.index("ce_loss_recovered"):][:3] == ["ce_loss_recovered", "delta_ce", "kl_spliced"]


def test_replacement_spares_the_kept_positions(tiny):
    ids = _ids(2)
    clean = _final_hidden(tiny, ids, 2)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 0] = True
    assert torch.equal(_final_hidden(tiny, ids, 2, lambda x: x, keep), clean)
    # After the last layer only the final norm runs, token by token: kept positions come out clean, the
    # zeroed ones as the norm of 0, which is 0.
    keep[1, 5] = True
    out = _final_hidden(tiny, ids, tiny.config.num_hidden_layers - 1, torch.zeros_like, keep)
    assert torch.equal(out[keep], clean[keep]) and not out[~keep].any()


def test_a_run_from_layer_l_is_the_full_forward_bit_for_bit(tiny):
    ids = _ids(3)
    resid = {}
    handle = thread_hook(decoder_layers(tiny)[1], lambda _m, _a, out: resid.__setitem__("x", out))
    clean = _final_hidden(tiny, ids, 1)
    handle.remove()
    assert torch.equal(run_from_layer(tiny, ids, 1, resid["x"]), clean)
    keep = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    replaced = torch.where(keep[..., None], resid["x"], resid["x"].flip(-1))
    assert torch.equal(run_from_layer(tiny, ids, 1, replaced), _final_hidden(tiny, ids, 1, lambda x: x.flip(-1), keep))
    assert torch.equal(_final_hidden(tiny, ids, 1), clean), "after it, every layer runs again"


def test_hooks_and_skipped_layers_belong_to_their_thread(tiny):
    """A producer evaluates on one thread while its LM makes shards on another, with the same model: thread A is
    held inside a run from layer 1 with a hook of its own that zeroes layer 2, and thread B's full forward is the
    plain one meanwhile; A's result is what it would have been alone."""
    ids = _ids(2)
    plain = _final_hidden(tiny, ids, 1)
    zeroed = _final_hidden(tiny, ids, 2, torch.zeros_like, torch.zeros_like(ids, dtype=torch.bool))
    inside, go, got = threading.Event(), threading.Event(), {}

    def pause(_m, _a, out):
        inside.set()
        assert go.wait(60)
        return torch.zeros_like(out)

    def thread_a():
        resid = {}
        h = thread_hook(decoder_layers(tiny)[1], lambda _m, _a, out: resid.__setitem__("x", out))
        _final_hidden(tiny, ids, 1)
        h.remove()
        h = thread_hook(decoder_layers(tiny)[2], pause)
        try:
            got["a"] = run_from_layer(tiny, ids, 1, resid["x"])
        finally:
            h.remove()

    a = threading.Thread(target=thread_a)
    a.start()
    assert inside.wait(60)
    got["b"] = _final_hidden(tiny, ids, 1)
    go.set()
    a.join()
    assert torch.equal(got["b"], plain) and torch.equal(got["a"], zeroed)


def test_one_clean_run_serves_every_sae(tiny):
    """What needs no SAE is measured once: each SAE's figures against it are those of its own full measurement."""
    ids = _ids_with_specials()
    clean = clean_runs(tiny, ids, 1, SPECIAL, lm_batch_size=3, chunk_tokens=7)
    assert clean.nbytes > 0
    for seed in (0, 1):
        torch.manual_seed(seed)
        sae = build_sae(ReluConfig(d_in=64, dict_size=128))
        assert spliced_scores(tiny, sae, clean, 0.5, chunk_tokens=7) == splice_scores(
            tiny, sae, ids, 1, 0.5, SPECIAL, lm_batch_size=3, chunk_tokens=7)


def test_kl_and_ce_of_a_perfect_reconstruction(tiny):
    """An SAE whose decoder inverts its encoder exactly (dict = d, identity-like) leaves the LM unchanged."""
    sae = build_sae(ReluConfig(d_in=64, dict_size=128, layer_norm=False))
    with torch.no_grad():  # z = [x, -x]+ and W_dec = [I, -I]/1 reconstructs x exactly
        eye = torch.eye(64)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    out = splice_scores(tiny, sae, _ids(3), layer=1, scale=0.5, special_ids=SPECIAL)
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], abs=1e-4)
    assert out["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert out["delta_ce"] == pytest.approx(0.0, abs=1e-4)
    # SAEBench's names: the same verdict against its own baseline
    assert out["ce_loss_with_sae"] == pytest.approx(out["ce_loss_without_sae"], abs=1e-4)
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert out["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert out["kl_div_score"] == pytest.approx(1.0, abs=1e-5)


def _zero_sae(d: int = 64):
    """x_hat = 0 for every input: the SAE is a zero-ablation."""
    sae = build_sae(ReluConfig(d_in=d, dict_size=2 * d, layer_norm=False))
    with torch.no_grad():
        for t in sae.parameters():
            t.zero_()
    return sae


def _ids_with_specials():
    ids = _ids(4, T=16)
    ids[2, 6] = 1   # an <eos> between two documents
    ids[3, 3] = 1
    ids[3, 10] = 0  # a <pad>
    return ids      # rows 0-1: BOS is the only special token; rows 2-3: not


def test_saebench_scores_of_a_zero_sae_at_the_last_layer_are_zero(tiny):
    """Spliced at the last layer, a zero SAE equals SAEBench's ablation at every token SAEBench counts (only the
    final norm follows, token by token, and both runs put 0 there): ce_loss_score = kl_div_score = 0. Its
    ablation gives uniform logits: CE ln V. csc's ablation keeps BOS, as its spliced run does: recovered 0."""
    out = splice_scores(tiny, _zero_sae(), _ids_with_specials(), layer=tiny.config.num_hidden_layers - 1, scale=1.0,
                        special_ids=SPECIAL, lm_batch_size=2, chunk_tokens=5)
    assert out["ce_loss_score"] == pytest.approx(0.0, abs=1e-9) and out["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert out["ce_loss_with_ablation"] == pytest.approx(math.log(tiny.config.vocab_size), rel=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)


def _reference_logits(model, ids, layer, replaced: torch.Tensor, fn) -> torch.Tensor:
    """transformers' own logits with resid_post(layer) -> fn(resid) at the `replaced` [b, T] positions."""
    def hook(_mod, _args, out):
        resid = out[0] if isinstance(out, tuple) else out
        new = resid.clone()
        new[replaced] = fn(resid[replaced])
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        return model(input_ids=ids).logits.float()
    finally:
        handle.remove()


def test_splice_figures_match_a_direct_reference_with_special_tokens_inside(tiny):
    """csc's figures and SAEBench's, each from its definition: csc replaces every position but BOS and averages
    over every predicted position; SAEBench keeps every special token out of the SAE, zero-ablates all of them
    (BOS too), averages CE over predictions made at non-special tokens and KL over non-special tokens."""
    ids, layer = _ids_with_specials(), 1
    sae = build_sae(ReluConfig(d_in=64, dict_size=128))
    out = splice_scores(tiny, sae, ids, layer=layer, scale=1.0, special_ids=SPECIAL, lm_batch_size=2, chunk_tokens=7)
    special = torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    not_bos = torch.ones_like(special)
    not_bos[:, 0] = False
    with torch.no_grad():
        def recon(x):
            return sae(x).x_hat
        clean = tiny(input_ids=ids).logits.float()
        logits = {"csc_spliced": _reference_logits(tiny, ids, layer, not_bos, recon),
                  "csc_ablated": _reference_logits(tiny, ids, layer, not_bos, torch.zeros_like),
                  "sb_spliced": _reference_logits(tiny, ids, layer, ~special, recon),
                  "sb_ablated": _reference_logits(tiny, ids, layer, torch.ones_like(special), torch.zeros_like)}

    def ce(lg):  # [b, T - 1]
        return torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")

    def kl(lg):  # [b, T]
        p = clean.log_softmax(-1)
        return (p.exp() * (p - lg.log_softmax(-1))).sum(-1)

    at = ~special[:, :-1]  # SAEBench: predictions made at a non-special token
    ref = {"ce_clean": ce(clean).mean(), "ce_spliced": ce(logits["csc_spliced"]).mean(),
           "ce_ablated": ce(logits["csc_ablated"]).mean(), "kl_spliced": kl(logits["csc_spliced"])[:, :-1].mean(),
           "kl_ablated": kl(logits["csc_ablated"])[:, :-1].mean(),
           "ce_loss_without_sae": ce(clean)[at].mean(), "ce_loss_with_sae": ce(logits["sb_spliced"])[at].mean(),
           "ce_loss_with_ablation": ce(logits["sb_ablated"])[at].mean(),
           "kl_div_with_sae": kl(logits["sb_spliced"])[~special].mean(),
           "kl_div_with_ablation": kl(logits["sb_ablated"])[~special].mean()}
    for key, value in ref.items():
        assert out[key] == pytest.approx(value.item(), rel=1e-5), key
    assert out["ce_loss_score"] == (out["ce_loss_with_ablation"] - out["ce_loss_with_sae"]) / (
        out["ce_loss_with_ablation"] - out["ce_loss_without_sae"])
    assert out["kl_div_score"] == (out["kl_div_with_ablation"] - out["kl_div_with_sae"]) / out["kl_div_with_ablation"]
    # The runs differ where they should: SAEBench's ablation also zeroes BOS, its spliced run spares <eos>/<pad>
    assert not torch.allclose(logits["sb_ablated"][:, 1:], logits["csc_ablated"][:, 1:])
    assert torch.allclose(logits["sb_spliced"][:2], logits["csc_spliced"][:2])
    assert not torch.allclose(logits["sb_spliced"][2:], logits["csc_spliced"][2:])


def test_reconstruction_scores_over_batches():
    g = torch.Generator().manual_seed(1)
    batches = [ActivationBatch(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g),
                               torch.arange(32) // 4, torch.full((32,), 5)) for _ in range(3)]
    sae = build_sae(ReluConfig(d_in=16, dict_size=48))
    out, hist = reconstruction_scores(sae, batches, temperature=1.0, hard_negatives=0)
    x = torch.cat([b.anchors for b in batches])
    x_hat, z = sae(x).x_hat, sae(x).z
    assert out["tokens"] == 96
    assert out["explained_variance"] == pytest.approx(
        (1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-5)
    assert out["l0"] == pytest.approx((z != 0).sum(-1).float().mean().item())
    assert int(hist.counts.sum()) + hist.n_never_fired == 48
    assert -1 <= out["code_sim_negative"] <= 1 and -1 <= out["code_sim_positive"] <= 1


def _batch(x: torch.Tensor, partners: torch.Tensor, seq_id: torch.Tensor) -> ActivationBatch:
    return ActivationBatch(x, partners, seq_id, torch.full((len(seq_id),), 5))


def _random_batch(g: torch.Generator, n: int, per_seq: int, first_seq: int = 0, d: int = 16) -> ActivationBatch:
    seq = first_seq + torch.arange(n) // per_seq
    return _batch(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), seq)


def _slow_reference(sae, batches, tau: float, m: int) -> dict[str, float]:
    """The docstring's formulas anchor by anchor, in plain loops over cosines."""
    losses, chances, positives, negatives = [], [], [], []
    cos = torch.nn.functional.cosine_similarity
    for b in batches:
        za, zp = sae.encode(b.anchors), sae.encode(b.partners)
        for i in range(len(b)):
            negs = [cos(za[i], za[j], dim=0, eps=1e-8).item() / tau
                    for j in range(len(b)) if b.seq_id[j] != b.seq_id[i]]
            if not negs:
                continue
            negatives += [t * tau for t in negs]
            negs = sorted(negs, reverse=True)[:m] if m > 0 else negs
            pos = cos(za[i], zp[i], dim=0, eps=1e-8).item()
            positives.append(pos)
            losses.append(math.log(sum(math.exp(v) for v in [pos / tau, *negs])) - pos / tau)
            chances.append(math.log(1 + len(negs)))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"nce": mean(losses), "nce_chance": mean(chances), "code_sim_positive": mean(positives),
            "code_sim_negative": mean(negatives)}


@pytest.mark.parametrize("hard_negatives", [0, 5])
def test_held_out_nce_of_one_batch_is_info_nce_loss(hard_negatives):
    g = torch.Generator().manual_seed(2)
    batch = _random_batch(g, 24, per_seq=3)
    sae = build_sae(ReluConfig(d_in=16, dict_size=48))
    out, _ = reconstruction_scores(sae, [batch], temperature=0.3, hard_negatives=hard_negatives)
    with torch.no_grad():
        ref = info_nce_loss(sae.encode(batch.anchors), sae.encode(batch.partners), batch.seq_id, 0.3, hard_negatives)
    assert out["nce"] == pytest.approx(ref.item(), rel=1e-6)
    assert out["nce_chance"] == pytest.approx(math.log(1 + (hard_negatives or 21)))  # 24 anchors, 3 per sequence
    # trainer.nce_latents < 1: the held-out figures read the latents the term trains, as training does
    part, _ = reconstruction_scores(sae, [batch], temperature=0.3, hard_negatives=hard_negatives, latents=12)
    with torch.no_grad():
        ref = info_nce_loss(sae.encode(batch.anchors)[:, :12], sae.encode(batch.partners)[:, :12], batch.seq_id, 0.3,
                            hard_negatives)
    assert part["nce"] == pytest.approx(ref.item(), rel=1e-6) and part["nce"] != pytest.approx(out["nce"])


@pytest.mark.parametrize("hard_negatives", [0, 4])
def test_held_out_figures_weigh_every_anchor_once_across_unequal_batches(hard_negatives):
    """Two full batches, a partial last one, and one of a single sequence (no negative: left out of the nce and
    positive-pair averages). The held-out figures are per-anchor (per-pair) means, not means of batch means."""
    g = torch.Generator().manual_seed(3)
    batches = [_random_batch(g, 32, 4), _random_batch(g, 32, 8, first_seq=8), _random_batch(g, 5, 2, first_seq=12),
               _random_batch(g, 3, 3, first_seq=20)]
    sae = build_sae(ReluConfig(d_in=16, dict_size=48))
    out, _ = reconstruction_scores(sae, batches, temperature=0.5, hard_negatives=hard_negatives)
    with torch.no_grad():
        ref = _slow_reference(sae, batches, 0.5, hard_negatives)
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, rel=1e-5), key
    with torch.no_grad():
        per_batch = [info_nce_loss(sae.encode(b.anchors), sae.encode(b.partners), b.seq_id, 0.5, hard_negatives).item()
                     for b in batches[:3]]
    assert out["nce"] != pytest.approx(sum(per_batch) / 3, rel=1e-4), "the partial batch must weigh 5, not 32"
    assert out["tokens"] == 72  # reconstruction figures still cover every anchor, the single-sequence batch too


def _contrastive_sae(d: int = 16):
    """z = ReLU(x) with an identity decoder: codes of one-hot inputs are one-hot."""
    sae = build_sae(ReluConfig(d_in=d, dict_size=d, layer_norm=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_perfectly_contrastive_codes_beat_chance_and_random_codes_sit_at_it():
    # Sequence s's anchors and partners all code to e_s: positives cos 1, other sequences cos 0.
    seq = torch.arange(32) // 4
    x = 3.0 * torch.eye(16)[seq]
    tau = 0.1
    out, _ = reconstruction_scores(_contrastive_sae(), [_batch(x, x.clone(), seq)], temperature=tau, hard_negatives=0)
    assert out["nce_chance"] == pytest.approx(math.log(29))
    assert out["nce"] == pytest.approx(math.log(1 + 28 * math.exp(-1 / tau)), rel=1e-4)
    assert out["nce"] < 0.01 * out["nce_chance"]
    assert (out["code_sim_positive"], out["code_sim_negative"]) == (pytest.approx(1.0), pytest.approx(0.0))

    # Codes that say nothing of the sequence: every code along e_0, every logit equal, nce exactly chance.
    same = torch.linspace(1, 2, 32)[:, None] * torch.eye(16)[0]
    for m in (0, 7):
        out, _ = reconstruction_scores(_contrastive_sae(), [_batch(same, same.flip(0), seq)], temperature=tau,
                                       hard_negatives=m)
        assert out["nce"] == pytest.approx(out["nce_chance"], rel=1e-5) and out["nce_chance"] == pytest.approx(
            math.log(1 + (m or 28)))

    # Random codes of random inputs, at tau 1: near chance.
    g = torch.Generator().manual_seed(4)
    batches = [_random_batch(g, 64, 4) for _ in range(4)]
    out, _ = reconstruction_scores(build_sae(ReluConfig(d_in=16, dict_size=64)), batches, temperature=1.0,
                                   hard_negatives=0)
    assert out["nce"] == pytest.approx(out["nce_chance"], abs=0.05)


def test_code_cosines_cover_every_batch():
    """A second, perfectly contrastive batch moves both code cosines: they are not the first batch's."""
    g = torch.Generator().manual_seed(5)
    sae = _contrastive_sae()
    first = _batch(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g), torch.arange(32) // 4)
    seq = 8 + torch.arange(32) // 4
    x = 3.0 * torch.eye(16)[seq - 8]
    second = _batch(x, x.clone(), seq)
    one, _ = reconstruction_scores(sae, [first], temperature=1.0, hard_negatives=0)
    both, _ = reconstruction_scores(sae, [first, second], temperature=1.0, hard_negatives=0)
    assert both["code_sim_positive"] == pytest.approx((one["code_sim_positive"] + 1.0) / 2)  # 32 anchors each
    assert both["code_sim_negative"] == pytest.approx(one["code_sim_negative"] / 2)  # as many pairs, cos 0
    assert both["nce"] < one["nce"]


def test_saebench_sparsity_scores_by_hand():
    """z = ReLU(x), x_hat = z. Batch 1: two contexts, non-special tokens a = [3, 0], b = [0, 3], c = [-3, -3]
    (batch mean 0): EV legacy 1, 1, 0; L0 1, 1, 0; L1 3, 3, 0. Batch 2: one context, [1, 0], [-1, 0]: EV 1, 0;
    L0 1, 0; L1 1, 0. BOS/EOS/PAD carry outliers that would move every figure if they were counted."""
    big = [100.0, 100.0]
    first = (torch.tensor([[big, [3.0, 0.0], big], [big, [0.0, 3.0], [-3.0, -3.0]]]),
             torch.tensor([[2, 7, 1], [2, 8, 9]]))
    second = (torch.tensor([[big, [1.0, 0.0], [-1.0, 0.0], big]]), torch.tensor([[2, 5, 6, 0]]))
    out = saebench_sparsity_scores(_contrastive_sae(2), [first, second], SPECIAL)
    # Every token weighs the same (the mean of the two batches' means would give EV 7/12)
    assert out == {"explained_variance_legacy": pytest.approx(3 / 5), "saebench_l0": pytest.approx(3 / 5),
                   "saebench_l1": pytest.approx(7 / 5)}


def test_locality_scores_of_codes_with_a_known_ratio():
    """z = ReLU(x): latent 0 is on at every anchor of 1 context in 4 (r = 4), latent 1 at every anchor of every
    context (r = 1); the median of {1, 4} is 2.5, the firing-weighted mean (6 * 4 + 24 * 1) / 30 = 1.6."""
    x = torch.zeros(4, 6, 16)
    x[0, :, 0] = 1.0
    x[:, :, 1] = 2.0
    out = locality_scores(_contrastive_sae(), x.split(3))
    assert out == {"context_locality": pytest.approx(2.5), "context_locality_weighted": pytest.approx(1.6)}
