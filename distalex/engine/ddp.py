"""DistributedDataParallel over the data-parallel group, with the paper's SGD."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distalex.checkpoint import shard_file
from distalex.config import Config
from distalex.engine.base import Engine, autocast_dtype_for, build_optimizer
from distalex.parallel.dims import ParallelDims


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
        self.device = dims.device
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
