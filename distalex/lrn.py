"""Local response normalisation across channels, with a closed-form backward.

What ``F.local_response_norm`` computes (the paper's section 3.3, with cuda-convnet's alpha / n):

    b_c = a_c d_c^-beta,    d_c = k + alpha/n * sum_{j in W(c)} a_j^2

over the n channels W(c) = [c - n//2, c + (n-1)//2], zeros outside the tensor's channels. The
gradient with respect to the input, for an output gradient g:

    da_i = g_i d_i^-beta - (2 alpha beta / n) a_i * sum_{j: i in W(j)} r_j,    r_j = g_j a_j d_j^(-beta-1)

a window sum of r over the mirrored window W'(i) = [i - (n-1)//2, i + n//2] (W itself for odd n).

``F.local_response_norm`` pads a 5-D copy of a^2, averages it with ``avg_pool3d`` and lets autograd
differentiate that chain: on the CPU a third of AlexNet's step. Written as tensor ops, the forward
above is ~9 passes over the tensor and the backward ~6; what they cost is memory traffic. So:

- on the CPU in eager mode, float32, each direction is one compiled loop per sample
  (``distalex.cpu_loops``; ``_cpu_forward`` / ``_cpu_backward``): it reads the input once, keeps
  one sample's squares and window sums in cache and writes the result once. The backward
  recomputes d from the input instead of saving it: the Function keeps only its input. A
  channels-last map runs loops with the channels innermost (``_cpu_forward_last`` /
  ``_cpu_backward_last``, over blocks of pixels' rows of channels), so that it stays channels
  last, with the same sums in the same order: the same numbers as its NCHW copy.
- elsewhere (CUDA; under ``torch.compile``, whose code generator fuses them itself; float64; or
  without numba) the same math as tensor ops, ``_tensor_forward`` / ``_tensor_backward``, along
  dim 1 of (N, C, L) or, channels last, dim 2 of (N, L, C).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distalex import cpu_loops
from distalex.memory_format import is_channels_last


def local_response_norm(
    x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, relu_first: bool = False,
    groups: int = 1,
) -> Tensor:
    """``F.local_response_norm(x, size, alpha, beta, k)`` across dim 1 of an (N, C, L, ...) tensor;
    with ``relu_first``, of ``F.relu(x)`` (the order after AlexNet's conv1 and conv2) in the same
    pass, so that the ReLU costs no pass of its own. With ``groups``, each of that many consecutive
    blocks of channels is normalised on its own (the window never crosses into the next block).

    Equal to PyTorch's to ~3e-7 relative in float32, output and input gradient. bfloat16 and
    float16 inputs are normalised in float32 and the result is rounded once to their dtype. A
    channels-last (N, C, H, W) input gives a channels-last output and gradient, computed with
    the channels innermost: no layout copy, the same numbers as for the NCHW tensor.
    """
    check_arguments(x, size, groups)
    return _LocalResponseNorm.apply(x, size, alpha, beta, k, relu_first, groups)


def check_arguments(x: Tensor, size: int, groups: int) -> None:
    """What ``local_response_norm`` refuses, with the reason."""
    if x.dim() < 3:
        raise ValueError(f"local_response_norm: expected an (N, C, L, ...) tensor, got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"local_response_norm: size must be >= 1, got {size}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"local_response_norm: {x.shape[1]} channels do not split into groups={groups}")


class _LocalResponseNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, relu_first: bool, groups: int) -> Tensor:
        last = is_channels_last(x)
        a = _rows(x, groups, last)  # (N, C, L) or, channels last, (N, L, C): C one group's channels
        ctx.lrn, ctx.groups, ctx.last = (size, alpha, beta, k, relu_first), groups, last
        if cpu_loops.usable(a):
            a = a.contiguous()
            y = torch.empty_like(a)
            over_samples(_cpu_forward_last if last else _cpu_forward, a.shape[0], (a, y), ctx.lrn)
            ctx.save_for_backward(a)
        else:
            y, power, r = _tensor_forward(a.relu() if relu_first else a, size, alpha, beta, k, 2 if last else 1)
            ctx.save_for_backward(a, power, r)
        return _unrows(y.to(x.dtype), x.shape, last)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, *saved = ctx.saved_tensors
        g3 = _rows(g.contiguous(memory_format=torch.channels_last) if ctx.last else g, ctx.groups, ctx.last)
        if saved:
            dx = _tensor_backward(a, g3, *saved, *ctx.lrn, 2 if ctx.last else 1)
        else:
            dx = torch.empty_like(a)
            over_samples(_cpu_backward_last if ctx.last else _cpu_backward, a.shape[0], (a, g3.contiguous(), dx), ctx.lrn)
        return _unrows(dx.to(g.dtype), g.shape, ctx.last), None, None, None, None, None, None


def _rows(t: Tensor, groups: int, last: bool) -> Tensor:
    """The tensor as rows the window runs along, as views where the layout allows; float32 for 16-bit
    inputs (their window sums of squares lose too much).

    (N, C, ...) -> (N * groups, C / groups, L); channels last, (N, C, H, W) -> (N, H * W * groups, C / groups)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    n, c = t.shape[0], t.shape[1]
    if last:
        return t.permute(0, 2, 3, 1).reshape(n, t.shape[2] * t.shape[3] * groups, c // groups)
    return t.reshape(n * groups, c // groups, math.prod(t.shape[2:]))  # explicit sizes: a rank may hold 0 samples


def _unrows(rows: Tensor, shape: torch.Size, last: bool) -> Tensor:
    """``_rows`` undone: the (N, C, ...) tensor of ``shape``, channels last if ``last``."""
    if last:
        n, c, h, w = shape
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)
    return rows.view(shape)


# --- tensor ops: CUDA, torch.compile, float64 -------------------------------------------------------


def _tensor_forward(a: Tensor, size: int, alpha: float, beta: float, k: float, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """b, d^beta and b / d = a d^(-beta-1), the last two for the backward; the channels along ``dim``."""
    d = _window_sum(_pad(a * a, size // 2, (size - 1) // 2, dim), size, dim).mul(alpha / size).add(k)
    power = d.pow(beta)
    y = a / power
    return y, power, y / d


def _tensor_backward(
    x: Tensor, g: Tensor, power: Tensor, r: Tensor, size: int, alpha: float, beta: float, k: float, relu_first: bool, dim: int
) -> Tensor:
    window = _window_sum(_pad(g * r, (size - 1) // 2, size // 2, dim), size, dim)  # over the mirrored window
    a = x.relu() if relu_first else x
    dx = (g / power).addcmul_(window, a, value=-2 * alpha * beta / size)
    return dx.masked_fill_(x <= 0, 0.0) if relu_first else dx  # ReLU's gradient: none where x <= 0


def _pad(t: Tensor, front: int, back: int, dim: int) -> Tensor:
    """Zeros before and after the channels of a 3-d tensor, which lie along ``dim`` (1 or 2)."""
    return F.pad(t, (0, 0, front, back) if dim == 1 else (front, back))


def _window_sum(padded: Tensor, size: int, dim: int) -> Tensor:
    """Sum over ``size`` consecutive channels (along ``dim``) of a channel-padded tensor with
    C + size - 1 of them.

    From sums over power-of-two windows, each the sum of two shifted halves: log2(size) +
    popcount(size) - 1 adds (3 for 5 channels) instead of size - 1."""
    c = padded.shape[dim] - size + 1
    parts, offset, width, sums = [], 0, 1, padded  # sums[:, j] = sum of `width` channels from j
    while True:
        if size & width:
            parts.append(sums.narrow(dim, offset, c))
            offset += width
        if offset == size:
            break
        sums = sums.narrow(dim, 0, sums.shape[dim] - width) + sums.narrow(dim, width, sums.shape[dim] - width)
        width *= 2
    out = parts[0].clone()
    for part in parts[1:]:
        out.add_(part)
    return out


# --- one fused loop per sample on the CPU --------------------------------------------------------


def over_samples(loop, n: int, tensors: tuple[Tensor, ...], lrn: tuple, *more) -> None:
    """``cpu_loops.over_samples`` for an LRN loop: the LRN's constants (``lrn``: size, alpha, beta,
    k, relu_first) as the loops take them, in float32 so that they compute in float32; then
    ``more`` (what a loop takes besides, as ``distalex.lrn_pool``'s)."""
    size, alpha, beta, k, relu_first = lrn
    f32 = np.float32
    cpu_loops.over_samples(loop, n, tensors, size, f32(alpha / size), f32(-2 * alpha * beta / size), f32(beta), f32(k), beta == 0.75,
                           relu_first, *more)


@cpu_loops.jit
def _window_sums(sq, c, front, back, out):
    """out = sum of sq's rows [c - front, c + back], clipped to the tensor's channels."""
    lo, hi = max(0, c - front), min(sq.shape[0], c + back + 1)
    for l in range(out.shape[0]):
        out[l] = sq[lo, l]
    for j in range(lo + 1, hi):
        for l in range(out.shape[0]):
            out[l] += sq[j, l]


@cpu_loops.jit
def _squares(x, n, relu_first, a, sq):
    """One sample's input (after ReLU with ``relu_first``) and its squares, as (C, L) rows."""
    for c in range(x.shape[1]):
        for l in range(x.shape[2]):
            v = x[n, c, l]
            if relu_first and v < 0:  # not max(v, 0), which would turn a NaN into 0: NaNs must show
                v = np.float32(0.0)
            a[c, l] = v
            sq[c, l] = v * v


@cpu_loops.jit
def _cpu_forward(x, y, n0, n1, size, alpha_n, coef, beta, k, three_quarters, relu_first):
    channels, length = x.shape[1], x.shape[2]
    a, sq, d = np.empty((channels, length), np.float32), np.empty((channels, length), np.float32), np.empty(length, np.float32)
    for n in range(n0, n1):
        _squares(x, n, relu_first, a, sq)
        for c in range(channels):
            _window_sums(sq, c, size // 2, (size - 1) // 2, d)
            if three_quarters:  # d^(3/4) as sqrt(d) * sqrt(sqrt(d)): vectorised, where pow is a call per element
                for l in range(length):
                    p = np.sqrt(k + alpha_n * d[l])
                    y[n, c, l] = a[c, l] / (p * np.sqrt(p))
            else:
                for l in range(length):
                    y[n, c, l] = a[c, l] / (k + alpha_n * d[l]) ** beta


@cpu_loops.jit
def _cpu_backward(x, g, dx, n0, n1, size, alpha_n, coef, beta, k, three_quarters, relu_first):
    channels, length = x.shape[1], x.shape[2]
    a, sq, d = np.empty((channels, length), np.float32), np.empty((channels, length), np.float32), np.empty(length, np.float32)
    r, inv_power = np.empty((channels, length), np.float32), np.empty((channels, length), np.float32)
    for n in range(n0, n1):
        _squares(x, n, relu_first, a, sq)
        for c in range(channels):
            _window_sums(sq, c, size // 2, (size - 1) // 2, d)
            if three_quarters:
                for l in range(length):
                    dd = k + alpha_n * d[l]
                    p = np.sqrt(dd)
                    inv = np.float32(1.0) / (p * np.sqrt(p))
                    inv_power[c, l] = inv
                    r[c, l] = g[n, c, l] * a[c, l] * inv / dd
            else:
                for l in range(length):
                    dd = k + alpha_n * d[l]
                    inv = np.float32(1.0) / dd**beta
                    inv_power[c, l] = inv
                    r[c, l] = g[n, c, l] * a[c, l] * inv / dd
        for c in range(channels):
            _window_sums(r, c, (size - 1) // 2, size // 2, d)  # the mirrored window
            for l in range(length):
                grad = g[n, c, l] * inv_power[c, l] + coef * a[c, l] * d[l]
                if relu_first and x[n, c, l] <= 0:  # ReLU's gradient: none where x <= 0
                    grad = np.float32(0.0)
                dx[n, c, l] = grad


# --- the same sums with the channels innermost: channels-last maps -------------------------------
#
# A channels-last map is rows of one pixel's channels (one tower's: 48 after conv1), too short for
# a vectorised loop each. So the loops run over blocks of whole rows as one flat array: the window
# sum of the flat squares is each row's own for all but its edge channels, whose flat window reaches
# into the neighbouring rows; those few are summed again, clipped to the row. Every sum adds the
# same terms in the same order as ``_window_sums``: the same numbers as the NCHW loops.

_BLOCK = 1024  # elements per block of rows: the block's intermediates stay in the L1 cache


@cpu_loops.jit
def _relu_squares(x, relu_first, a, sq, front):
    """A block's input (after ReLU with ``relu_first``) in ``a``, its squares from ``sq[front]`` on."""
    for i in range(x.shape[0]):
        v = x[i]
        if relu_first and v < 0:
            v = np.float32(0.0)
        a[i] = v
        sq[front + i] = v * v


@cpu_loops.jit
def _row_window_sums(s, size, front, channels, rows, out):
    """out[r * channels + c] = the sum of s[front + r * channels + j] over the channels j of row r in
    [c - front, c - front + size - 1], in channel order; ``s`` holds zeros before and after the block."""
    m = rows * channels
    if size == 5 and front == 2 and channels >= 4:  # the paper's window: the sums written out
        for i in range(m):
            out[i] = s[i] + s[i + 1] + s[i + 2] + s[i + 3] + s[i + 4]
        for r in range(rows):
            t, o = s[r * channels:], out[r * channels:]  # row r's squares from t[2] on
            o[0] = t[2] + t[3] + t[4]
            o[1] = t[2] + t[3] + t[4] + t[5]
            o[channels - 2] = t[channels - 2] + t[channels - 1] + t[channels] + t[channels + 1]
            o[channels - 1] = t[channels - 1] + t[channels] + t[channels + 1]
        return
    for i in range(m):
        acc = s[i]
        for j in range(1, size):
            acc += s[i + j]
        out[i] = acc
    for r in range(rows):
        for c in range(channels):
            if front <= c < channels - (size - 1 - front):
                continue  # an interior channel: its flat sum is its own
            lo, hi = max(0, c - front), min(channels, c - front + size)
            acc = s[front + r * channels + lo]
            for j in range(lo + 1, hi):
                acc += s[front + r * channels + j]
            out[r * channels + c] = acc


@cpu_loops.jit
def _cpu_forward_last(x, y, n0, n1, size, alpha_n, coef, beta, k, three_quarters, relu_first):
    length, channels = x.shape[1] * x.shape[2], x.shape[2]
    a, d, sq, _, _ = pixel_rows_buffers(size, channels)
    for n in range(n0, n1):
        forward_pixel_rows(x[n].reshape(length), y[n].reshape(length), channels, size, alpha_n, beta, k, three_quarters, relu_first, a, d, sq)


@cpu_loops.jit
def pixel_rows_buffers(size, channels):
    """Scratch for ``forward_pixel_rows`` / ``backward_pixel_rows``: a block's a, d, squares and
    inverse powers and r (the squares and r with zeros either side of the block)."""
    block = max(1, _BLOCK // channels) * channels
    return (np.empty(block, np.float32), np.empty(block, np.float32), np.zeros(block + size - 1, np.float32),
            np.empty(block, np.float32), np.zeros(block + size - 1, np.float32))


@cpu_loops.jit
def forward_pixel_rows(x, y, channels, size, alpha_n, beta, k, three_quarters, relu_first, a, d, sq):
    """The LRN of a run of pixels laid out channels last (flat ``x``, rows of ``channels``), into ``y``,
    in blocks of rows; ``a``, ``d`` and ``sq`` from ``pixel_rows_buffers``."""
    front, block = size // 2, a.shape[0]
    for o in range(0, x.shape[0], block):
        m = min(block, x.shape[0] - o)
        _relu_squares(x[o:o + m], relu_first, a, sq, front)
        sq[front + m:] = 0
        _row_window_sums(sq, size, front, channels, m // channels, d)
        _forward_block(a, d, y[o:o + m], alpha_n, beta, k, three_quarters)


@cpu_loops.jit
def _forward_block(a, d, y, alpha_n, beta, k, three_quarters):
    if three_quarters:
        for i in range(y.shape[0]):
            p = np.sqrt(k + alpha_n * d[i])
            y[i] = a[i] / (p * np.sqrt(p))
    else:
        for i in range(y.shape[0]):
            y[i] = a[i] / (k + alpha_n * d[i]) ** beta


@cpu_loops.jit
def _cpu_backward_last(x, g, dx, n0, n1, size, alpha_n, coef, beta, k, three_quarters, relu_first):
    length, channels = x.shape[1] * x.shape[2], x.shape[2]
    a, d, sq, inv_power, r = pixel_rows_buffers(size, channels)
    for n in range(n0, n1):
        backward_pixel_rows(x[n].reshape(length), g[n].reshape(length), dx[n].reshape(length), channels,
                            size, alpha_n, coef, beta, k, three_quarters, relu_first, a, d, sq, inv_power, r)


@cpu_loops.jit
def backward_pixel_rows(x, g, dx, channels, size, alpha_n, coef, beta, k, three_quarters, relu_first, a, d, sq, inv_power, r):
    """``forward_pixel_rows``'s input gradient ``dx`` for the output gradient ``g``."""
    front, lead = size // 2, (size - 1) // 2  # the mirrored window starts (size - 1) // 2 before c
    block = a.shape[0]
    for o in range(0, x.shape[0], block):
        m = min(block, x.shape[0] - o)
        rows = m // channels
        _relu_squares(x[o:o + m], relu_first, a, sq, front)
        sq[front + m:] = 0
        _row_window_sums(sq, size, front, channels, rows, d)
        _backward_terms(a, d, g[o:o + m], inv_power, r[lead:lead + m], alpha_n, beta, k, three_quarters)
        r[lead + m:] = 0
        _row_window_sums(r, size, lead, channels, rows, d)  # the mirrored window
        _backward_block(x[o:o + m], g[o:o + m], a, d, inv_power, dx[o:o + m], coef, relu_first)


@cpu_loops.jit
def _backward_terms(a, d, g, inv_power, r, alpha_n, beta, k, three_quarters):
    """d^-beta and r = g a d^(-beta-1) of a block, from its window sums ``d``."""
    if three_quarters:
        for i in range(g.shape[0]):
            dd = k + alpha_n * d[i]
            p = np.sqrt(dd)
            inv = np.float32(1.0) / (p * np.sqrt(p))
            inv_power[i] = inv
            r[i] = g[i] * a[i] * inv / dd
    else:
        for i in range(g.shape[0]):
            dd = k + alpha_n * d[i]
            inv = np.float32(1.0) / dd**beta
            inv_power[i] = inv
            r[i] = g[i] * a[i] * inv / dd


@cpu_loops.jit
def _backward_block(x, g, a, window, inv_power, dx, coef, relu_first):
    for i in range(dx.shape[0]):
        grad = g[i] * inv_power[i] + coef * a[i] * window[i]
        if relu_first and x[i] <= 0:  # ReLU's gradient: none where x <= 0
            grad = np.float32(0.0)
        dx[i] = grad
