"""The SGD's parameter groups: biases at optim.bias_lr_mult x the LR and optim.bias_decay_mult x the
weight decay (the authors' conventions), kept through an LR drop and through a checkpoint's momentum.

One process, the DDP engine on the serial net; the same groups under ZeRO are checked against DDP in
tests/test_engine_deepspeed.py, whose configs use these conventions.
"""

from __future__ import annotations

import torch

from distalex.config import Config
from distalex.engine import DDPEngine
from distalex.engine.base import parameter_groups
from distalex.parallel.dims import ParallelDims
from tests.test_tensor_parallel import tiny_model

LR, MOMENTUM, WD = 0.05, 0.9, 0.01


def engine(bias_lr_mult: float = 1.0, bias_decay_mult: float = 1.0) -> DDPEngine:
    cfg = Config.model_validate({
        "model": {"dropout": 0.0}, "parallel": {"tp": 1, "device": "cpu"},
        "optim": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "bias_lr_mult": bias_lr_mult,
                  "bias_decay_mult": bias_decay_mult},
    })
    return DDPEngine(tiny_model(), cfg, ParallelDims())


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)


def gradients(e: DDPEngine, x, y) -> dict[str, torch.Tensor]:
    """The loss gradients at the engine's current weights (no step)."""
    probe = tiny_model()
    probe.load_state_dict(e.module.state_dict())
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    return {n: p.grad.clone() for n, p in probe.named_parameters()}


def test_biases_step_at_their_multiples_and_keep_them_when_the_lr_drops():
    e = engine(bias_lr_mult=2.0, bias_decay_mult=0.0)
    x, y = batch()
    before = {n: p.detach().clone() for n, p in e.module.named_parameters()}
    grads = gradients(e, x, y)
    e.train_step(x, y)
    for n, p in e.module.named_parameters():
        # the first step: momentum buffer = gradient + decay, w <- w - lr * buffer
        if n.endswith("bias"):
            want = before[n] - 2 * LR * grads[n]
        else:
            want = before[n] - LR * (grads[n] + WD * before[n])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=n)
    assert e.lr == LR
    e.lr = LR / 10  # what the training loop does on a validation plateau
    assert e.lr == LR / 10
    assert [g["lr"] for g in e.optimizer.param_groups] == [LR / 10, 2 * LR / 10]
    assert [g["weight_decay"] for g in e.optimizer.param_groups] == [WD, 0.0]


def test_the_papers_text_is_one_group():
    groups = parameter_groups(tiny_model(), Config().optim)
    assert len(groups) == 1 and len(groups[0]["params"]) == 16
    split = parameter_groups(tiny_model(), Config.model_validate({"optim": {"bias_decay_mult": 0}}).optim)
    assert [len(g["params"]) for g in split] == [8, 8] and all(p.dim() == 1 for p in split[1]["params"])


def test_momentum_by_name_moves_between_one_group_and_two():
    """A checkpoint's momentum is per parameter name: an engine with the bias groups resumes one
    saved without them (and the other way) and steps as the saving engine would have."""
    x, y = batch()
    for saver_mults, loader_mults in (((1.0, 1.0), (2.0, 0.0)), ((2.0, 0.0), (1.0, 1.0))):
        saver = engine(*saver_mults)
        saver.train_step(x, y)
        weights, momentum = saver.shard_state()
        loader = engine(*loader_mults)
        loader.load_shard_state(weights, momentum)
        _, loaded = loader.shard_state()
        assert all(torch.equal(loaded[n], momentum[n]) for n in momentum)
        reference = engine(*loader_mults)  # what the loader's settings do from the saved state
        reference.module.load_state_dict(weights)
        for n, p in reference.module.named_parameters():
            reference.optimizer.state[p]["momentum_buffer"] = momentum[n].clone()
        loader.train_step(x, y)
        reference.train_step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(loader.module.parameters(), reference.module.parameters()))
