import math

import pytest
import torch

from csc.sae.archs import ARCHITECTURES, build_sae
from csc.sae.archs.relu import ReluConfig
from csc.sae.batch import ActivationBatch
from csc.sae.config import TrainerConfig
from csc.sae.losses import (TERM_NAMES, WEIGHT_NAMES, AuxK, InfoNCE, PrefixReconstruction, Reconstruction, Sparsity,
                            StepInputs,
                            auxk_loss, build_terms, info_nce_loss)
from csc.sae.metrics import mse
from csc.sae.model import ForwardOutput
from tests.conftest import sae_config


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def codes(n, m, seed):
    z = rand(n, m, seed=seed).relu()
    z[:, ::4] = 0
    return z


def ref_info_nce(za, zp, seq, tau, m, columns=None, has_partner=None):
    """Python loops: cosine of each pair, other-sequence negatives among `columns` (default all), optional m
    hardest, anchors without a partner left out."""

    def cos(a, b):
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        if na == 0 or nb == 0:
            return 0.0
        return sum(x * y for x, y in zip(a, b)) / (na * nb)

    za, zp, seq = za.tolist(), zp.tolist(), seq.tolist()
    columns = range(len(za)) if columns is None else columns.tolist()
    losses = []
    for i in range(len(za)):
        negs = [cos(za[i], za[j]) / tau for j in columns if seq[j] != seq[i]]
        if not negs or has_partner is not None and not has_partner[i]:
            continue
        if m:
            negs = sorted(negs, reverse=True)[:m]
        pos = cos(za[i], zp[i]) / tau
        losses.append(math.log(sum(math.exp(v) for v in [pos] + negs)) - pos)
    return sum(losses) / len(losses) if losses else 0.0


SEQ = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])


@pytest.mark.parametrize("tau", [1.0, 0.07])
@pytest.mark.parametrize("m", [0, 1, 3, 8, 50])
def test_info_nce_matches_loop_reference(tau, m):
    za, zp = codes(12, 10, seed=1), codes(12, 10, seed=2)
    za[4] = 0  # an all-zero code: cosine 0, no NaN
    got = info_nce_loss(za, zp, SEQ, tau, m)
    assert got.item() == pytest.approx(ref_info_nce(za, zp, SEQ, tau, m), rel=1e-5)


@pytest.mark.parametrize("m", [0, 2])
@pytest.mark.parametrize("sampled", [False, True])
def test_info_nce_with_partner_rows_and_sampled_negatives_matches_loop_reference(m, sampled):
    za = codes(12, 10, seed=1)
    columns = torch.tensor([7, 0, 3, 11, 5]) if sampled else None
    rows = torch.tensor([1, 2, 0, 4, 3, -1, 7, 8, 9, 6, -1, 10])  # a partner of the same sequence, or none
    got = info_nce_loss(za, None, SEQ, 0.5, m, negatives=columns, partner_index=rows)
    expected = ref_info_nce(za, za[rows.clamp(min=0)], SEQ, 0.5, m, columns, rows >= 0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    zp = codes(12, 10, seed=2)  # partners given as codes, with sampled negatives
    assert info_nce_loss(za, zp, SEQ, 0.5, m, negatives=columns).item() == pytest.approx(
        ref_info_nce(za, zp, SEQ, 0.5, m, columns), rel=1e-5)


def test_the_similaritys_one_matmul_backward_equals_autograds():
    za = codes(12, 10, seed=3).requires_grad_()
    (fast,) = torch.autograd.grad(info_nce_loss(za, codes(12, 10, seed=4), SEQ, 0.3), za)
    a = torch.nn.functional.normalize(za, dim=-1, eps=1e-8)
    p = torch.nn.functional.normalize(codes(12, 10, seed=4), dim=-1, eps=1e-8)
    pos = (a * p).sum(-1) / 0.3
    neg = (a @ a.T / 0.3).masked_fill(SEQ[:, None] == SEQ[None, :], float("-inf"))
    plain = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    (ref,) = torch.autograd.grad(plain, za)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)


def test_in_batch_partners_are_the_batchs_own_codes_and_need_no_encoder():
    sae = build_sae(ReluConfig(d_in=8, dict_size=40, layer_norm=False))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    x = rand(12, 8, seed=1)
    seq = torch.arange(12) // 4
    rows = torch.tensor([1, 2, 3, -1, 5, 4, 7, 6, 9, 8, 11, -1])  # -1: the partner is in no row of the batch
    batch = ActivationBatch(x, None, seq, torch.zeros(12, dtype=torch.long), partner_index=rows)
    out = sae(x)
    value = InfoNCE(TrainerConfig(steps=10), 40)(StepInputs(batch, out, sae, dead=None, encode=None))
    has = rows >= 0
    expected = ref_info_nce(out.z.detach(), out.z.detach()[rows.clamp(min=0)], seq, 1.0, 0, has_partner=has)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(value, out.pre)
    assert grad[3].abs().max() > 0  # an anchor without a partner is still a negative and a partner of others


def test_sampled_negatives_depend_on_the_seed_and_step_only():
    term = InfoNCE(TrainerConfig(steps=10, negatives=4, seed=3), 40)
    first = term.negatives(16, 5, torch.device("cpu"))
    assert len(first) == 4 and len(set(first.tolist())) == 4
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(term.negatives(16, 5, torch.device("cpu")), first)
    assert not torch.equal(term.negatives(16, 6, torch.device("cpu")), first)
    assert term.negatives(4, 5, torch.device("cpu")) is None  # a cap of the whole batch or more is no cap
    assert InfoNCE(TrainerConfig(steps=10), 40).negatives(16, 5, torch.device("cpu")) is None


def test_a_batch_has_partner_activations_or_partner_rows_not_both():
    x, seq, pos = rand(4, 8), torch.arange(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        ActivationBatch(x, x, seq, pos, partner_index=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        ActivationBatch(x, None, seq, pos)


def test_info_nce_masks_same_sequence_codes():
    seq = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    # Each anchor's same-sequence twin has cosine 1 but is masked: the negatives are the two
    # orthogonal codes of the other sequence (cosine 0), so every term is log(e + 2) - 1.
    assert info_nce_loss(a, a, seq, 1.0).item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)


def test_info_nce_hard_negatives_pick_the_most_similar():
    a = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]])
    seq = torch.tensor([0, 1, 2, 3])
    c01 = torch.nn.functional.cosine_similarity(a[0], a[1], dim=0).item()
    c12 = torch.nn.functional.cosine_similarity(a[1], a[2], dim=0).item()
    # Hardest negative of anchor 0 and 1 is each other; of anchor 2 it is anchor 1; of anchor 3
    # all negatives have cosine 0.
    expected = [math.log(math.e + math.exp(c01)) - 1] * 2 + [
        math.log(math.e + math.exp(c12)) - 1, math.log(math.e + 1) - 1]
    got = info_nce_loss(a, a, seq, 1.0, hard_negatives=1)
    assert got.item() == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_info_nce_all_zero_codes_and_no_negatives():
    z = torch.zeros(6, 5, requires_grad=True)
    seq = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = info_nce_loss(z, torch.zeros(6, 5), seq, 1.0)
    assert loss.item() == pytest.approx(math.log(6))  # all cosines 0: log(1 + 5 negatives)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # Anchors without any other-sequence negative are left out of the mean.
    seq2 = torch.tensor([0, 0, 0, 0, 0, 1])
    za, zp = codes(6, 5, seed=5), codes(6, 5, seed=6)
    assert info_nce_loss(za, zp, seq2, 1.0).item() == pytest.approx(
        ref_info_nce(za, zp, seq2, 1.0, 0), rel=1e-6)
    one_seq = info_nce_loss(za.requires_grad_(), zp, torch.zeros(6, dtype=torch.long), 1.0)
    assert one_seq.item() == 0.0
    one_seq.backward()
    assert (za.grad == 0).all()


def test_mse_and_l1_conventions():
    x, x_hat, z = rand(5, 4, seed=7), rand(5, 4, seed=8), codes(5, 6, seed=9)
    # mse per dimension; l1 per token in units of sqrt(d_in) = 2
    assert mse(x, x_hat).item() == pytest.approx(((x - x_hat) ** 2).sum().item() / (5 * 4), rel=1e-6)
    relu = build_sae(ReluConfig(d_in=4, dict_size=6))
    out = ForwardOutput(x=x, pre=z, z=z, x_hat=x_hat)
    assert relu.sparsity_loss(out).item() == pytest.approx(z.abs().sum().item() / 5 / 2, rel=1e-6)
    # The terms compute exactly these.
    inputs = StepInputs(batch=None, out=out, model=relu, dead=None, encode=None)
    cfg = TrainerConfig(steps=10)
    assert torch.equal(Reconstruction(cfg)(inputs), mse(x, x_hat))
    assert torch.equal(Sparsity("l1", cfg)(inputs), relu.sparsity_loss(out))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_build_terms_follows_architecture_and_config(arch, gamma):
    model = build_sae(sae_config(arch, 8, 16, k=3))
    revival = "auxk" if model.supports_auxk else "none"
    terms = build_terms(model, TrainerConfig(steps=10, gamma=gamma, revival=revival))
    expected = [(Reconstruction, "mse", "alpha")]
    if arch == "matryoshka_batchtopk":
        expected.append((PrefixReconstruction, "prefix_mse", "alpha"))
    if model.sparsity_term is not None:
        expected.append((Sparsity, model.sparsity_term, "beta"))
    if gamma > 0:
        expected.append((InfoNCE, "nce", "gamma"))
    if revival == "auxk":
        expected.append((AuxK, "auxk", "auxk_coef"))
    assert [(type(t), t.name, t.weight_name) for t in terms] == expected
    assert all(t.name in TERM_NAMES and t.weight_name in WEIGHT_NAMES for t in terms)
    assert [t.optional for t in terms] == [isinstance(t, InfoNCE) for t in terms]


def test_term_and_weight_names():
    assert TERM_NAMES == ("mse", "prefix_mse", "l1", "l0_penalty", "nce", "auxk")
    assert WEIGHT_NAMES == ("alpha", "beta", "gamma", "auxk_coef")
    assert {a: c.sparsity_term for a, c in ARCHITECTURES.items()} == {
        "relu": "l1", "topk": None, "batchtopk": None, "jumprelu": "l0_penalty", "matryoshka_batchtopk": None}


def test_auxk_matches_loop_and_trains_only_dead_latents():
    n, d, m, k_aux = 8, 5, 7, 2
    x, x_hat = rand(n, d, seed=10), rand(n, d, seed=11)
    pre = rand(n, m, seed=12).requires_grad_()
    w_dec = rand(m, d, seed=13).requires_grad_()
    dead = torch.tensor([True, False, True, True, False, False, True])
    loss = auxk_loss(x, x_hat, pre, w_dec, dead, k_aux)
    e = (x - x_hat).tolist()
    mean = [sum(e[i][j] for i in range(n)) / n for j in range(d)]
    res, tot = 0.0, 0.0
    for i in range(n):
        cand = sorted(((pre[i, j].item(), j) for j in range(m) if dead[j]), reverse=True)[:k_aux]
        e_hat = [sum(max(v, 0.0) * w_dec[j, c].item() for v, j in cand) for c in range(d)]
        res += sum((e[i][c] - e_hat[c]) ** 2 for c in range(d))
        tot += sum((e[i][c] - mean[c]) ** 2 for c in range(d))
    assert loss.item() == pytest.approx(res / tot, rel=1e-5)
    loss.backward()
    assert (w_dec.grad[~dead] == 0).all() and (pre.grad[:, ~dead] == 0).all()
    assert w_dec.grad[dead].abs().sum() > 0
    none_dead = auxk_loss(x, x_hat, pre, w_dec, torch.zeros(m, dtype=torch.bool), k_aux)
    assert none_dead.item() == 0.0


def test_info_nce_on_a_share_of_the_latents_sees_only_those():
    sae = build_sae(ReluConfig(d_in=8, dict_size=40, layer_norm=False))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most codes non-zero, so every latent could carry contrast
    x, partners = rand(12, 8, seed=1), rand(12, 8, seed=2)
    seq = torch.arange(12) // 3
    batch = ActivationBatch(x, partners, seq, torch.zeros(12, dtype=torch.long))
    out = sae(x)
    inputs = StepInputs(batch=batch, out=out, model=sae, dead=None, encode=sae.encode)
    term = InfoNCE(TrainerConfig(steps=10, nce_latents=0.25), 40)
    assert term.latents == 10
    value = term(inputs)
    assert value.item() == pytest.approx(
        info_nce_loss(out.z[:, :10], sae.encode(partners)[:, :10], seq, 1.0).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(value, out.pre)
    assert grad[:, 10:].abs().max() == 0 and grad[:, :10].abs().max() > 0  # the other latents feel nothing
