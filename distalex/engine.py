"""Engines: how gradients are averaged over the data-parallel group and the optimizer stepped.

One small interface, two implementations, chosen in ``build_engine`` only:

- ``ddp``: DistributedDataParallel over the dp group (never the world group: that would average
  the two towers' different weights together) and plain SGD.
- ``deepspeed``: ZeRO stage 1/2 over the dp group, told about the tp/dp groups by an ``mpu``
  (``distalex.engine_deepspeed``).

The optimizer is the paper's SGD (momentum 0.9, weight decay 0.0005). PyTorch's SGD keeps
v <- m v + (g + wd w) and w <- w - lr v, which equals the paper's update while the LR is constant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distalex.config import Config
from distalex.parallel.dims import ParallelDims


class Engine:
    """Forward, backward and optimizer step for one training batch, plus save/load of this rank's share."""

    module: nn.Module  # the (tensor-parallel) AlexNet itself, unwrapped
    optimizer: torch.optim.Optimizer  # the paper's SGD (build_optimizer)
    autocast_dtype: torch.dtype | None = None

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on this rank's batch; returns the detached loss (no host sync)."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:  # with ZeRO too: it steps with these groups
            group["lr"] = value

    def save(self, folder: Path, dims: ParallelDims) -> None:
        """Write this rank's model shard and optimizer state into ``folder`` (every rank calls)."""
        raise NotImplementedError

    def load(self, folder: Path, dims: ParallelDims) -> None:
        raise NotImplementedError

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)


def build_optimizer(params, cfg: Config) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def autocast_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``precision: auto`` or ``bf16``), float32 on the CPU."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    return torch.bfloat16


def shard_file(folder: Path, tp_rank: int) -> Path:
    return folder / f"model-tp{tp_rank:02d}.pt"


class DDPEngine(Engine):
    """DistributedDataParallel over the dp group; dp replicas hold equal shards, so dp rank 0 saves."""

    def __init__(self, module: nn.Module, cfg: Config, dims: ParallelDims):
        self.module = module
        self.model = (
            DistributedDataParallel(module, process_group=dims.dp_group, device_ids=[dims.device] if dims.device.type == "cuda" else None)
            if dims.dp_enabled
            else module
        )
        self.optimizer = build_optimizer(module.parameters(), cfg)
        self.autocast_dtype = autocast_dtype_for(cfg, dims.device)

    def train_step(self, images, labels):
        with self.autocast():
            loss = F.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over the dp group here
        self.optimizer.step()
        return loss.detach()

    def save(self, folder: Path, dims: ParallelDims) -> None:
        if dims.dp_rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, shard_file(folder, dims.tp_rank))

    def load(self, folder: Path, dims: ParallelDims) -> None:
        state = torch.load(shard_file(folder, dims.tp_rank), map_location=dims.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_engine(module: nn.Module, cfg: Config, dims: ParallelDims) -> Engine:
    """The one place the engine is chosen."""
    if cfg.train.engine == "deepspeed":
        from distalex.engine_deepspeed import DeepSpeedEngine  # heavy import, only when asked for

        return DeepSpeedEngine(module, cfg, dims)
    return DDPEngine(module, cfg, dims)
