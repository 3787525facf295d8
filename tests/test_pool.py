"""distalex.pool.max_pool2d is F.max_pool2d exactly: values, the position each window picks, gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distalex.pool import MaxPool2d, max_pool2d


def with_ties(shape, seed: int = 0) -> torch.Tensor:
    """ReLU-like values with exact ties inside windows: zeros, and flat patches of one positive value
    (as a saturated image region gives), where the window's first maximum decides the gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).clamp_(min=0)
    x[..., : shape[-2] // 3, :] = 0.5
    x[..., :, -3:] = torch.randint(0, 3, (*shape[:-1], 3), generator=g).float()
    return x


@pytest.mark.parametrize("shape", [(2, 6, 55, 55), (3, 4, 27, 27), (2, 5, 13, 13), (1, 3, 8, 11)])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (3, 1)])
def test_equals_torch_exactly_with_ties(shape, kernel, stride):
    x = with_ties(shape)
    g = torch.randn(F.max_pool2d(x, kernel, stride).shape, generator=torch.Generator().manual_seed(1))
    outs = []
    for fn in (max_pool2d, F.max_pool2d):
        xi = x.clone().requires_grad_()
        y = fn(xi, kernel, stride)
        (dx,) = torch.autograd.grad(y, xi, g)
        outs.append((y, dx))
    (y, dx), (y_ref, dx_ref) = outs
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)  # the same input position got each window's gradient
    assert y.is_contiguous() and dx.is_contiguous()


def test_module_and_fallbacks():
    """A non-contiguous input and a channels-last one (PyTorch's fast kernel already) give torch's
    result too; the module wraps the function."""
    x = with_ties((2, 4, 15, 15), seed=2)
    ref = F.max_pool2d(x, 3, 2)
    assert torch.equal(max_pool2d(x.transpose(2, 3), 3, 2), F.max_pool2d(x.transpose(2, 3), 3, 2))
    assert torch.equal(max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 2), ref)
    assert torch.equal(MaxPool2d(3, stride=2)(x), ref)
    assert "kernel_size=3, stride=2" in repr(MaxPool2d(3, stride=2))


def test_fullgraph_compile():
    x = with_ties((2, 4, 13, 13), seed=3).requires_grad_()
    fn = torch.compile(lambda t: max_pool2d(t, 3, 2), fullgraph=True, backend="aot_eager")
    y = fn(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    (dx_ref,) = torch.autograd.grad(F.max_pool2d(x, 3, 2).sum(), x)
    assert torch.equal(y, F.max_pool2d(x, 3, 2)) and torch.equal(dx, dx_ref)


def test_channels_last_in_channels_last_out():
    """A channels-last map (train.channels_last) stays channels-last, values and gradient those of
    the NCHW map bit for bit."""
    x = with_ties((2, 6, 27, 27), seed=4)
    g = torch.randn(F.max_pool2d(x, 3, 2).shape, generator=torch.Generator().manual_seed(5))
    last = torch.channels_last
    outs = []
    for xi, gi in ((x, g), (x.contiguous(memory_format=last), g.contiguous(memory_format=last))):
        xi = xi.clone().requires_grad_()
        y = max_pool2d(xi, 3, 2)
        (dx,) = torch.autograd.grad(y, xi, gi)
        outs.append((y, dx))
    (y, dx), (y_cl, dx_cl) = outs
    assert y_cl.is_contiguous(memory_format=last) and not y_cl.is_contiguous()
    assert dx_cl.is_contiguous(memory_format=last) and not dx_cl.is_contiguous()
    assert torch.equal(y_cl, y) and torch.equal(dx_cl, dx)
