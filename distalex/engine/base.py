"""The engine interface every engine implements, and what both engines share: the paper's SGD and
the autocast choice.

The optimizer is the paper's SGD (momentum 0.9, weight decay 0.0005). PyTorch's SGD keeps
v <- m v + (g + wd w) and w <- w - lr v, which equals the paper's update while the LR is constant.
Biases may learn faster and go undecayed, as in the authors' code (``optim.bias_lr_mult``,
``optim.bias_decay_mult``): they are then a parameter group of their own, whose ``lr_mult`` the LR
setter keeps. Momentum is saved and loaded per parameter (by name), so the groups change nothing
in a checkpoint.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from distalex.config import Config


class Engine:
    """Forward, backward and optimizer step for one training batch, plus this rank's share of a checkpoint."""

    module: nn.Module  # the (tensor-parallel) AlexNet itself, unwrapped
    optimizer: torch.optim.Optimizer  # the paper's SGD (build_optimizer)
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    loss_weight: float = 1.0  # ParallelDims.loss_weight: this dp group's share of the global batch, times dp

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on this rank's batch; returns the detached ``loss`` it stepped on (no host
        sync), whose mean over the dp groups is the global batch's mean loss."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's mean cross-entropy times ``loss_weight``, so that the dp average of the
        gradients (DDP's or ZeRO's) is the gradient of the global batch's mean however unevenly dp
        splits it (``ParallelDims.loss_weight``). At an even split the weight is 1 and not applied."""
        loss = F.cross_entropy(logits, labels)
        return loss if self.loss_weight == 1.0 else loss * self.loss_weight

    @property
    def lr(self) -> float:
        """The base LR (the weights'; a group with an ``lr_mult`` steps at that multiple of it)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get(LR_MULT, 1.0)

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:  # with ZeRO too: it steps with these groups
            group["lr"] = value * group.get(LR_MULT, 1.0)

    def shard_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """(weights, SGD momentum) of this rank's tensor-parallel shard, by parameter name, whole over
        the dp group (momentum None before the first step). Every rank calls it (with ZeRO it gathers)."""
        raise NotImplementedError

    def load_shard_state(self, model: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor | None]) -> None:
        """Set this rank's weights and momentum from ``shard_state``'s form (at any dp)."""
        raise NotImplementedError

    def autocast(self):
        """The forward's mixed-precision context: ``autocast_dtype`` on this engine's device, or none."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


LR_MULT = "lr_mult"
"""A parameter group's LR as a multiple of the base LR (``Engine.lr``)."""


def parameter_groups(module: nn.Module, optim) -> list[dict]:
    """The weights, then the biases when ``optim.bias_lr_mult`` or ``optim.bias_decay_mult`` sets them apart.

    One group when both are 1: the plain SGD of the paper's text. Weights first, so that group 0
    carries the base LR.
    """
    named = list(module.named_parameters())
    weights = [p for name, p in named if not name.endswith("bias")]
    biases = [p for name, p in named if name.endswith("bias")]
    if optim.bias_lr_mult == 1 and optim.bias_decay_mult == 1:
        return [{"params": weights + biases}]
    return [
        {"params": weights, LR_MULT: 1.0},
        {"params": biases, LR_MULT: optim.bias_lr_mult, "lr": optim.lr * optim.bias_lr_mult,
         "weight_decay": optim.weight_decay * optim.bias_decay_mult},
    ]


def build_optimizer(module: nn.Module, cfg: Config) -> torch.optim.SGD:
    """The paper's SGD over ``module``'s parameters, grouped by ``parameter_groups``."""
    o = cfg.optim
    return torch.optim.SGD(parameter_groups(module, o), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def autocast_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``precision: auto`` or ``bf16``), float32 on the CPU."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    return torch.bfloat16
