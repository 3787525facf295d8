"""Engines: how gradients are averaged over the data-parallel group and the optimizer stepped.

One small interface (``base.Engine``), two implementations, chosen in ``build_engine`` only:

- ``ddp``: DistributedDataParallel over the dp group (never the world group: that would average
  the two towers' different weights together) and plain SGD (``ddp.DDPEngine``).
- ``deepspeed``: ZeRO stage 1/2 over the dp group, told about the tp/dp groups by an ``mpu``
  (``deepspeed.DeepSpeedEngine``).
"""

from __future__ import annotations

from torch import nn

from distalex.config import Config
from distalex.engine.base import Engine, autocast_dtype_for, build_optimizer
from distalex.engine.ddp import DDPEngine
from distalex.parallel.dims import ParallelDims

__all__ = ["DDPEngine", "Engine", "autocast_dtype_for", "build_engine", "build_optimizer"]


def build_engine(module: nn.Module, cfg: Config, dims: ParallelDims) -> Engine:
    """The one place the engine is chosen."""
    if cfg.train.engine == "deepspeed":
        from distalex.engine.deepspeed import DeepSpeedEngine  # heavy import, only when asked for

        return DeepSpeedEngine(module, cfg, dims)
    return DDPEngine(module, cfg, dims)
