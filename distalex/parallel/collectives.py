"""Autograd collectives over a tensor-parallel group: each one is a forward/backward pair.

Megatron's vocabulary: ``copy_to_tp`` is ``f`` and ``reduce_from_tp`` is ``g``. Every function
takes the group explicitly and returns its input unchanged on a one-rank group (or ``None``), so
the serial model runs the same code with no communication.

Do not use ``torch.distributed.nn.all_reduce`` here: its backward is another all-reduce, which
makes the gradient tp times too large when every tp rank computes the same loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distalex.memory_format import is_channels_last


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _gather_op():
    # The flat-tensor collectives go by two names across torch releases (the old one warns where
    # the new exists): take the new one if present. Looked up per call so test spies see them.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_op():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order."""
    n = group_size(group)
    if dim == 1 and is_channels_last(x):
        # (N, H, W, C) in memory: gather whole maps as they lie, then interleave each pixel's channel
        # blocks (one copy), so that the result is channels last too
        maps = x.permute(0, 2, 3, 1)  # contiguous (N, H, W, C/n)
        out = torch.empty((n * maps.shape[0], *maps.shape[1:]), dtype=x.dtype, device=x.device)  # rank-major
        _gather_op()(out, maps, group=group)
        ranks = out.view(n, *maps.shape).permute(1, 2, 3, 0, 4)  # (N, H, W, n, C/n)
        return ranks.reshape(*maps.shape[:3], n * maps.shape[3]).permute(0, 3, 1, 2)
    # The flat all-gather stacks along dim 0: gather there, then move the rank axis into dim.
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _gather_op()(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over ranks, then keep this rank's ``1/n`` chunk along ``dim``."""
    n = group_size(group)
    if x.shape[dim] % n != 0:
        raise ValueError(f"reduce-scatter: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    if dim == 1 and is_channels_last(x):
        # the inverse of _all_gather's channels-last case: each rank's channel blocks gathered (one copy)
        b, h, w, c = x.shape[0], x.shape[2], x.shape[3], x.shape[1] // n
        blocks = x.permute(0, 2, 3, 1).reshape(b, h, w, n, c).permute(3, 0, 1, 2, 4).reshape(n * b, h, w, c)  # rank-major
        out = torch.empty((b, h, w, c), dtype=x.dtype, device=x.device)
        _reduce_scatter_op()(out, blocks, op=dist.ReduceOp.SUM, group=group)
        return out.permute(0, 3, 1, 2)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_op()(out, moved, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim)


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Rows ``x[sum(send_counts[:s]) : ...]`` go to rank s; the rows from rank q arrive in rank order."""
    out = torch.empty((sum(recv_counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """forward: identity. backward: all-reduce (sum) of the gradient.

    Used where a replicated activation enters rank-specific weights (fc7's input): each rank's
    gradient holds only its weights' share, and the true gradient is their sum.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce (sum). backward: identity.

    Used where partial sums over rank-specific inputs become one replicated activation (fc6, fc8):
    the output is the same on every rank, so its gradient already is too.
    """

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather along ``dim``. backward: reduce-scatter (sum) along ``dim``.

    Used at conv3, where every rank's kernels read all towers' channels. The gathered tensor feeds
    rank-specific weights, so the gradient of this rank's slice is the sum of every rank's
    gradient for it: a reduce-scatter, not a plain slice.
    """

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _SamplesToFeatures(torch.autograd.Function):
    """forward: all-to-all from (this rank's samples, all F features) to (all samples, this rank's
    contiguous F/n block of features). backward: the inverse all-to-all.

    Used before fc6 in the hybrid layout: each rank convolved its own samples, and fc6's
    row-parallel block on rank s needs block s of every sample's features. Every element goes to
    exactly one rank, so the backward returns each gradient to where its element came from, with
    no sum. ``counts[q]`` is rank q's number of samples; the output's samples are in rank order.
    """

    @staticmethod
    def forward(ctx, x, counts, group):
        n, b, f = group_size(group), x.shape[0], x.shape[1]
        if f % n:
            raise ValueError(f"all-to-all: {f} features are not divisible by {n} ranks")
        ctx.counts, ctx.group, ctx.shape = counts, group, (b, f)
        blocks = x.reshape(b, n, f // n).transpose(0, 1).reshape(n * b, f // n)  # block s of my samples -> rank s
        return _all_to_all(blocks, [b] * n, counts, group)  # (sum(counts), F/n)

    @staticmethod
    def backward(ctx, grad):
        (b, f), n = ctx.shape, group_size(ctx.group)
        blocks = _all_to_all(grad, ctx.counts, [b] * n, ctx.group)  # (n*b, F/n): my samples, block by block
        return blocks.reshape(n, b, f // n).transpose(0, 1).reshape(b, f), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce backward (Megatron's ``f``)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (Megatron's ``g``)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather along ``dim`` forward; reduce-scatter along ``dim`` backward."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, dim, group)


def samples_to_features(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """(counts[rank], F) -> (sum(counts), F/n) by all-to-all forward; the inverse backward."""
    return x if group_size(group) == 1 else _SamplesToFeatures.apply(x, counts, group)
