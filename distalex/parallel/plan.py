"""The tensor-parallel plan for AlexNet: the one place the serial model is split over tp ranks.

Each rank keeps towers/tp whole towers. Activations cross ranks only where the paper's towers
talked:

    layer            rank holds                           forward        backward
    conv1, LRN1      its towers' kernels                  -              -
    conv2, LRN2      its towers' kernels (own tower)      -              -
    conv3            its kernels over ALL input channels  all-gather     reduce-scatter (sum)
    conv4, conv5     its towers' kernels                  -              -
    fc6 (row)        columns of its towers' features      all-reduce     identity
    fc7 (column)     its slice of the outputs             identity       all-reduce
    fc8 (row)        columns of fc7's slice               all-reduce     identity

The full model is built (and initialised) on every rank first and each rank keeps its slices,
so initial weights do not depend on tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distalex.model import AlexNet, SharedDropout, TowerLRN
from distalex.parallel.collectives import group_rank, group_size
from distalex.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_input_channels,
    mark,
    shard_conv_out_channels,
)


def parallelize(model: AlexNet, tp_group) -> AlexNet:
    """Split ``model`` in place over ``tp_group`` (None or one rank: marks parameters, changes nothing)."""
    n, r = group_size(tp_group), group_rank(tp_group)
    for p in model.parameters():
        mark(p, sharded=False)
    if n == 1:
        return model
    if model.towers % n:
        raise ValueError(f"towers={model.towers} is not divisible by tp={n}")

    for conv in (model.conv1, model.conv2, model.conv3, model.conv4, model.conv5):
        shard_conv_out_channels(conv, tp_group)
    gather_input_channels(model.conv3, tp_group)
    for m in model.modules():
        if isinstance(m, TowerLRN):
            m.towers //= n
    model.towers //= n

    model.fc6 = RowParallelLinear(model.fc6, tp_group)
    model.fc7 = ColumnParallelLinear(model.fc7, tp_group)
    model.fc8 = RowParallelLinear(model.fc8, tp_group)
    # fc6's output is replicated: drop6 keeps the whole (shared) mask. fc7's is sharded.
    drop7: SharedDropout = model.drop7
    per_rank = drop7.features // n
    drop7.start, drop7.stop = r * per_rank, (r + 1) * per_rank
    return model


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


def full_grads(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter's gradient in the serial layout (for parity tests)."""
    return {
        name: gather_full(p.grad, is_sharded(p), getattr(p, "partition_dim", 0), tp_group).cpu()
        for name, p in model.named_parameters()
    }
