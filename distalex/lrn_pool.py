"""Local response normalisation followed by max pooling, as one op: what AlexNet does after conv1
and conv2, ``max_pool2d(local_response_norm(x))`` exactly, output and gradient.

Composed, the two are memory traffic on the CPU: the LRN writes its whole map, the pooling reads
it back and writes int64 indices of the chosen positions; the backward zero-fills a gradient map
of the LRN's output, scatters into it by those indices, and the LRN's backward reads it again.
conv1's map is 18.6 MB at batch 16, each such pass ~1.4 ms. For a channels-last float32 map on
the CPU in eager mode this op runs one compiled loop per sample over rows of pixels instead
(``_cpu_forward`` / ``_cpu_backward``):

- forward: the LRN of the few rows a row of pooling windows covers, kept in a ring of
  ``kernel_size`` rows (in cache), then the pooling of that ring; only the pooled map leaves the
  loop, with one byte per output (the window position each max came from).
- backward: the pooled gradient scattered by those positions into a ring of rows, and each row,
  once every window over it is in, through the LRN's backward straight into the input gradient.

The LRN is ``distalex.lrn``'s channels-last loops on each row, the pooling picks the first maximum
of each window in row-major order (a NaN wins, as in PyTorch's kernel), and the scatter adds in
the output's raster order, as PyTorch's pooling backward does: the same numbers as the two ops
composed, bit for bit. Anything else (NCHW, CUDA, other dtypes, under ``torch.compile``) is the
two ops composed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distalex import cpu_loops
from distalex.lrn import backward_pixel_rows, check_arguments, forward_pixel_rows, local_response_norm, over_samples, pixel_rows_buffers
from distalex.memory_format import is_channels_last
from distalex.pool import max_pool2d

_MAX_WINDOW = 255  # window positions are stored as one byte each


def local_response_norm_max_pool(
    x: Tensor, size: int, alpha: float, beta: float, k: float, relu_first: bool, groups: int, kernel_size: int, stride: int
) -> Tensor:
    """``max_pool2d(local_response_norm(x, size, alpha, beta, k, relu_first, groups), kernel_size,
    stride)`` of an (N, C, H, W) tensor (no padding), in one pass where it can."""
    check_arguments(x, size, groups)
    fused = (cpu_loops.usable(x) and is_channels_last(x) and min(x.shape[2:]) >= kernel_size and stride >= 1
             and kernel_size * kernel_size <= _MAX_WINDOW)
    if not fused:
        return max_pool2d(local_response_norm(x, size, alpha, beta, k, relu_first, groups), kernel_size, stride)
    return _LocalResponseNormMaxPool.apply(x, (size, alpha, beta, k, relu_first), groups, kernel_size, stride)


class _LocalResponseNormMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lrn: tuple, groups: int, kernel_size: int, stride: int) -> Tensor:
        n, c, h, w = x.shape
        ho, wo = (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1
        y = x.new_empty((n, ho, wo, c))
        positions = torch.empty((n, ho, wo, c), dtype=torch.uint8)  # where in its window each max lies
        tensors = (_pixel_rows(x), y.view(n, ho, wo * c), positions.view(n, ho, wo * c))
        over_samples(_cpu_forward, n, tensors, lrn, c // groups, c, kernel_size, stride)
        ctx.save_for_backward(x, positions)
        ctx.lrn, ctx.groups, ctx.kernel_size, ctx.stride = lrn, groups, kernel_size, stride
        return y.permute(0, 3, 1, 2)  # (N, C, Ho, Wo), channels last

    @staticmethod
    def backward(ctx, g: Tensor):
        x, positions = ctx.saved_tensors
        n, c, h, w = x.shape
        g = g.contiguous(memory_format=torch.channels_last)
        dx = x.new_empty((n, h, w, c))
        tensors = (_pixel_rows(x), _pixel_rows(g), positions.view(n, g.shape[2], -1), dx.view(n, h, w * c))
        over_samples(_cpu_backward, n, tensors, ctx.lrn, c // ctx.groups, c, ctx.kernel_size, ctx.stride)
        return dx.permute(0, 3, 1, 2), None, None, None, None


def _pixel_rows(t: Tensor) -> Tensor:
    """A channels-last (N, C, H, W) tensor as its (N, H, W * C) rows of pixels: a view."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n, h, w * c)


@cpu_loops.jit
def _cpu_forward(x, y, positions, n0, n1, size, alpha_n, coef, beta, k, three_quarters, relu_first, group, channels, kernel, stride):
    ring = np.empty((kernel, x.shape[2]), np.float32)  # LRN rows, row i at i % kernel
    a, d, sq, _, _ = pixel_rows_buffers(size, group)
    for n in range(n0, n1):
        done = 0  # input rows normalised so far
        for i in range(y.shape[1]):
            done = max(done, i * stride)  # rows between windows (stride > kernel) are never read
            while done < i * stride + kernel:
                forward_pixel_rows(x[n, done], ring[done % kernel], group, size, alpha_n, beta, k, three_quarters, relu_first, a, d, sq)
                done += 1
            _pool_row(ring, i * stride, kernel, stride, channels, y[n, i], positions[n, i])


@cpu_loops.jit
def _pool_row(ring, top, kernel, stride, channels, out, positions):
    """One row of pooling windows over ring rows top .. top + kernel - 1: each channel's max (the
    first in row-major order; a NaN replaces it, as in PyTorch's kernel) and its window position."""
    for j in range(out.shape[0] // channels):
        o, p = out[j * channels:(j + 1) * channels], positions[j * channels:(j + 1) * channels]
        for c in range(channels):
            o[c] = -np.inf
            p[c] = 0
        for kh in range(kernel):
            row = ring[(top + kh) % kernel]
            for kw in range(kernel):
                v = row[(j * stride + kw) * channels:(j * stride + kw + 1) * channels]
                at = kh * kernel + kw
                for c in range(channels):
                    if v[c] > o[c] or np.isnan(v[c]):
                        o[c] = v[c]
                        p[c] = at


@cpu_loops.jit
def _cpu_backward(x, g, positions, dx, n0, n1, size, alpha_n, coef, beta, k, three_quarters, relu_first, group, channels, kernel, stride):
    height, rows_out = x.shape[1], g.shape[1]
    ring = np.zeros((kernel, x.shape[2]), np.float32)  # gradient rows of the LRN's output, row i at i % kernel
    a, d, sq, inv_power, r = pixel_rows_buffers(size, group)
    for n in range(n0, n1):
        begun, done = 0, 0  # input rows zeroed in the ring; rows whose input gradient is written
        for i in range(rows_out):
            while begun < i * stride + kernel:
                ring[begun % kernel, :] = 0
                begun += 1
            _scatter_row(g[n, i], positions[n, i], ring, i * stride, kernel, stride, channels)
            complete = (i + 1) * stride if i + 1 < rows_out else height  # rows no later window reaches
            while done < complete:
                if done >= begun:  # in no window (between windows, stride > kernel, or below the last)
                    ring[done % kernel, :] = 0
                    begun = done + 1
                backward_pixel_rows(x[n, done], ring[done % kernel], dx[n, done], group, size, alpha_n, coef, beta, k,
                                    three_quarters, relu_first, a, d, sq, inv_power, r)
                done += 1


@cpu_loops.jit
def _scatter_row(g, positions, ring, top, kernel, stride, channels):
    """One row of the pooled gradient added to the ring rows at the positions the forward chose, in
    the output's order (PyTorch's pooling backward adds in that order too)."""
    for j in range(g.shape[0] // channels):
        gj, p = g[j * channels:(j + 1) * channels], positions[j * channels:(j + 1) * channels]
        for kh in range(kernel):
            row = ring[(top + kh) % kernel]
            for kw in range(kernel):
                t = row[(j * stride + kw) * channels:(j * stride + kw + 1) * channels]
                at = kh * kernel + kw
                for c in range(channels):
                    if p[c] == at:
                        t[c] += gj[c]
