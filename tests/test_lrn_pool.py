"""distalex.lrn_pool is max_pool2d(local_response_norm(x)) bit for bit, output and input gradient:
through its one-pass CPU loops for channels-last float32 maps, and composed everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distalex import cpu_loops
from distalex.lrn import local_response_norm
from distalex.lrn_pool import _LocalResponseNormMaxPool, local_response_norm_max_pool
from distalex.memory_format import is_channels_last

LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)

pytestmark = pytest.mark.skipif(not cpu_loops.AVAILABLE, reason="numba is not installed: the one-pass loops do not exist")


def composed(x, size, alpha, beta, k, relu_first, groups, kernel_size, stride):
    return F.max_pool2d(local_response_norm(x, size, alpha, beta, k, relu_first, groups), kernel_size, stride)


def both(x, g_seed=1, **kw):
    """(output, input gradient) of the op and of the composition, for one random output gradient."""
    results = []
    for fn in (local_response_norm_max_pool, composed):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi, **kw)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(g_seed)).contiguous(memory_format=torch.channels_last)
        (dx,) = torch.autograd.grad(y, xi, g)
        results.append((y, dx))
    return results


def channels_last(*shape, seed=0, scale=3.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).contiguous(memory_format=torch.channels_last)


def fused_calls(fn) -> int:
    """How many times ``fn()`` ran the one-pass op (so that a fallback cannot pass for it)."""
    calls = []
    original = _LocalResponseNormMaxPool.forward

    def counting(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    _LocalResponseNormMaxPool.forward = staticmethod(counting)
    try:
        fn()
    finally:
        _LocalResponseNormMaxPool.forward = staticmethod(original)
    return len(calls)


@pytest.mark.parametrize(
    "shape, groups, kernel_size, stride",
    [
        ((3, 96, 55, 55), 2, 3, 2),  # conv1's map at 224 (three samples)
        ((2, 256, 27, 27), 2, 3, 2),  # conv2's
        ((2, 10, 12, 11), 2, 3, 2),  # even height: the last row is in no window
        ((2, 7, 9, 9), 1, 2, 2),  # windows that do not overlap; 7 channels, one group
        ((1, 12, 10, 13), 3, 3, 1),  # stride 1: every row in three windows
        ((2, 8, 11, 11), 2, 2, 3),  # stride above the window: rows between windows
        ((1, 6, 4, 5), 2, 4, 1),  # one window high
    ],
)
@pytest.mark.parametrize("relu_first", [True, False])
def test_equals_lrn_then_max_pool_bit_for_bit(shape, groups, kernel_size, stride, relu_first):
    x = channels_last(*shape)
    kw = dict(LRN, relu_first=relu_first, groups=groups, kernel_size=kernel_size, stride=stride)
    assert fused_calls(lambda: local_response_norm_max_pool(x, **kw)) == 1
    (y, dx), (y_ref, dx_ref) = both(x, **kw)
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)
    assert is_channels_last(y) and is_channels_last(dx)


def test_ties_nans_and_infinities_pick_what_pytorch_picks():
    """Few distinct values, so that windows hold ties (the first maximum wins, and its position
    takes the gradient); NaNs and infinities in some windows (a NaN wins its window)."""
    x = torch.randint(-2, 3, (2, 12, 15, 15), generator=torch.Generator().manual_seed(3)).float()
    x[0, 3, 4, 4] = float("nan")
    x[1, 7, 0:3, 0:3] = float("-inf")  # a window of nothing but -inf
    x[1, 2, 8, 9] = float("inf")
    x[0, 5, 2, 2] = x[0, 5, 2, 3] = float("nan")  # two NaNs in one window
    x = x.contiguous(memory_format=torch.channels_last)
    for relu_first in (True, False):
        kw = dict(LRN, relu_first=relu_first, groups=2, kernel_size=3, stride=2)
        (y, dx), (y_ref, dx_ref) = both(x, **kw)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0, equal_nan=True)
        assert y.isnan().any() and dx.isnan().any()  # the NaNs showed, as they do composed


@pytest.mark.parametrize("threads", [1, 2])
def test_any_thread_count_and_an_empty_batch(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = channels_last(5, 16, 13, 13, seed=4)
        kw = dict(LRN, relu_first=True, groups=2, kernel_size=3, stride=2)
        (y, dx), (y_ref, dx_ref) = both(x, **kw)
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
        empty = torch.empty(0, 16, 13, 13)  # a rank's share of a batch can be empty (hybrid layout)
        assert local_response_norm_max_pool(empty, **kw).shape == (0, 16, 6, 6)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("case", ["nchw", "float64", "compiled", "too small"])
def test_everything_else_is_the_composition(case):
    kw = dict(LRN, relu_first=True, groups=2, kernel_size=3, stride=2)
    x = channels_last(2, 8, 9, 9, seed=5)
    if case == "too small":  # what max_pool2d says of a map smaller than its window
        with pytest.raises(RuntimeError, match="too small"):
            local_response_norm_max_pool(channels_last(1, 8, 2, 2), **kw)
        return
    if case == "nchw":
        x = x.contiguous()
    if case == "float64":
        x = x.double()
    fn = local_response_norm_max_pool
    if case == "compiled":
        fn = torch.compile(local_response_norm_max_pool, fullgraph=True, backend="aot_eager")
    assert fused_calls(lambda: fn(x, **kw)) == 0
    torch.testing.assert_close(fn(x, **kw), composed(x, **kw), rtol=1e-6, atol=0)


def test_rejects_what_the_lrn_rejects():
    with pytest.raises(ValueError, match="do not split into groups=3"):
        local_response_norm_max_pool(channels_last(1, 8, 9, 9), **LRN, relu_first=True, groups=3, kernel_size=3, stride=2)
