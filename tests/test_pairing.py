"""Positive-pair rules (csc/activations/pairing.py) against slow pure-Python references, and every rule's
partners in every shard of one cache shared by all rules."""

import math

import pytest
import torch

from csc.activations.capture import run_to_layer
from csc.activations.pairing import (FIRST_ANCHOR, RULES, all_partners, attended_partners, previous_partners,
                                     random_partners, shard_seed, similar_attention_partners, tensor_name)
from csc.activations.source import Activations, shard_batches
from tests.conftest import tiny_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two contexts of 6 tokens, rows = queries, columns = keys (BOS is key 0), each row causal and summing to 1.
HAND = torch.tensor([
    [[1, 0, 0, 0, 0, 0],
     [.5, .5, 0, 0, 0, 0],
     [.9, .02, .08, 0, 0, 0],   # without BOS: (.2, .8) on keys 1, 2 - like row 3, whose match comes after it
     [0, .2, .7, .1, 0, 0],
     [.5, 0, 0, .25, .25, 0],
     [.9, .1, 0, 0, 0, 0]],     # without BOS: all on key 1, exactly row 1
    [[1, 0, 0, 0, 0, 0],
     [1, 0, 0, 0, 0, 0],        # all on BOS: cosine 0 with every row
     [.2, .4, .4, 0, 0, 0],
     [.1, .3, .3, .3, 0, 0],    # attended: keys 1 and 2 tie (self excluded): the lower wins
     [1, 0, 0, 0, 0, 0],        # all on BOS: every candidate ties at 0, the lowest (1) wins
     [.2, 0, 0, .1, .1, .6]],   # attended: keys 3 and 4 tie (self, .6, excluded)
])
HAND_EXPECTED = {
    "similar_attention": [[-1, -1, 3, 2, 3, 1], [-1, -1, 3, 2, 1, 3]],
    "attended": [[-1, -1, 1, 2, 3, 1], [-1, -1, 1, 1, 1, 3]],
    "previous": [[-1, -1, 1, 2, 3, 4], [-1, -1, 1, 2, 3, 4]],
}


# ---------------------------------------------------------------------- slow references (loops, no torch)

def ref_attended(rows: list[list[float]]) -> list[int]:
    out = [-1] * len(rows)
    for t in range(FIRST_ANCHOR, len(rows)):
        best = 1
        for j in range(1, t):
            if rows[t][j] > rows[t][best]:
                best = j
        out[t] = best
    return out


def ref_key_rows(rows: list[list[float]]) -> list[list[float]]:
    """Each row without its BOS entry, renormalised (zeros stay zeros)."""
    out = []
    for row in rows:
        total = sum(row[1:])
        out.append([0.0] + [v / total if total > 0 else 0.0 for v in row[1:]])
    return out


def ref_cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


def ref_similarities(rows: list[list[float]]) -> list[list[float]]:
    q = ref_key_rows(rows)
    return [[ref_cos(q[t], q[j]) for j in range(len(rows))] for t in range(len(rows))]


def ref_similar(rows: list[list[float]]) -> list[int]:
    sim = ref_similarities(rows)
    out = [-1] * len(rows)
    for t in range(FIRST_ANCHOR, len(rows)):
        cands = [j for j in range(1, len(rows)) if j != t]
        best = cands[0]
        for j in cands:
            if sim[t][j] > sim[t][best]:
                best = j
        out[t] = best
    return out


def ref_previous(T: int) -> list[int]:
    return [-1] * FIRST_ANCHOR + list(range(FIRST_ANCHOR - 1, T - 1))


def causal_attention(B: int, T: int, seed: int, bos_bias: float = 2.0) -> torch.Tensor:
    """Random softmax attention with a causal mask and extra weight on BOS (as LMs have)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, T, T, generator=g) * 2
    scores[..., 0] += bos_bias
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


# ---------------------------------------------------------------------- the rules on a known pattern

def test_hand_built_pattern_gives_the_known_partners_and_the_references_agree():
    rows = HAND.tolist()
    got = {"similar_attention": similar_attention_partners(HAND), "attended": attended_partners(HAND),
           "previous": previous_partners(2, 6)}
    for rule, expected in HAND_EXPECTED.items():
        assert got[rule].tolist() == expected, rule
    assert [ref_similar(r) for r in rows] == HAND_EXPECTED["similar_attention"]
    assert [ref_attended(r) for r in rows] == HAND_EXPECTED["attended"]
    assert [ref_previous(6)] * 2 == HAND_EXPECTED["previous"]


def test_similar_attention_leaves_bos_out():
    """With BOS kept in the rows, row 2 (90% on BOS) would match the other BOS-heavy rows (4, 5), not row 3."""
    with_bos = torch.nn.functional.normalize(HAND[0], dim=-1)
    assert (with_bos[2] @ with_bos.T)[[4, 5]].min() > (with_bos[2] @ with_bos[3]) + 0.5
    assert similar_attention_partners(HAND)[0, 2] == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rules_match_the_references_on_random_attention(seed):
    attn = causal_attention(3, 17, seed)
    sim_got, att_got = similar_attention_partners(attn), attended_partners(attn)
    for b, rows in enumerate(attn.tolist()):
        assert att_got[b].tolist() == ref_attended(rows), b
        sims, ref = ref_similarities(rows), ref_similar(rows)
        for t in range(FIRST_ANCHOR, len(rows)):
            j = int(sim_got[b, t])
            assert j >= 1 and j != t, (b, t)
            # The same choice, or one the reference scores equal to the float rounding (a near-tie).
            assert j == ref[t] or sims[t][j] == pytest.approx(sims[t][ref[t]], abs=1e-6), (b, t)
    assert (sim_got[:, FIRST_ANCHOR:] > torch.arange(FIRST_ANCHOR, 17)).any(), "j after t is a legitimate partner"


def test_every_rule_has_the_same_anchors_and_never_pairs_a_token_with_itself_or_bos():
    attn = causal_attention(4, 12, seed=5)
    found = all_partners(attn, seed=7)
    assert tuple(found) == RULES
    t = torch.arange(12)
    for rule, p in found.items():
        assert p.shape == (4, 12) and p.dtype == torch.int64, rule
        assert (p[:, :FIRST_ANCHOR] == -1).all(), rule
        tail = p[:, FIRST_ANCHOR:]
        assert ((tail >= 1) & (tail < 12) & (tail != t[FIRST_ANCHOR:])).all(), rule
    assert (found["attended"][:, FIRST_ANCHOR:] < t[FIRST_ANCHOR:]).all()  # causal


def test_random_is_deterministic_per_seed_and_uniform_over_the_other_non_bos_positions():
    a, b = random_partners(50, 9, seed=11), random_partners(50, 9, seed=11)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_partners(50, 9, seed=12))
    seeds = {shard_seed(split, i) for split in ("train", "eval") for i in range(20)}
    assert len(seeds) == 40 and shard_seed("train", 3) == shard_seed("train", 3)
    n, T, t = 3000, 8, 4
    draws = random_partners(n, T, seed=0)
    counts = torch.bincount(draws[:, t], minlength=T).tolist()
    assert counts[0] == 0 and counts[t] == 0
    expected = n / (T - 2)  # candidates 1..7 without 4; sd about 20
    assert all(abs(counts[j] - expected) < 100 for j in range(1, T) if j != t), counts
    assert (draws[:, FIRST_ANCHOR:] != torch.arange(FIRST_ANCHOR, T)).all()
    assert (draws[:, :FIRST_ANCHOR] == -1).all()


# ---------------------------------------------------------------------- every shard holds every rule

def test_shards_of_a_real_model_hold_every_rule_as_the_rules_compute_it(cache):
    spec = tiny_spec(cache)
    acts = Activations(spec)
    a = spec.activations
    for split in ("train", "eval"):
        for i in range(acts.n_shards[split]):
            sh = acts.shard(split, i)
            stored = acts.caches[split].load(i)
            assert {tensor_name(r) for r in RULES} <= stored.keys()
            assert "partner" not in stored
            attn = torch.cat([run_to_layer(acts.lm.model, c, a.layer).attn for c in sh.tokens.split(a.lm_batch_size)])
            n, T = sh.tokens.shape
            assert torch.equal(sh.partners["attended"], attended_partners(attn))
            assert torch.equal(sh.partners["similar_attention"], similar_attention_partners(attn))
            assert torch.equal(sh.partners["previous"], previous_partners(n, T))
            assert torch.equal(sh.partners["random"], random_partners(n, T, shard_seed(split, i)))
    train0 = acts.shard("train", 0).partners["random"]
    assert not torch.equal(train0, acts.shard("train", 1).partners["random"])
    assert not torch.equal(train0, acts.shard("eval", 0).partners["random"])


def test_the_pairing_rule_is_not_part_of_the_cache_and_a_rebuilt_cache_holds_the_same_pairs(cache, tmp_path):
    first = Activations(tiny_spec(cache))
    made = first.shard("train", 0)
    for rule in RULES:
        other = Activations(tiny_spec(cache, f"activations.pairing={rule}"))
        assert other.caches["train"].dir == first.caches["train"].dir, rule
        assert torch.equal(other.shard("train", 0).partners[rule], made.partners[rule])
        assert other.lm_shards_computed == 0, rule
    rebuilt = Activations(tiny_spec(tmp_path / "elsewhere"))
    again = rebuilt.shard("train", 0)
    assert rebuilt.lm_shards_computed == 1
    for rule in RULES:
        assert torch.equal(again.partners[rule], made.partners[rule]), rule


@pytest.mark.parametrize("damage", ["drop_rule", "old_layout", "anchor_without_partner"])
def test_a_shard_without_a_rules_partners_is_regenerated_not_misread(cache, damage, capsys):
    spec = tiny_spec(cache, "activations.pairing=random")
    original = Activations(spec).shard("train", 0)
    store = Activations(spec).caches["train"]
    tensors = dict(store.load(0))
    if damage == "drop_rule":
        del tensors["partner_random"]
    elif damage == "old_layout":  # format 1: one `partner` tensor
        tensors = {k: v for k, v in tensors.items() if not k.startswith("partner_")}
        tensors["partner"] = original.partners["attended"].to(torch.int32)
    else:
        tensors["partner_random"] = tensors["partner_random"].clone()
        tensors["partner_random"][0, 5] = -1
    store.store(0, tensors)  # a valid checksum: only the layout is wrong
    fresh = Activations(spec)
    sh = fresh.shard("train", 0)
    assert fresh.lm_shards_computed == 1
    assert "regenerating" in capsys.readouterr().out
    for rule in RULES:
        assert torch.equal(sh.partners[rule], original.partners[rule]), rule
    assert Activations(spec).shard("train", 0) is not None and tensor_name("random") in store.load(0)


def test_batches_of_every_rule_have_the_same_anchors_and_their_own_partners(cache):
    spec = tiny_spec(cache)
    acts = Activations(spec)
    shards = [acts.shard("train", i) for i in range(2)]
    S = spec.activations.contexts_per_shard
    runs = {rule: list(Activations(tiny_spec(cache, f"activations.pairing={rule}")).batches("train", 48, seed=1))
            for rule in RULES}
    ref = runs[RULES[0]]
    for rule, batches in runs.items():
        assert len(batches) == len(ref) == 2 * S * 30 // 48
        for got, base in zip(batches, ref):
            assert torch.equal(got.anchors, base.anchors) and torch.equal(got.seq_id, base.seq_id)
            assert torch.equal(got.position, base.position)
            for k in range(len(got)):
                row, pos = int(got.seq_id[k]), int(got.position[k])
                sh = shards[row // S]
                par = int(sh.partners[rule][row % S, pos])
                assert torch.equal(got.partners[k], sh.acts[row % S, par].float() * acts.scale)
    assert not torch.equal(runs["previous"][0].partners, runs["similar_attention"][0].partners)


@pytest.mark.parametrize("window", [1, 2])
def test_context_batches_hold_every_anchor_once_with_its_partners_row(cache, window):
    S, T = 8, 32
    acts = {rule: Activations(tiny_spec(cache, f"activations.pairing={rule}")) for rule in RULES}
    shards = [acts["previous"].shard("train", i) for i in range(2)]
    runs = {rule: list(shard_batches(a, "train", 48, seed=1, drop_last=False, batching="contexts", window=window))
            for rule, a in acts.items()}
    ref = runs["previous"]
    seen = [(int(s), int(p)) for b in ref for s, p in zip(b.seq_id, b.position)]
    assert sorted(seen) == [(s, p) for s in range(2 * S) for p in range(FIRST_ANCHOR, T)]  # each anchor once
    for rule, batches in runs.items():
        found = 0
        for got, base in zip(batches, ref):
            assert got.partners is None
            assert torch.equal(got.anchors, base.anchors) and torch.equal(got.seq_id, base.seq_id)  # same anchors
            where = {(int(s), int(p)): k for k, (s, p) in enumerate(zip(got.seq_id, got.position))}
            for k in range(len(got)):
                s, pos = int(got.seq_id[k]), int(got.position[k])
                sh = shards[s // S]
                assert torch.equal(got.anchors[k], sh.acts[s % S, pos].float() * acts[rule].scale)
                q = int(sh.partners[rule][s % S, pos])
                assert int(got.partner_index[k]) == where.get((s, q), -1)  # its partner's row, or -1 if not here
                found += int(got.partner_index[k] >= 0)
        assert found > len(seen) / 2, rule  # not vacuous: most partners are in their anchor's batch
    # the contexts follow each other whole: a batch holds about 48 / 30 of them
    assert max(len(set(b.seq_id.tolist())) for b in ref) <= 3
    assert list(shard_batches(acts["previous"], "train", 48, seed=1, drop_last=False, batching="contexts",
                              window=window))[0].seq_id.tolist() == ref[0].seq_id.tolist()  # seeded
    assert list(shard_batches(acts["previous"], "train", 48, seed=2, drop_last=False, batching="contexts",
                              window=window))[0].seq_id.tolist() != ref[0].seq_id.tolist()


def test_a_window_of_shards_is_shuffled_together(cache):
    acts = Activations(tiny_spec(cache))
    S = 8
    for batching in ("tokens", "contexts"):
        one = list(shard_batches(acts, "train", 48, seed=1, batching=batching, window=1))
        two = list(shard_batches(acts, "train", 48, seed=1, batching=batching, window=2))
        assert len(one) == len(two)
        assert all((b.seq_id < S).all() or (b.seq_id >= S).all() for b in one[:2])  # within one shard
        assert (two[0].seq_id >= S).any() or (two[1].seq_id >= S).any()  # the first batches reach the second shard
