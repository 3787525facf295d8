"""A global batch that dp does not divide: the step is still the serial step on the whole batch.

dp=3 x tp=2 (6 gloo processes, one run for both layouts) with ``train.batch_size=10``: the dp
groups take 4, 3 and 3 images (``ParallelDims.dp_batches``), and under the hybrid layout their tp
peers split those 2 + 2, 2 + 1 and 2 + 1. Built as ``distalex.train`` builds it (``build_parallel_model``,
``build_engine``: DDP over dp with each group's loss weighted by ``Engine.loss``), 3 SGD steps with
momentum, weight decay and dropout on (each dp group's own masks, drawn by the serial reference
too) equal the serial net's on the 10 images: the logged loss (``train.mean_over_dp``), every
gradient of the first step and every weight after the last, to the 1e-5 relative tolerance of
``tests/test_tensor_parallel.py``. The split and the warning about a GPU's share are checked
without processes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distalex.config import Config
from distalex.engine import DDPEngine, build_engine
from distalex.parallel.dims import GPU_IMAGES_FLOOR, ParallelConfigError, ParallelDims, init_parallel, small_batch_warning
from distalex.parallel.plan import full_grads, full_state_dict
from distalex.train import build_parallel_model, mean_over_dp
from tests.distributed import run_workers
from tests.test_tensor_parallel import CLASSES, LR, MOMENTUM, SIZE, STEPS, WD, WIDTH, DPGroupDropout, assert_close_rel, data

GLOBAL, DP, TP = 10, 3, 2
LAYOUTS = ("towers", "hybrid")


def make_cfg(layout: str = "towers") -> Config:
    return Config.model_validate({
        "model": {"num_classes": CLASSES, "width": WIDTH, "image_size": SIZE, "dropout": 0.5},
        "parallel": {"tp": TP, "device": "cpu", "layout": layout},
        "optim": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD},
        "train": {"batch_size": GLOBAL, "seed": 42},
    })


def train_steps(engine, x, y, dims) -> dict:
    """STEPS of ``engine`` on (x, y): the losses as the training loop logs them, the first step's
    gradients and the last weights, all in the serial layout."""
    losses, grads = [], None
    for step in range(STEPS):
        losses.append(mean_over_dp(engine.train_step(x, y), dims))
        if step == 0:
            grads = full_grads(engine.module, dims.tp_group)  # as averaged over dp, before the next step
    return {"losses": losses, "grads": grads, "weights": full_state_dict(engine.module, dims.tp_group)}


def uneven_worker() -> dict:
    dims = init_parallel(tp=TP, towers=2, device="cpu")
    x, y = data(GLOBAL)
    first, size = dims.dp_batch_offset(GLOBAL), dims.per_dp_batch(GLOBAL)
    x, y = x[first : first + size], y[first : first + size]  # this dp group's part of the global batch
    out = {"batch": size}
    for layout in LAYOUTS:
        cfg, dims = make_cfg(layout), dataclasses.replace(dims, layout=layout)
        engine = build_engine(build_parallel_model(cfg, dims), cfg, dims)
        out[layout] = train_steps(engine, x, y, dims)
        out[layout]["loss_weight"] = engine.loss_weight
    return out


def serial_reference(layout: str) -> dict:
    """The same net in this process on all 10 images, its dropout drawing each dp group's masks for
    that group's images (the streams ``build_parallel_model`` seeds for dp ranks 0, 1, 2)."""
    cfg = make_cfg(layout)
    model = build_parallel_model(cfg, ParallelDims())
    groups = [build_parallel_model(cfg, ParallelDims(dp=DP, rank=d)).dropouts() for d in range(DP)]
    model.drop6, model.drop7 = (DPGroupDropout([g[i] for g in groups]) for i in range(2))
    dims = ParallelDims()
    return train_steps(DDPEngine(model, cfg, dims), *data(GLOBAL), dims)


@pytest.fixture(scope="module")
def ranks():
    return run_workers(uneven_worker, DP * TP, timeout=300)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_uneven_dp_split_equals_the_serial_step(ranks, layout):
    assert [r["batch"] for r in ranks] == [4, 4, 3, 3, 3, 3]  # dp groups of 4, 3, 3; tp peers share theirs
    assert [r[layout]["loss_weight"] for r in ranks[::TP]] == [1.2, 0.9, 0.9]  # dp * b / B
    ref = serial_reference(layout)
    assert ref["losses"][-1] != ref["losses"][0]  # the steps did something
    for rank, run in enumerate(ranks):
        got = run[layout]
        assert_close_rel(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), f"rank {rank}: logged losses")
        assert got["grads"].keys() == ref["grads"].keys()
        for name in ref["grads"]:
            assert_close_rel(got["grads"][name], ref["grads"][name], f"rank {rank}: grad {name}")
            assert_close_rel(got["weights"][name], ref["weights"][name], f"rank {rank}: weight {name}")


def test_the_split_is_even_where_dp_divides_and_refused_below_one_image():
    assert ParallelDims(dp=4, rank=2).dp_batches(128) == [32] * 4
    assert ParallelDims(dp=4, rank=2).loss_weight(128) == 1.0  # exactly: the even split is not touched
    assert ParallelDims(dp=12, rank=11).dp_batches(128) == [11] * 8 + [10] * 4
    assert [ParallelDims(dp=12, rank=r).dp_batch_offset(128) for r in (0, 1, 8, 11)] == [0, 11, 88, 118]
    assert ParallelDims(dp=3).describe_batch(32) == "32 images, per dp rank 11 or 10"
    assert ParallelDims(dp=2).describe_batch(32) == "32 images, per dp rank 16"
    with pytest.raises(ParallelConfigError, match="train.batch_size=2 is smaller than dp=3"):
        ParallelDims(dp=3).per_dp_batch(2)


def test_a_gpu_with_too_few_images_is_warned_once_with_the_keys():
    # 4 nodes x 8 GPUs at tp=2 with the paper's batch: dp=16, 8 images per pair, 4 per GPU
    warning = small_batch_warning(128, dp=16, tp=2, device_type="cuda")
    assert warning is not None and "4 images' work" in warning and "train.batch_size" in warning
    assert "train.cuda_graphs" in warning and f"below {GPU_IMAGES_FLOOR}" in warning
    assert small_batch_warning(128, dp=12, tp=1, device_type="cuda") is not None  # 10 or 11 per GPU
    assert small_batch_warning(128, dp=1, tp=2, device_type="cuda") is None  # the paper's pair: 64 each
    assert small_batch_warning(64, dp=1, tp=2, device_type="cuda") is None  # at the floor
    assert small_batch_warning(63, dp=1, tp=2, device_type="cuda") is not None  # 31.5 each
    assert small_batch_warning(8, dp=4, tp=2, device_type="cpu") is None  # a CPU is busy at any batch
