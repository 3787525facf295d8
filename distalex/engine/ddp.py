"""DistributedDataParallel over the data-parallel group, with the paper's SGD."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distalex.config import Config
from distalex.engine.base import Engine, autocast_dtype_for, build_optimizer
from distalex.parallel.dims import ParallelDims


class DDPEngine(Engine):
    """DistributedDataParallel over the dp group; dp replicas hold equal shards."""

    def __init__(self, module: nn.Module, cfg: Config, dims: ParallelDims):
        self.module = module
        self.model = (
            DistributedDataParallel(module, process_group=dims.dp_group, bucket_cap_mb=cfg.train.ddp_bucket_mb,
                                    device_ids=[dims.device] if dims.device.type == "cuda" else None)
            if dims.dp_enabled
            else module
        )
        self.optimizer = build_optimizer(module, cfg)
        self.device = dims.device
        self.autocast_dtype = autocast_dtype_for(cfg, dims.device)
        self.loss_weight = dims.loss_weight(cfg.train.batch_size)

    def train_step(self, images, labels):
        with self.autocast():
            loss = self.loss(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over the dp group here, bucket by bucket as they are made
        self.optimizer.step()
        return loss.detach()

    def shard_state(self):
        model = {k: v.detach() for k, v in self.module.state_dict().items()}
        momentum = {name: self.optimizer.state.get(p, {}).get("momentum_buffer") for name, p in self.module.named_parameters()}
        return model, momentum

    def load_shard_state(self, model, momentum):
        self.module.load_state_dict(model)
        for name, p in self.module.named_parameters():
            if momentum.get(name) is None:
                self.optimizer.state.pop(p, None)
            else:
                self.optimizer.state[p]["momentum_buffer"] = momentum[name].to(p.device, p.dtype).clone()
