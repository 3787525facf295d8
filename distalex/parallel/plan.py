"""The tensor-parallel plans for AlexNet: the one place the serial model is split over tp ranks.

Two layouts of the same net (``parallel.layout``); in both the fully connected layers are split
the same way and dropout sees the group's whole batch.

towers (the paper's split): each rank keeps towers/tp whole towers and sees every image.
Activations cross ranks only where the paper's towers talked:

    layer            rank holds                           forward        backward        module
    conv1, LRN1      its towers' kernels                  -              -               nn.Conv2d, sharded
    conv2, LRN2      its towers' kernels (own tower)      -              -               nn.Conv2d, sharded
    conv3            its kernels over ALL input channels  all-gather     reduce-scatter  GatherChannelsConv2d
    conv4, conv5     its towers' kernels                  -              -               nn.Conv2d, sharded
    fc6 (row)        columns of its towers' features      all-reduce     identity        RowParallelLinear
    fc7 (column)     its slice of the outputs             identity       all-reduce      ColumnParallelLinear
    drop7            its slice of the shared mask         -              -               ShardedDropout
    fc8 (row)        columns of fc7's slice               all-reduce     identity        RowParallelLinear

hybrid (Krizhevsky 2014, "One weird trick"): convolutions data-parallel inside the tp group, fully
connected layers model-parallel. Rank r convolves its contiguous 1/tp of the group's samples:

    layer            rank holds                           forward        backward        module
    conv1..conv5     every kernel; conv1 keeps its samples -             all-reduce of   SampleShardConv2d
                                                                         weight, bias
    LRN1, LRN2       every tower                          -              -               TowerLRN
    fc6 (row)        columns of block r of the features   all-to-all,    all-to-all      AllToAllRowParallelLinear
                                                          all-reduce
    fc7, drop7, fc8  as in towers

Parameter names and shapes per rank are those of the serial model's slices, so state dicts of
every tp degree and layout share their keys. ``print(model)`` shows each exchange.

The full model is built (and initialised) on every rank first and each rank keeps its slices,
so initial weights depend on neither tp nor the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distalex.config import towers_per_rank
from distalex.model import AlexNet
from distalex.parallel.collectives import group_rank, group_size
from distalex.parallel.dims import LAYOUTS, ParallelConfigError, ParallelDims, sample_counts
from distalex.parallel.layers import (
    AllToAllRowParallelLinear,
    ColumnParallelLinear,
    GatherChannelsConv2d,
    RowParallelLinear,
    SampleShardConv2d,
    SampleSplit,
    ShardedDropout,
    mark,
    shard_conv_out_channels,
)

CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def parallelize(model: AlexNet, tp_group, layout: str = "towers") -> AlexNet:
    """Split ``model`` in place over ``tp_group`` (None or one rank: marks parameters, changes nothing)."""
    if layout not in LAYOUTS:
        raise ParallelConfigError(f"parallel.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    n = group_size(tp_group)
    for p in model.parameters():
        mark(p, sharded=False)
    if n == 1:
        return model
    if layout == "towers":
        towers_per_rank(model.towers, n)  # model.towers stays the whole net's; each module knows its share
        for conv in (model.conv1, model.conv2, model.conv4, model.conv5):
            shard_conv_out_channels(conv, tp_group)
        model.conv3 = GatherChannelsConv2d(model.conv3, tp_group)
        model.fc6 = RowParallelLinear(model.fc6, tp_group)
    else:
        for name, size in (("fc6 input features", model.fc6.in_features), ("fc7 units", model.fc7.out_features)):
            if size % n:
                raise ParallelConfigError(f"parallel.layout=hybrid: {name} ({size}) are not divisible by parallel.tp={n}")
        split = SampleSplit(tp_group)  # the rule conv1 keeps its samples by and fc6 regroups them by
        for name in CONVS:
            setattr(model, name, SampleShardConv2d(getattr(model, name), tp_group, split if name == "conv1" else None))
        model.fc6 = AllToAllRowParallelLinear(model.fc6, tp_group, split)

    model.fc7 = ColumnParallelLinear(model.fc7, tp_group)
    model.fc8 = RowParallelLinear(model.fc8, tp_group)
    # fc6's output is replicated: drop6 keeps the whole (shared) mask. fc7's is sharded.
    model.drop7 = ShardedDropout(model.drop7, tp_group)
    return model


def share_images(images: torch.Tensor, dims: ParallelDims) -> None:
    """tp rank 0's uint8 batch (B, ...) to its tp peers, in place, as much of it as the layout needs.

    towers: every rank convolves every image: a broadcast. hybrid: a rank convolves only its own
    samples (``SampleSplit``): a scatter of those rows, so tp rank 0 sends (tp-1)/tp of the batch
    instead of all of it; a peer's other rows are zero and its model never reads them. A batch
    that tp does not divide evenly is broadcast.
    """
    n = dims.tp
    counts = sample_counts(images.shape[0], n)
    if dims.layout == "towers" or len(set(counts)) > 1:
        dist.broadcast(images, src=dims.tp_src, group=dims.tp_group)
        return
    rows = list(images.chunk(n))  # contiguous views, one per rank, in rank order
    if dims.tp_rank == 0:  # its own rows are in place already; receive them into a scratch buffer
        dist.scatter(torch.empty_like(rows[0]), rows, src=dims.tp_src, group=dims.tp_group)
    else:
        images.zero_()
        dist.scatter(rows[dims.tp_rank], None, src=dims.tp_src, group=dims.tp_group)


def is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


@torch.no_grad()
def gather_full(tensor: torch.Tensor, sharded: bool, partition_dim: int, tp_group) -> torch.Tensor:
    """The serial tensor from every rank's block (a replicated tensor is returned as is)."""
    if not sharded or group_size(tp_group) == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=partition_dim)


def full_state_dict(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """The serial (tp=1) state dict, gathered over the tp group; every tp rank gets it."""
    return {
        name: gather_full(p, is_sharded(p), getattr(p, "partition_dim", 0), tp_group).cpu()
        for name, p in model.named_parameters()
    }


def local_state_dict(full: dict[str, torch.Tensor], model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """This rank's part of each serial (tp=1) tensor in ``full``, for ``model`` split over ``tp_group``:
    the inverse of ``full_state_dict``, cut as ``layers.shard`` cuts (equal contiguous blocks along
    each parameter's ``partition_dim``). Names ``full`` lacks are left out."""
    n, r = group_size(tp_group), group_rank(tp_group)
    return {
        name: (full[name].chunk(n, p.partition_dim)[r] if is_sharded(p) and n > 1 else full[name]).clone()
        for name, p in model.named_parameters()
        if name in full
    }


def full_grads(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter's gradient in the serial layout (for parity tests)."""
    return {
        name: gather_full(p.grad, is_sharded(p), getattr(p, "partition_dim", 0), tp_group).cpu()
        for name, p in model.named_parameters()
    }
