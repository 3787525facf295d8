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
  recomputes d from the input instead of saving it: the Function keeps only its input.
- elsewhere (CUDA; under ``torch.compile``, whose code generator fuses them itself; float64; or
  without numba) the same math as tensor ops, ``_tensor_forward`` / ``_tensor_backward``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distalex import cpu_loops


def local_response_norm(
    x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, relu_first: bool = False
) -> Tensor:
    """``F.local_response_norm(x, size, alpha, beta, k)`` across dim 1 of an (N, C, L, ...) tensor;
    with ``relu_first``, of ``F.relu(x)`` (the order after AlexNet's conv1 and conv2) in the same
    pass, so that the ReLU costs no pass of its own.

    Equal to PyTorch's to ~3e-7 relative in float32, output and input gradient. bfloat16 and
    float16 inputs are normalised in float32 and the result is rounded once to their dtype.
    """
    if x.dim() < 3:
        raise ValueError(f"local_response_norm: expected an (N, C, L, ...) tensor, got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"local_response_norm: size must be >= 1, got {size}")
    return _LocalResponseNorm.apply(x, size, alpha, beta, k, relu_first)


class _LocalResponseNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, relu_first: bool) -> Tensor:
        a = _flat(x)  # (N, C, L)
        ctx.lrn = size, alpha, beta, k, relu_first
        if cpu_loops.usable(a):
            a = a.contiguous()
            y = torch.empty_like(a)
            _over_samples(_cpu_forward, a.shape[0], (a, y), ctx.lrn)
            ctx.save_for_backward(a)
        else:
            y, power, r = _tensor_forward(a.relu() if relu_first else a, size, alpha, beta, k)
            ctx.save_for_backward(a, power, r)
        return y.to(x.dtype).view(x.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, *saved = ctx.saved_tensors
        g3 = _flat(g)
        if saved:
            dx = _tensor_backward(a, g3, *saved, *ctx.lrn)
        else:
            dx = torch.empty_like(a)
            _over_samples(_cpu_backward, a.shape[0], (a, g3.contiguous(), dx), ctx.lrn)
        return dx.to(g.dtype).view(g.shape), None, None, None, None, None


def _flat(t: Tensor) -> Tensor:
    """(N, C, ...) -> (N, C, L); float32 for 16-bit inputs (their window sums of squares lose too much)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))  # explicit: a rank may hold 0 samples


# --- tensor ops: CUDA, torch.compile, float64 -------------------------------------------------------


def _tensor_forward(a: Tensor, size: int, alpha: float, beta: float, k: float) -> tuple[Tensor, Tensor, Tensor]:
    """b, d^beta and b / d = a d^(-beta-1), the last two for the backward."""
    d = _window_sum(F.pad(a * a, (0, 0, size // 2, (size - 1) // 2)), size).mul(alpha / size).add(k)
    power = d.pow(beta)
    y = a / power
    return y, power, y / d


def _tensor_backward(
    x: Tensor, g: Tensor, power: Tensor, r: Tensor, size: int, alpha: float, beta: float, k: float, relu_first: bool
) -> Tensor:
    window = _window_sum(F.pad(g * r, (0, 0, (size - 1) // 2, size // 2)), size)  # over the mirrored window
    a = x.relu() if relu_first else x
    dx = (g / power).addcmul_(window, a, value=-2 * alpha * beta / size)
    return dx.masked_fill_(x <= 0, 0.0) if relu_first else dx  # ReLU's gradient: none where x <= 0


def _window_sum(padded: Tensor, size: int) -> Tensor:
    """Sum over ``size`` consecutive channels of a channel-padded (N, C + size - 1, L) tensor.

    From sums over power-of-two windows, each the sum of two shifted halves: log2(size) +
    popcount(size) - 1 adds (3 for 5 channels) instead of size - 1."""
    c = padded.shape[1] - size + 1
    parts, offset, width, sums = [], 0, 1, padded  # sums[:, j] = sum of `width` channels from j
    while True:
        if size & width:
            parts.append(sums[:, offset : offset + c])
            offset += width
        if offset == size:
            break
        sums = sums[:, :-width] + sums[:, width:]
        width *= 2
    out = parts[0].clone()
    for part in parts[1:]:
        out.add_(part)
    return out


# --- one fused loop per sample on the CPU --------------------------------------------------------


def _over_samples(loop, n: int, tensors: tuple[Tensor, ...], lrn: tuple) -> None:
    """The constants go in as float32, so that the loop computes in float32."""
    size, alpha, beta, k, relu_first = lrn
    f32 = np.float32
    cpu_loops.over_samples(loop, n, tensors, size, f32(alpha / size), f32(-2 * alpha * beta / size), f32(beta), f32(k), beta == 0.75, relu_first)


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
