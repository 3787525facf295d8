"""The engine interface every engine implements, and what both engines share: the paper's SGD and
the autocast choice.

The optimizer is the paper's SGD (momentum 0.9, weight decay 0.0005). PyTorch's SGD keeps
v <- m v + (g + wd w) and w <- w - lr v, which equals the paper's update while the LR is constant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from distalex.config import Config
from distalex.parallel.dims import ParallelDims


class Engine:
    """Forward, backward and optimizer step for one training batch, plus save/load of this rank's share."""

    module: nn.Module  # the (tensor-parallel) AlexNet itself, unwrapped
    optimizer: torch.optim.Optimizer  # the paper's SGD (build_optimizer)
    device: torch.device
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
        """The forward's mixed-precision context: ``autocast_dtype`` on this engine's device, or none."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def build_optimizer(params, cfg: Config) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def autocast_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``precision: auto`` or ``bf16``), float32 on the CPU."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    return torch.bfloat16
