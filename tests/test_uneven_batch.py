"""A global batch that dp does not divide: the step is still the serial step on the whole batch.

dp=3 x tp=2 (6 gloo processes, one run for both layouts) with ``train.batch_size=10``: the dp
groups take 4, 3 and 3 images (``ParallelDims.dp_batches``), and under the hybrid layout their tp
peers split those 2 + 2, 2 + 1 and 2 + 1. Built as ``distalex.train`` builds it (``build_parallel_model``,
``build_engine``: DDP over dp with each group's loss weighted by ``Engine.loss``), 3 SGD steps with
momentum, weight decay and dropout on (each dp group's own masks, drawn by the serial reference
too) equal the serial net's on the 10 images: the logged loss (``train.mean_over_dp``), every
gradient of the first step and every weight after the last, to the 1e-5 relative tolerance of
``tests/test_tensor_parallel.py``. The split and the warning about a GPU's share are checked
without processes; a torchrun job at dp=3 with a batch of 32 trains, validates every image and
resumes mid-epoch to the uninterrupted run's weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from distalex.config import Config
from distalex.engine import DDPEngine, build_engine
from distalex.parallel.dims import GPU_IMAGES_FLOOR, ParallelConfigError, ParallelDims, init_parallel, small_batch_warning
from distalex.parallel.plan import full_grads, full_state_dict
from distalex.build import build_parallel_model
from distalex.train import mean_over_dp
from distalex.checkpoint import complete_checkpoints
from tests.distributed import run_workers
from tests.runs import launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture
from tests.test_resume import assert_ok, checkpoints, history
from tests.test_tensor_parallel import CLASSES, LR, MOMENTUM, SIZE, STEPS, WD, WIDTH, DPGroupDropout, assert_close_rel, data

GLOBAL, DP, TP = 10, 3, 2
LAYOUTS = ("towers", "hybrid")
RESUME_RTOL = 1e-5
"""The first loss window after a resume: the same batches, masks and weights; only step 4's gradient
average is summed in another order (~1e-7 relative). Another batch moves it by 1e-2 or more."""


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


@pytest.mark.slow  # 6 processes: 20-60 s on 2 shared cores
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
    assert "train.compile=true" in warning and f"below {GPU_IMAGES_FLOOR}" in warning
    assert small_batch_warning(128, dp=12, tp=1, device_type="cuda") is not None  # 10 or 11 per GPU
    assert small_batch_warning(128, dp=1, tp=2, device_type="cuda") is None  # the paper's pair: 64 each
    assert small_batch_warning(64, dp=1, tp=2, device_type="cuda") is None  # at the floor
    assert small_batch_warning(63, dp=1, tp=2, device_type="cuda") is not None  # 31.5 each
    assert small_batch_warning(8, dp=4, tp=2, device_type="cpu") is None  # a CPU is busy at any batch


@pytest.mark.e2e
def test_dp3_job_at_batch_32_trains_validates_and_resumes(tiny_shards, tmp_path):
    """torchrun, 3 processes at tp=1: each step's 32 images go 11, 11 and 10 to the dp ranks. The
    uninterrupted run (2 epochs of 7 steps, a checkpoint every 3) logs finite losses and validates
    every validation image. A copy of it that holds only the checkpoint of step 3 (mid-epoch)
    resumes there and trains the same batches: its first loss window (steps 4 and 5) equals the
    uninterrupted run's to RESUME_RTOL. Not bit for bit: the first DDP step after a start sums each
    gradient over 3 ranks in another order than the later ones (docs/training.md, "Checkpoints")."""
    overrides = tiny_overrides(tiny_shards, run_name="tiny", **{"parallel.tp": 1})
    full = tmp_path / "full"
    proc = launch(full, overrides, nproc=3, timeout=400)
    assert_ok(proc)
    assert "world=3 (dp=3 x tp=1)" in proc.stdout and "7 steps/epoch of 32 images, per dp rank 11 or 10" in proc.stdout
    val_images = json.loads((tiny_shards / "_info.json").read_text())["splits"]["val"]["count"]
    assert proc.stdout.count(f"({val_images} images)") == 2, proc.stdout  # each epoch's validation, over dp
    ref = history(full, "train/loss")
    assert sorted(ref) == [2, 3, 5, 6, 7, 9, 11, 12, 14], ref  # log_every 2, and at each save and epoch end
    assert all(math.isfinite(v) and v > 0 for v in ref.values()), ref

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "runs", resumed / "runs")
    for ckpt in complete_checkpoints(checkpoints(resumed)):
        if ckpt.name != "step-00000003":
            shutil.rmtree(ckpt)
    proc = launch(resumed, overrides, nproc=3, timeout=400)
    assert_ok(proc)
    assert f"resumed from {checkpoints(resumed) / 'step-00000003'} (step 3, epoch 0, batch 3)" in proc.stdout
    assert "data position" not in proc.stdout and "epoch 2/2" in proc.stdout  # the epoch went on from step 3
    final = json.loads((complete_checkpoints(checkpoints(resumed))[-1] / "meta.json").read_text())
    assert final["train_state"]["step"] == 14 and final["train_state"]["epoch"] == 2
    got = history(resumed, "train/loss")  # the copied run's values, then the resume's where it logged again
    rel = abs(got[5] - ref[5]) / ref[5]
    print(f"\ndp=3 resume at step 3: the loss of steps 4-5 within {rel:.1e} (relative) of the uninterrupted run's")
    assert rel <= RESUME_RTOL, (got[5], ref[5])
    assert all(math.isfinite(v) for v in got.values())
