"""distalex.lrn.local_response_norm is F.local_response_norm: output and input gradient, on both
of its paths (the fused CPU loops for float32, the tensor ops for everything else)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from distalex import cpu_loops
from distalex.lrn import local_response_norm
from distalex.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE

PAPER = (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)


def relu_like(shape, scale: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Non-negative with zeros, as after ReLU; ``scale`` sets how much the alpha term weighs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).clamp_(min=0).mul_(scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def output_and_grad(fn, x: torch.Tensor, g: torch.Tensor, *args):
    x = x.detach().requires_grad_()
    y = fn(x, *args)
    (dx,) = torch.autograd.grad(y, x, g)
    return y.detach(), dx


def test_float32_runs_the_fused_cpu_loops():
    """The fast path is the one the tests below check (numba is a dependency)."""
    assert cpu_loops.AVAILABLE and cpu_loops.usable(torch.ones(2, 3, 4))
    assert not cpu_loops.usable(torch.ones(2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("shape", [(4, 48, 13, 13), (3, 7, 5), (2, 5, 3, 4, 2), (5, 3, 1)])
def test_float32_equals_torch_to_1e6(shape, scale):
    """Within 1e-6 of the largest value (max |error| / max |reference|), forward and input
    gradient, at the paper's parameters, on one thread and with the samples split over 2 (odd
    sample counts: unequal chunks), the ReLU in the same pass or not."""
    x, g = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scale, torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for threads in (1, 2):
        with torch_threads(threads):
            for relu_first in (False, True):
                check(x if relu_first else x.clamp(min=0), g, *PAPER, relu_first=relu_first, tol=1e-6)


def check(x, g, size, alpha, beta, k, relu_first, tol):
    y, dx = output_and_grad(lambda t: local_response_norm(t, size, alpha, beta, k, relu_first=relu_first), x, g)
    y_ref, dx_ref = output_and_grad(lambda t: F.local_response_norm(F.relu(t) if relu_first else t, size, alpha, beta, k), x, g)
    errors = rel_err(y, y_ref), rel_err(dx, dx_ref)
    assert max(errors) <= tol, (torch.get_num_threads(), x.dtype, size, beta, relu_first, errors)


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("beta", [0.75, 0.5])
def test_any_window_and_beta(size, beta):
    """Odd and even windows (the backward's window is the forward's mirrored), windows wider than
    the channels, and the general beta: in float64 (the tensor ops) the rounding is gone, equal to
    1e-12; in float32 (the fused loops) to 1e-6. Inputs of both signs, with and without the ReLU."""
    shape = (3, 7, 4, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 30
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for relu_first in (False, True):
        check(x, g, size, 2e-4, beta, 1.5, relu_first, tol=1e-12)
        check(x.float(), g.float(), size, 2e-4, beta, 1.5, relu_first, tol=1e-6)


@pytest.mark.parametrize("relu_first", [False, True])
def test_gradcheck_against_finite_differences(relu_first):
    """The closed-form backward against numerical derivatives, inputs of both signs."""
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True) * 20
    fn = lambda t: local_response_norm(t, 5, 1e-2, 0.75, 2.0, relu_first=relu_first)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(),))


@pytest.mark.parametrize("relu_first", [False, True])
def test_infinities_nans_and_overflow_as_torch(relu_first):
    """Where a run diverges: infinite, NaN and huge inputs (squares overflow float32) give PyTorch's
    output and gradient, NaN for NaN and 0 for 0, with no NaN of its own (a NaN is how training
    notices divergence, so one too many or one too few changes what a run does)."""
    x = torch.randn(3, 9, 4, 4, generator=torch.Generator().manual_seed(8)) * 1e21  # squared: inf
    x[0, :, 0] = 1.0
    x[0, 2, 0, 0], x[1, 4, 1, 1], x[2, 6, 2, 2] = float("inf"), -float("inf"), float("nan")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    y, dx = output_and_grad(lambda t: local_response_norm(t, *PAPER, relu_first=relu_first), x, g)
    y_ref, dx_ref = output_and_grad(lambda t: F.local_response_norm(F.relu(t) if relu_first else t, *PAPER), x, g)
    for got, ref in ((y, y_ref), (dx, dx_ref)):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        finite = ref.isfinite()
        assert torch.allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-30)


def test_bfloat16_within_bfloat16_rounding():
    """bf16 in: the result is the float32 LRN of the same input rounded once to bf16, gradient
    likewise: each element within half a bf16 unit (<= 2^-8 relative) of the float32 value, and
    all but the rare elements that float32's own error moves across a rounding boundary equal to it."""
    shape = (4, 48, 13, 13)
    x32, g32 = relu_like(shape, 30.0, seed=4), torch.randn(shape, generator=torch.Generator().manual_seed(5))
    x, g = x32.bfloat16(), g32.bfloat16()
    y, dx = output_and_grad(local_response_norm, x, g, *PAPER)
    assert y.dtype == dx.dtype == torch.bfloat16
    y_ref, dx_ref = output_and_grad(F.local_response_norm, x.float(), g.float(), *PAPER)  # exact bf16 inputs, fp32 math
    for got, ref in ((y, y_ref), (dx, dx_ref)):
        assert ((got.float() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-6 * ref.abs().max()).all()
        assert (got != ref.bfloat16()).float().mean() < 1e-3
    assert rel_err(y, y_ref) > 0  # it was rounded: the checks above are not vacuous


def test_rejects_what_torch_rejects():
    with pytest.raises(ValueError, match=r"\(N, C, L, \.\.\.\).*\(4, 9\)"):
        local_response_norm(torch.ones(4, 9), 5)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        local_response_norm(torch.ones(2, 3, 4), 0)


@pytest.mark.parametrize("relu_first", [False, True])
def test_fullgraph_compile_traces_forward_and_backward(relu_first):
    """torch.compile(fullgraph=True) traces the whole Function, backward included, without a graph
    break (aot_eager: the tracing inductor also does, without its code generation)."""
    x, g = torch.randn(2, 8, 5, 5) * 30, torch.randn(2, 8, 5, 5)
    fn = torch.compile(lambda t: local_response_norm(t, *PAPER, relu_first=relu_first), fullgraph=True, backend="aot_eager")
    y, dx = output_and_grad(fn, x, g)
    y_ref, dx_ref = output_and_grad(lambda t: F.local_response_norm(F.relu(t) if relu_first else t, *PAPER), x, g)
    assert rel_err(y, y_ref) <= 1e-6 and rel_err(dx, dx_ref) <= 1e-6


@pytest.mark.slow
def test_inductor_compiled_equals_torch():
    """Inductor's generated CPU kernels (what CUDA runs as Triton) compute the same LRN. A cold
    compile takes about a minute on a 2-core machine."""
    x, g = relu_like((2, 8, 5, 5), 300.0, seed=7), torch.randn(2, 8, 5, 5)
    fn = torch.compile(lambda t: local_response_norm(t, *PAPER), fullgraph=True, backend="inductor")
    y, dx = output_and_grad(fn, x, g)
    y_ref, dx_ref = output_and_grad(F.local_response_norm, x, g, *PAPER)
    assert rel_err(y, y_ref) <= 1e-6 and rel_err(dx, dx_ref) <= 1e-6


@pytest.mark.parametrize("threads", [1, 2])
def test_empty_batch_passes_through(threads):
    """Under the hybrid layout a rank can convolve 0 samples of a small batch: LRN and pooling must
    return empty results (and gradients) of the right shape, as PyTorch's functions do."""
    from distalex.pool import max_pool2d

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(0, 6, 7, 7, requires_grad=True)
        y = local_response_norm(x, 5, 1e-4, 0.75, 2.0)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert max_pool2d(x.detach(), 3, 2).shape == F.max_pool2d(x.detach(), 3, 2).shape
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["loops", "tensor-ops"])
@pytest.mark.parametrize("groups", [1, 2])
def test_channels_last_in_channels_last_out_same_numbers(dtype, groups):
    """A channels-last input gives a channels-last output and input gradient (the gradient arriving
    channels-last, as from pooling), equal bit for bit to the NCHW tensor's, on both paths, one
    thread and two, the ReLU folded in or not; ``groups`` normalise each block of channels alone."""
    shape = (3, 2 * 24, 9, 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=dtype) * 30
    g = torch.randn(shape, generator=torch.Generator().manual_seed(12), dtype=dtype)
    last = torch.channels_last
    for threads in (1, 2):
        with torch_threads(threads):
            for relu_first in (False, True):
                fn = lambda t: local_response_norm(t, *PAPER, relu_first=relu_first, groups=groups)  # noqa: E731
                y, dx = output_and_grad(fn, x, g)
                y_cl, dx_cl = output_and_grad(fn, x.contiguous(memory_format=last), g.contiguous(memory_format=last))
                assert not y_cl.is_contiguous() and y_cl.is_contiguous(memory_format=last)
                assert not dx_cl.is_contiguous() and dx_cl.is_contiguous(memory_format=last)
                assert torch.equal(y_cl, y) and torch.equal(dx_cl, dx), (threads, relu_first)
    alone = torch.cat([F.local_response_norm(t, *PAPER) for t in x.clamp(min=0).chunk(groups, dim=1)], dim=1)
    assert rel_err(local_response_norm(x.contiguous(memory_format=last), *PAPER, relu_first=True, groups=groups), alone) <= 1e-6


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("beta", [0.75, 0.5])
def test_channels_last_loops_equal_nchw_loops_any_window(size, beta):
    """The channels-last loops sum blocks of rows as one flat array and sum each row's edge
    channels again: bit for bit the NCHW loops' numbers for any window, even or odd, wider than
    the channels or not, rows of 1 to 48 channels, maps that end in a partial block."""
    last = torch.channels_last
    for shape in ((2, 48, 5, 5), (2, 7, 13, 13), (2, 4, 6, 6), (3, 3, 4, 5), (2, 1, 3, 3)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(13), dtype=torch.float32) * 30
        g = torch.randn(shape, generator=torch.Generator().manual_seed(14), dtype=torch.float32)
        for relu_first in (False, True):
            fn = lambda t: local_response_norm(t, size, 2e-4, beta, 1.5, relu_first=relu_first)  # noqa: E731
            y, dx = output_and_grad(fn, x, g)
            y_cl, dx_cl = output_and_grad(fn, x.contiguous(memory_format=last), g.contiguous(memory_format=last))
            assert torch.equal(y_cl, y) and torch.equal(dx_cl, dx), (shape, relu_first)


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="7 channels do not split into groups=2"):
        local_response_norm(torch.ones(1, 7, 2, 2), 5, groups=2)
