import pytest
import torch

from csc.sae.optim import ConstrainedAdam


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rows_stay_unit_norm_over_500_steps():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=gen)
    w = torch.nn.Parameter(w / w.norm(dim=-1, keepdim=True))
    other = torch.nn.Parameter(torch.randn(32, generator=gen))
    opt = ConstrainedAdam([w, other], [w], lr=1e-2)
    start = w.detach().clone()
    for _ in range(500):
        x = torch.randn(128, 64, generator=gen)
        target = torch.randn(128, 32, generator=gen) * 3
        loss = ((x @ w + other - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (w.norm(dim=-1) - 1).abs().max().item() < 1e-5
    assert (w.detach() - start).abs().max().item() > 0.1  # it did move


def test_radial_part_of_the_gradient_is_ignored():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(8, 5, generator=gen)
    w0 /= w0.norm(dim=-1, keepdim=True)
    g = torch.randn(8, 5, generator=gen)
    tangent = g - (g * w0).sum(-1, keepdim=True) * w0

    def one_step(grad, opt_cls, **kw):
        w = torch.nn.Parameter(w0.clone())
        opt = opt_cls([w], **kw)
        w.grad = grad.clone()
        opt.step()
        return w.detach()

    radial = 3.0 * w0  # changes row norms only
    a = one_step(tangent + radial, lambda p, **kw: ConstrainedAdam(p, p, **kw), lr=0.1)
    b = one_step(tangent, lambda p, **kw: ConstrainedAdam(p, p, **kw), lr=0.1)
    assert torch.allclose(a, b, atol=1e-5)
    # Plain Adam does feel the radial part.
    c = one_step(tangent + radial, torch.optim.Adam, lr=0.1)
    d = one_step(tangent, torch.optim.Adam, lr=0.1)
    assert (c - d).abs().max().item() > 1e-2
