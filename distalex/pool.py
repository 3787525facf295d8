"""Max pooling that is ``F.max_pool2d``, values, chosen positions and gradient, made faster on the CPU.

PyTorch's CPU kernel for NCHW max pooling walks each window element by element; its channels-last
kernel vectorises across channels and is several times faster, even counting a transposed copy
of the input. Both pick the first maximum of each window in row-major order, so the channels-last
pass returns the same indices, and the backward is PyTorch's own (NCHW) scatter by those indices.
A channels-last input (``train.channels_last``) goes straight to that kernel and comes back
channels last, its gradient too. Elsewhere (CUDA, or under ``torch.compile``, which lowers pooling
itself) this is ``F.max_pool2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def max_pool2d(x: Tensor, kernel_size: int, stride: int) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride)`` of an (N, C, H, W) tensor, no padding."""
    if x.device.type != "cpu" or x.dim() != 4 or x.numel() == 0 or torch.compiler.is_compiling() or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, kernel_size, stride)
    return _ChannelsLastMaxPool.apply(x, kernel_size, stride)


class MaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel_size, stride)`` through ``max_pool2d`` above."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class _ChannelsLastMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel_size: int, stride: int) -> Tensor:
        y, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, return_indices=True)
        indices = indices.contiguous()  # flat h * W + w within each plane, as the NCHW kernel's
        ctx.save_for_backward(x, indices)
        ctx.kernel_size, ctx.stride = kernel_size, stride
        return y.contiguous()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, indices = ctx.saved_tensors
        k, s = ctx.kernel_size, ctx.stride
        dx = torch.ops.aten.max_pool2d_with_indices_backward(g.contiguous(), x, [k, k], [s, s], [0, 0], [1, 1], False, indices)
        return dx, None, None
