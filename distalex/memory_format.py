"""Channels-last maps through the model: the one test for the layout, and the one place it ends.

With ``train.channels_last`` every 4-d activation from conv1 to pool5 is laid out (N, H, W, C) in
memory, and each layer (convolutions, ``distalex.lrn``, ``distalex.pool``, ``distalex.lrn_pool``)
returns its result and its input gradient in that layout. The fully connected layers read the
features channel-major (fc6's weight and the tensor-parallel split of its input depend on that
order), so the map is copied once into that order by ``flatten_channel_major``, and the gradient
goes back through the inverse copy, channels last, so that the layers below see no other layout.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """A 4-d tensor laid out (N, H, W, C) in memory, and not also plain contiguous (as when H = W = 1
    or C = 1, where both layouts are one)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def flatten_channel_major(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C * H * W), channel-major whatever ``x``'s memory format."""
    return _FlattenChannelsLast.apply(x) if is_channels_last(x) else torch.flatten(x, 1)


class _FlattenChannelsLast(torch.autograd.Function):
    """forward: the channels-last map copied into channel-major order. backward: the inverse copy,
    so that the gradient of the map is channels-last too (a plain reshape would hand the layers
    below an NCHW gradient, which each would copy again)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.reshape(x.shape[0], -1)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)
