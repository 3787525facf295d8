"""Tensor-parallel layers, each built from the serial layer it replaces (same parameter names).

A parameter that holds only this rank's part is marked ``tensor_model_parallel=True`` with its
``partition_dim`` (the attributes Megatron and DeepSpeed read); a replicated one is marked False.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distalex.model import SharedDropout
from distalex.parallel.collectives import (
    copy_to_tp, gather_from_tp, group_rank, group_size, reduce_from_tp, samples_to_features,
)
from distalex.parallel.dims import sample_counts  # the split of a batch over ranks, dp's and hybrid's tp's alike


def mark(param: nn.Parameter, sharded: bool, partition_dim: int = 0) -> nn.Parameter:
    param.tensor_model_parallel = sharded
    param.partition_dim = partition_dim
    param.partition_stride = 1
    return param


def shard(tensor: torch.Tensor, dim: int, group) -> nn.Parameter:
    """This rank's contiguous 1/tp block of a serial tensor, as a marked parameter."""
    n, r = group_size(group), group_rank(group)
    if tensor.shape[dim] % n:
        raise ValueError(f"cannot shard size {tensor.shape[dim]} (dim {dim}) over {n} ranks")
    return mark(nn.Parameter(tensor.detach().chunk(n, dim)[r].clone()), sharded=True, partition_dim=dim)


def replicate(tensor: torch.Tensor) -> nn.Parameter:
    return mark(nn.Parameter(tensor.detach().clone()), sharded=False)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by output rows: A = [A_1; ...; A_p], b = [b_1, ..., b_p].

    Rank i computes Y_i = X A_i^T + b_i, its slice of the outputs. X is replicated; its gradient
    is the sum of every rank's share, hence ``copy_to_tp`` (identity / all-reduce).
    """

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        self.group = group
        self.in_features, self.out_features, self.tp = linear.in_features, linear.out_features, group_size(group)
        self.weight = shard(linear.weight, 0, group)  # (out/p, in)
        self.bias = shard(linear.bias, 0, group)  # (out/p,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)  # (B, out/p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(this rank: {self.weight.shape[0]}), tp={self.tp}, input grad all-reduced (copy_to_tp)")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by input columns: A = [A_1, ..., A_p], X = [X_1, ..., X_p].

    Rank i holds X_i (its towers' features) and computes X_i A_i^T; the partial sums are
    all-reduced (``reduce_from_tp``: all-reduce / identity) and the replicated bias b is added
    once, after the reduction.
    """

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        self.group = group
        self.in_features, self.out_features, self.tp = linear.in_features, linear.out_features, group_size(group)
        self.weight = shard(linear.weight, 1, group)  # (out, in/p)
        self.bias = replicate(linear.bias)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(x, self.weight), self.group) + self.bias  # (B, out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.weight.shape[1]}), "
                f"out_features={self.out_features}, tp={self.tp}, output all-reduced (reduce_from_tp)")


def shard_conv_out_channels(conv: nn.Conv2d, group) -> None:
    """Keep this rank's block of output channels (its towers' kernels), in place.

    A grouped conv (one group per tower) keeps groups/p groups and reads only its towers' input
    channels; an ungrouped conv still reads every input channel.
    """
    n = group_size(group)
    conv.weight = shard(conv.weight, 0, group)  # (out/p, in/groups, k, k)
    conv.bias = shard(conv.bias, 0, group)
    conv.out_channels //= n
    if conv.groups > 1:
        conv.groups //= n
        conv.in_channels //= n


class GatherChannelsConv2d(nn.Conv2d):
    """A conv whose rank-local kernels read every rank's input channels (conv3: all towers).

    Built from the serial conv: keeps this rank's block of output channels (its towers' kernels,
    over all input channels) and all-gathers its input along the channel dim before convolving.
    The gathered input feeds rank-specific kernels, so the backward is a reduce-scatter (sum) of
    the input gradient (``gather_from_tp``).
    """

    def __init__(self, conv: nn.Conv2d, group):
        n = group_size(group)
        super().__init__(
            conv.in_channels, conv.out_channels // n, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",  # weights come from conv
        )
        self.group, self.tp = group, n
        self.weight = shard(conv.weight, 0, group)  # (out/p, in, k, k)
        self.bias = shard(conv.bias, 0, group) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(gather_from_tp(x, 1, self.group))  # (B, in/p, H, W) -> (B, in, H, W) first

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tp={self.tp}: input channels all-gathered from {self.in_channels // self.tp} "
                "per rank (backward: reduce-scatter)")


class ShardedDropout(SharedDropout):
    """The serial model's dropout on an activation sharded over tp ranks (fc7's outputs).

    Draws the same full-width noise as every peer (one shared stream) and keeps this rank's
    contiguous slice of it, so the tp run's mask is the serial run's mask, cut into pieces.
    """

    def __init__(self, dropout: SharedDropout, group):
        super().__init__(dropout.p, dropout.features, dropout.seed)
        self.stream = dropout.stream
        n, r = group_size(group), group_rank(group)
        if self.features % n:
            raise ValueError(f"cannot shard a dropout of {self.features} features over {n} ranks")
        self.tp = n
        self.start, self.stop = r * self.features // n, (r + 1) * self.features // n

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return super().noise(x)[:, self.start : self.stop]  # (B, features/p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tp={self.tp}: this rank keeps [{self.start}:{self.stop}] of the shared mask"


# ---------------------------------------------------------------- the hybrid layout's layers


class SampleSplit:
    """Which of the tp group's samples each rank convolves: contiguous parts in rank order, of
    ``sample_counts(batch, n)`` samples. A rule, not a record: conv1 (which keeps this rank's part)
    and fc6 (which regroups every rank's) each apply it to the group batch's size, which fc6 is
    handed by the model's forward. Nothing is stored between layers, so both agree on every
    batch (a ragged last validation batch included) whatever ran before, and a compiled or
    recomputed forward reads no Python state."""

    def __init__(self, group):
        self.n, self.rank = group_size(group), group_rank(group)

    def counts(self, batch: int) -> list[int]:
        """Every rank's number of samples of a group batch of ``batch``."""
        return sample_counts(batch, self.n)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's samples of the group batch ``x`` (a view)."""
        counts = self.counts(x.shape[0])
        start = sum(counts[: self.rank])
        return x[start : start + counts[self.rank]]

    def describe(self) -> str:
        return f"keeps part {self.rank} of {self.n} (contiguous samples, in rank order)"


class SampleShardConv2d(nn.Conv2d):
    """A convolution with every kernel on every rank, run on this rank's samples only (hybrid layout).

    Each rank holds the serial conv's whole weight (replicated) and convolves its share of the
    group's batch, so its weight gradient covers only its samples; the true gradient is the sum
    over the tp group, hence ``copy_to_tp`` on weight and bias (identity / all-reduce). The sum
    happens inside autograd, before DDP or ZeRO see the gradient: they still average over dp only.
    Given a ``SampleSplit`` (conv1), the input is the whole group batch and this rank keeps its samples.
    """

    def __init__(self, conv: nn.Conv2d, group, split: SampleSplit | None = None):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",  # weights come from conv
        )
        self.group, self.tp, self.split = group, group_size(group), split
        self.weight = replicate(conv.weight)  # (out, in/groups, k, k): all of it
        self.bias = replicate(conv.bias) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is not None:
            x = self.split.take(x)  # (B, C, H, W) -> (B_rank, C, H, W)
        bias = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return self._conv_forward(x, copy_to_tp(self.weight, self.group), bias)

    def extra_repr(self) -> str:
        where = f"input: the group batch, it {self.split.describe()}; " if self.split is not None else ""
        return (f"{super().extra_repr()}, tp={self.tp}: {where}every kernel, this rank's samples; "
                "weight and bias grads all-reduced (copy_to_tp)")


class AllToAllRowParallelLinear(RowParallelLinear):
    """fc6 in the hybrid layout: a ``RowParallelLinear`` whose input arrives as this rank's samples.

    The conv layers leave each rank its own samples with every feature; rank i's block A_i needs
    block X_i of every sample. One all-to-all regroups (B_rank, F) into (B, F/p) (backward: the
    inverse all-to-all; each element has one owner, so nothing is summed); the rest is row-parallel.
    Moving only the block each rank uses sends 1/p of what an all-gather of the features would.
    The model's forward passes the group batch's size B, from which ``split`` gives every rank's share.
    """

    takes_group_batch = True  # AlexNet.forward passes the group batch's size

    def __init__(self, linear: nn.Linear, group, split: SampleSplit):
        super().__init__(linear, group)
        self.split = split

    def forward(self, x: torch.Tensor, group_batch: int) -> torch.Tensor:
        counts = self.split.counts(group_batch)
        return super().forward(samples_to_features(x, counts, self.group))  # (B_rank, F) -> (B, F/p) first

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}; input regrouped all-to-all from this rank's samples x all features "
                "to all samples x its features (backward: the inverse all-to-all)")
