"""Local response normalisation across channels, with a closed-form backward.

What ``F.local_response_norm`` computes (the paper's section 3.3, with cuda-convnet's alpha / n):

    b_c = a_c d_c^-beta,    d_c = k + alpha/n * sum_{j in W(c)} a_j^2

over the n channels W(c) = [c - n//2, c + (n-1)//2], zeros outside the tensor's channels. The
gradient with respect to the input, for an output gradient g:

    da_i = g_i d_i^-beta - (2 alpha beta / n) a_i * sum_{j: i in W(j)} r_j,    r_j = g_j a_j d_j^(-beta-1)

a window sum of r over the mirrored window W'(i) = [i - (n-1)//2, i + n//2] (W itself for odd n).
The forward keeps d^beta and b / d = a d^(-beta-1) for it.

``F.local_response_norm`` pads a 5-D copy of a^2, averages it with ``avg_pool3d`` and lets autograd
differentiate that chain: on the CPU a third of AlexNet's step when LRN is on. Here, in eager
mode, the forward is 9 elementwise ops and the backward 6 (for a 5-channel window); on a
single-threaded CPU they run over slices of a few samples at a time, so that the intermediates
stay in the core's cache and are reused rather than re-allocated. Under ``torch.compile`` the same
math is written plainly and the compiler fuses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements per slice on a single-threaded CPU: ~512 KiB of float32 per tensor keeps a slice's
# handful of tensors in the core's L2 while the Python loop over slices stays a small share of the
# time. With several threads each op on a slice is a parallel region whose fork and join cost more
# than the cache saves (measured on 2 cores), so there the ops run on whole tensors.
CPU_SLICE_ELEMENTS = 1 << 17


def local_response_norm(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """``F.local_response_norm(x, size, alpha, beta, k)`` across dim 1 of an (N, C, L, ...) tensor.

    Equal to PyTorch's to ~3e-7 relative in float32, output and input gradient. bfloat16 and
    float16 inputs are normalised in float32 and the result is rounded once to their dtype.
    """
    if x.dim() < 3:
        raise ValueError(f"local_response_norm: expected an (N, C, L, ...) tensor, got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"local_response_norm: size must be >= 1, got {size}")
    return _LocalResponseNorm.apply(x, size, alpha, beta, k)


class _LocalResponseNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
        a = _flat(x)  # (N, C, L)
        front, back = size // 2, (size - 1) // 2
        if torch.compiler.is_compiling():
            d = _window_sum(F.pad(a * a, (0, 0, front, back)), size).mul(alpha / size).add(k)
            power = d.pow(beta)
            y = a / power
            r = y / d
        else:
            y, power, r = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
            # k/n in the pad channels and in every term: each window then holds n of them, and the
            # window sum is already k + alpha/n * sum a^2.
            buf, mid, rows = _padded_slices(a, front, back, fill=k / size)
            d, tmp = a.new_empty(rows, *a.shape[1:]), a.new_empty(rows, *a.shape[1:])
            k_n = torch.tensor(k / size, dtype=a.dtype)
            for i, m in _slices(a.shape[0], rows):
                a_, y_, p_, d_ = a[i : i + m], y[i : i + m], power[i : i + m], d[:m]
                torch.addcmul(k_n, a_, a_, value=alpha / size, out=mid[:m])
                _window_sum(buf[:m], size, out=d_)  # d = k + alpha/n * window sum of a^2
                _power(d_, beta, out=p_, tmp=tmp[:m])  # d^beta
                torch.div(a_, p_, out=y_)
                torch.div(y_, d_, out=r[i : i + m])  # a d^(-beta-1)
        ctx.save_for_backward(a, power, r)
        ctx.size, ctx.coef = size, -2 * alpha * beta / size
        return y.to(x.dtype).view(x.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, power, r = ctx.saved_tensors
        size = ctx.size
        front, back = (size - 1) // 2, size // 2  # the mirrored window W'
        g3 = _flat(g)
        if torch.compiler.is_compiling():
            window = _window_sum(F.pad(g3 * r, (0, 0, front, back)), size)
            dx = (g3 / power).addcmul_(window, a, value=ctx.coef)
        else:
            dx = torch.empty_like(a)
            buf, mid, rows = _padded_slices(a, front, back, fill=0.0)
            window = a.new_empty(rows, *a.shape[1:])
            for i, m in _slices(a.shape[0], rows):
                g_, dx_, w_ = g3[i : i + m], dx[i : i + m], window[:m]
                torch.mul(g_, r[i : i + m], out=mid[:m])
                _window_sum(buf[:m], size, out=w_)
                torch.div(g_, power[i : i + m], out=dx_)
                dx_.addcmul_(w_, a[i : i + m], value=ctx.coef)
        return dx.to(g.dtype).view(g.shape), None, None, None, None


def _flat(t: Tensor) -> Tensor:
    """(N, C, ...) -> (N, C, L); float32 for 16-bit inputs (their window sums of squares lose too much)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))  # explicit: a rank may hold 0 samples


def _padded_slices(a: Tensor, front: int, back: int, fill: float) -> tuple[Tensor, Tensor, int]:
    """A (rows, front + C + back, L) buffer for one slice of ``rows`` samples, ``fill`` in its pad
    channels, and the (rows, C, L) view of its middle that each slice's values are written into."""
    n, c, length = a.shape
    sliced = a.device.type == "cpu" and torch.get_num_threads() == 1
    rows = max(1, min(n, CPU_SLICE_ELEMENTS // max(1, c * length))) if sliced else max(1, n)
    buf = a.new_empty(rows, front + c + back, length)
    buf[:, :front].fill_(fill)
    buf[:, front + c :].fill_(fill)
    return buf, buf[:, front : front + c], rows


def _slices(n: int, rows: int):
    """(start, length) of consecutive slices of ``rows`` samples covering n."""
    return ((i, min(rows, n - i)) for i in range(0, n, rows))


def _window_sum(padded: Tensor, size: int, out: Tensor | None = None) -> Tensor:
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
    if len(parts) == 1:
        return parts[0].clone() if out is None else out.copy_(parts[0])
    out = torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out.add_(part)
    return out


def _power(d: Tensor, beta: float, out: Tensor, tmp: Tensor) -> Tensor:
    """out = d^beta. For the paper's beta = 3/4 on the CPU, sqrt(d) * sqrt(sqrt(d)): pow's general
    kernel takes ~8x as long as these three ops there (and they err by ~2e-7 relative)."""
    if beta != 0.75 or d.device.type != "cpu":
        return torch.pow(d, beta, out=out)
    torch.sqrt(d, out=out)
    torch.sqrt(out, out=tmp)
    return out.mul_(tmp)
