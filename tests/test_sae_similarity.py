"""csc.sae.similarity: the cosine similarities InfoNCE uses, against autograd on the plain formulas
(F.normalize, then a matmul or a row-wise product) and against finite differences (gradcheck)."""

import pytest
import torch
import torch.nn.functional as F

from csc.sae.metrics import COS_EPS
from csc.sae.similarity import CosineColumns, CosineGram, RowCosine


def codes(n, m, seed, dtype=torch.float32):
    z = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype).relu()
    z[3] = 0  # an all-zero code (a token no latent fires on): cosine 0, no NaN, no gradient through its norm
    return z


def unit(z):
    return F.normalize(z, dim=-1, eps=COS_EPS)


COLS = torch.tensor([5, 0, 3, 9, 2])
CASES = {
    "gram": (lambda z, w: CosineGram.apply(z), lambda z, w: unit(z) @ unit(z).T),
    "columns": (lambda z, w: CosineColumns.apply(z, COLS), lambda z, w: unit(z) @ unit(z)[COLS].T),
    "rows": (lambda z, w: RowCosine.apply(z, w), lambda z, w: (unit(z) * unit(w)).sum(-1)),
    "rows of itself": (lambda z, w: RowCosine.apply(z, z[COLS.repeat(2)]),
                       lambda z, w: (unit(z) * unit(z[COLS.repeat(2)])).sum(-1)),
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_autograds_on_the_plain_formula(case):
    fast, plain = CASES[case]
    z, w = codes(10, 7, seed=1), codes(10, 7, seed=2)
    weights = torch.randn(fast(z, w).shape, generator=torch.Generator().manual_seed(3))
    got, want = [], []
    for fn, out in ((fast, got), (plain, want)):
        zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
        value = fn(zz, ww)
        out.append(value.detach())
        out.extend(torch.autograd.grad((value * weights).sum(), [zz, ww], allow_unused=True))
    for g, e in zip(got, want):
        if e is None:
            assert g is None or (g == 0).all()
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    if case != "rows of itself":
        assert (got[0][3] == 0).all(), "the all-zero code's cosines are 0"


@pytest.mark.parametrize("case", CASES)
def test_gradients_pass_gradcheck(case):
    fast, _ = CASES[case]
    z, w = torch.randn(10, 7, dtype=torch.float64), torch.randn(10, 7, dtype=torch.float64)  # no zero row
    assert torch.autograd.gradcheck(fast, (z.requires_grad_(), w.requires_grad_()))


def test_a_partner_that_needs_no_gradient_gets_none():
    z, w = codes(6, 5, seed=4).requires_grad_(), codes(6, 5, seed=5)
    RowCosine.apply(z, w).sum().backward()
    assert z.grad is not None and w.grad is None
