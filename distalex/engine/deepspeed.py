"""DeepSpeed ZeRO stage 1/2 over the data-parallel group only.

DeepSpeed is told the job's layout by an ``mpu`` object (Megatron's name for it) built from
``ParallelDims``. Without one, DeepSpeed takes the world group as its data-parallel group: it would
broadcast tower 0's weights over tower 1 at start-up and then average the two towers' different
gradients together, with no error. With it:

- gradients are averaged, and optimizer state (ZeRO-1) plus gradients (ZeRO-2) partitioned, over
  ``dims.dp_group`` only; the start-up broadcast goes from dp rank 0 over that group too;
- the gradient norm sums each sharded (``tensor_model_parallel=True``) parameter over the tp group
  and counts each replicated one once (from tp rank 0);
- checkpoints hold the momentum whole per tp shard (``shard_state`` gathers the dp partitions with
  DeepSpeed's ``safe_get_full_optimizer_state``; ``load_shard_state`` cuts them again for this job's
  dp), so a ZeRO run resumes at any dp x tp. DeepSpeed's own ``save_checkpoint`` files are not used:
  they are pickles that ``torch.load(weights_only=False)`` reads, i.e. code a checkpoint could run.

The optimizer is the paper's SGD from ``distalex.engine.base.build_optimizer``; ZeRO wraps it and keeps
its hyper-parameters in the same ``param_groups``. The model stays float32 inside DeepSpeed (its
weights are the master weights). With bf16 (CUDA), the forward runs under torch autocast as in
``DDPEngine``, but through DeepSpeed's ``torch_autocast`` section: DeepSpeed's forward turns an
autocast opened outside it *off* unless that section is enabled. Its ``lower_precision_safe_modules``
is empty so that every gradient is still averaged in float32, as DDP does; the two engines then
compute the same numbers and differ only in who averages the gradients and who holds the momentum.
"""

from __future__ import annotations

import logging
import os
import torch
import torch.distributed as dist
from torch import nn

from distalex.config import Config
from distalex.engine.base import Engine, autocast_dtype_for, build_optimizer
from distalex.parallel.dims import ParallelDims

MOMENTUM = "momentum_buffer"  # torch SGD's name for its state, which ZeRO keeps per dp partition


class ParallelDimsMPU:
    """The model-parallel unit DeepSpeed queries, answered from ``ParallelDims``.

    "Model parallel" is our tensor parallelism (no pipeline stages). DeepSpeed, for ZeRO-1/2
    training and checkpoints, calls get_data_parallel_{group,world_size},
    get_model_parallel_{group,rank,world_size}, get_tensor_model_parallel_{rank,world_size} and
    get_pipeline_model_parallel_world_size; the rest below serve its other paths (data loader,
    broadcasts) and Megatron-style callers. The ones it probes with ``hasattr``
    (``initialize_sequence_parallel``, get_sequence_[data_]parallel_*) are left out on purpose: their
    presence switches DeepSpeed to sequence-parallel code paths.
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims
        # One process without a launcher has no groups of its own: they are the (1-process) world.
        self._tp_group = dims.tp_group if dims.distributed else dist.group.WORLD
        self._dp_group = dims.dp_group if dims.distributed else dist.group.WORLD

    # tensor ("model") parallel: the ranks that hold different towers
    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_model_parallel_group(self):
        return self._tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims.tp_src

    # data parallel: the ranks that hold the same towers
    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._dp_group)

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size


def _import_deepspeed(device: torch.device):
    """Import DeepSpeed with the accelerator that matches ``device`` (DS_ACCELERATOR=cpu on the CPU)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    accel = get_accelerator().device_name()
    if accel != device.type:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {accel!r} but the device is {device.type!r}: "
            f"set DS_ACCELERATOR={device.type} (or unset it) before deepspeed is first imported"
        )
    return deepspeed


def deepspeed_config(cfg: Config, dims: ParallelDims, autocast_dtype: torch.dtype | None = None) -> dict:
    """The DeepSpeed config for one run: ZeRO over dp, the per-dp-rank batch, no clipping, fp32
    weights and gradient averaging, torch autocast to ``autocast_dtype`` in the forward if given.

    DeepSpeed wants ``train_batch_size`` = micro batch x dp; where dp does not divide
    ``train.batch_size`` the groups' batches differ by one, and this rank's micro batch x dp is only
    DeepSpeed's own sample counter (it feeds no data here and schedules no LR). The gradient is
    exact either way: ZeRO averages over dp as DDP does, and ``Engine.loss`` weights each rank's loss."""
    micro = dims.per_dp_batch(cfg.train.batch_size)
    return {
        "train_batch_size": micro * dims.dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch SGD is not on DeepSpeed's list
        # Mixed precision is torch autocast in the forward, not DeepSpeed's bf16 mode (bf16 weights).
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {
            "enabled": autocast_dtype is not None,
            "dtype": str(autocast_dtype or torch.float32),
            "lower_precision_safe_modules": [],  # no parameter's gradient is reduced in bf16
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "log_level": "warning",
        # The tag is a constant; validating it would all-reduce a hash over the world group.
        "checkpoint": {"tag_validation": "Ignore"},
    }


def _ensure_process_group(dims: ParallelDims) -> None:
    """DeepSpeed needs torch.distributed and LOCAL_RANK; give a lone process (no launcher) a 1-rank
    gloo group here, so that DeepSpeed finds one initialised and never creates its own."""
    if dist.is_initialized():
        return
    if dims.distributed:
        raise RuntimeError("ParallelDims says distributed but torch.distributed is not initialised")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedEngine(Engine):
    """ZeRO stage ``cfg.train.zero_stage`` (1 or 2) over ``dims.dp_group``, the paper's SGD inside."""

    def __init__(self, module: nn.Module, cfg: Config, dims: ParallelDims):
        deepspeed = _import_deepspeed(dims.device)
        _ensure_process_group(dims)
        self.module = module
        self.mpu = ParallelDimsMPU(dims)
        self.optimizer = build_optimizer(module, cfg)
        self.device = dims.device
        self.autocast_dtype = autocast_dtype_for(cfg, dims.device)
        self.loss_weight = dims.loss_weight(cfg.train.batch_size)
        self.model, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=self.optimizer,
            config=deepspeed_config(cfg, dims, self.autocast_dtype),
            mpu=self.mpu,
            dist_init_required=False,  # init_parallel (or _ensure_process_group) made the group
        )
        if self.model.dp_world_size != dims.dp or self.model.mp_world_size != dims.tp:
            raise RuntimeError(
                f"DeepSpeed took dp={self.model.dp_world_size} x mp={self.model.mp_world_size}, "
                f"the layout is dp={dims.dp} x tp={dims.tp}"
            )

    def train_step(self, images, labels):
        # DeepSpeed's forward opens its own autocast (same dtype); this one is for the loss, which
        # autocast computes in float32 from the bf16 logits, as in DDPEngine.
        with self.autocast():
            loss = self.loss(self.model(images), labels)
        self.model.backward(loss)  # ZeRO averages gradients over dp here (ZeRO-2 keeps its partition only)
        self.model.step()  # SGD on this dp rank's partition, then all-gather of the weights over dp
        return loss.detach()

    def _link_momentum(self) -> None:
        """Point each parameter's fragment at its group's momentum. DeepSpeed links every group once,
        right after the first group's first step, when a later group (the biases, with
        ``optim.bias_lr_mult``) has no momentum yet: its parameters would stay linked to none."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.ds_optimizer
        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(group, flat, zero.optimizer.state)

    def shard_state(self):
        from deepspeed.utils import safe_get_full_optimizer_state

        # ZeRO's parameters are views into one flat buffer: clone so each tensor is saved on its own.
        model = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        stepped = any(MOMENTUM in self.optimizer.state.get(flat, {}) for flat in self.ds_optimizer.single_partition_of_fp32_groups)
        if stepped:
            self._link_momentum()
        momentum = {
            # an all-reduce over dp per parameter: each dp rank adds its partition's fragment
            name: safe_get_full_optimizer_state(p, MOMENTUM).clone() if stepped else None
            for name, p in self.module.named_parameters()
        }
        return model, momentum

    def load_shard_state(self, model, momentum):
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = self.ds_optimizer
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(model[name])  # into ZeRO's flat buffer of model weights
        zero.refresh_fp32_params()  # ... and from there into this rank's fp32 partition, which SGD steps
        if all(m is None for m in momentum.values()):
            return
        # torch SGD creates its buffers at the first step and ZeRO links each parameter to its
        # fragment of them after that step; create and link them now, then fill in this rank's cut.
        for flat in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[flat].setdefault(MOMENTUM, torch.zeros_like(flat))
        self._link_momentum()
        for name, p in self.module.named_parameters():
            safe_set_full_optimizer_state(p, momentum[name].to(self.device), MOMENTUM)
