"""A run saved at dp=2 x tp=2 resumes at dp=1 x tp=2, dp=2 x tp=1 and dp=1 x tp=1 (torchrun, DDP).

The uninterrupted run: 4 processes, 2 epochs of 4 steps, a checkpoint every 2 steps. Each resume
starts from a copy of its run folder holding only the checkpoint of step 2 (half way through
epoch 1), so the job continues the same MLflow run. The documented rule (docs/training.md, "Resuming at
another layout"):

- tp alone moves no sample (tp rank 0 of each dp group loads; the sample windows are per dp rank):
  dp=2 x tp=1 continues step for step and ends with the uninterrupted run's weights, up to the
  summation order of the tp reductions: RTOL relative per tensor (measured: below 1e-6).
- a new dp splits an epoch's samples differently, so the saved position names no sample: epoch 1
  ends at step 2 (2 steps skipped, logged), is validated, and epoch 2 runs whole. dp=1 x tp=2 and
  dp=1 x tp=1 both train on the same batches with the same dropout masks and learning rate then,
  which their per-step losses show (logged every step in these two resumes). Their weights are not
  compared at the end: a float32 max-pool window whose two largest inputs lie within rounding of
  each other sends its gradient to whichever the convolution's summation order makes larger, and
  that order differs between a grouped conv (tp=1) and one tower per rank (tp=2). With an earlier
  LRN implementation's rounding one pool5 window of 1024 did so at step 4 (inputs 0.350093612 and
  0.350093589, 2.4e-8 apart in float64, under float32's spacing of 3.0e-8 there): that step's conv
  gradients differed by 8e-3 (relative), the final weights by 1.3e-2, the losses by at most 1.1e-5
  (relative). The current code meets no such window here (the losses agree exactly); the test
  does not count on that.

The DeepSpeed side (ZeRO's momentum re-cut for a new dp) is checked at the engine level in
tests/test_engine_deepspeed.py, where DeepSpeed's start-up is paid once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from distalex.checkpoint import complete_checkpoints, load_serial_state
from tests.runs import launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

RTOL = 1e-5
SAVED_STEP = 2
SETTINGS = {"train.epochs": 2, "data.train_samples": 128, "checkpoint.every_steps": 2, "train.log_every": 3}
TARGETS = {"dp2xtp1": (2, 1), "dp1xtp2": (2, 2), "dp1xtp1": (1, 1)}  # processes, tp
DP1_TARGETS = ("dp1xtp2", "dp1xtp1")
DP1_SETTINGS = {"train.log_every": 1}  # a loss per step, to compare the two dp=1 resumes step by step
LOSS_RTOL = 1e-4
"""Per-step losses of the two dp=1 resumes after their first step: 9x the 1.1e-5 measured. Another dp
rank's dropout masks move the first resumed step's loss by 2.5e-2, another batch of epoch 2 by 3.7e-2
or more."""


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def checkpoints(workdir: Path) -> Path:
    return workdir / "runs" / "tiny" / "checkpoints"


def mlflow_run(workdir: Path):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distalex").experiment_id])
    assert len(runs) == 1
    return client, runs[0].info.run_id


def history(workdir: Path, metric: str) -> dict[int, float]:
    """The metric per step, the latest value where a resume logged a step again (its copy of the run holds the
    uninterrupted run's values too)."""
    client, run_id = mlflow_run(workdir)
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp)}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp2xtp2")
    proc = launch(workdir, tiny_overrides(tiny_shards, run_name="tiny", **SETTINGS), nproc=4, timeout=400)
    assert_ok(proc)
    return workdir


@pytest.fixture(scope="module")
def resume(uninterrupted, tiny_shards, tmp_path_factory):
    """resume(target) -> (workdir, completed torchrun): each target run once per module."""
    done = {}

    def run(target: str):
        if target not in done:
            workdir = tmp_path_factory.mktemp(target)
            shutil.copytree(uninterrupted / "runs", workdir / "runs")
            for ckpt in complete_checkpoints(checkpoints(workdir)):
                if ckpt.name != f"step-{SAVED_STEP:08d}":
                    shutil.rmtree(ckpt)
            nproc, tp = TARGETS[target]
            settings = SETTINGS | (DP1_SETTINGS if target in DP1_TARGETS else {}) | {"parallel.tp": tp}
            overrides = tiny_overrides(tiny_shards, run_name="tiny", **settings)
            proc = launch(workdir, overrides, nproc=nproc, timeout=300)
            assert_ok(proc)
            done[target] = workdir, proc
        return done[target]

    return run


@pytest.mark.parametrize("target", list(TARGETS))
def test_resume_at_another_layout(uninterrupted, resume, target):
    workdir, proc = resume(target)
    ref = load_serial_state(checkpoints(uninterrupted))[0]
    final = json.loads((complete_checkpoints(checkpoints(workdir))[-1] / "meta.json").read_text())
    assert f"resumed from {checkpoints(workdir) / f'step-{SAVED_STEP:08d}'} (step {SAVED_STEP}," in proc.stdout
    assert mlflow_run(workdir)[1] == mlflow_run(uninterrupted)[1]  # the same MLflow run continues
    assert final["world"]["dp"] * final["world"]["tp"] == TARGETS[target][0]
    if target == "dp2xtp1":  # exact in data: the uninterrupted run's steps, weights and epoch losses
        assert "weights and momentum re-split (tp 2 -> 1)" in proc.stdout and "data position" not in proc.stdout
        assert final["train_state"]["step"] == 8 and final["train_state"]["epoch"] == 2
        weights = load_serial_state(checkpoints(workdir))[0]
        worst = max(max_rel(weights[k], ref[k]) for k in ref)
        print(f"\n{target}: final weights within {worst:.1e} (relative) of the uninterrupted run")
        assert worst <= RTOL
        # the step-2 checkpoint closed the loss window of steps 1-2: epoch 1's loss holds all 4 steps
        epoch_loss, ref_loss = history(workdir, "train/epoch_loss"), history(uninterrupted, "train/epoch_loss")
        assert sorted(epoch_loss) == sorted(ref_loss) == [4, 8]
        assert all(abs(epoch_loss[s] - ref_loss[s]) <= RTOL * ref_loss[s] for s in ref_loss), (epoch_loss, ref_loss)
    else:  # epoch 1 ends at step 2, epoch 2 runs whole: steps 3-6
        assert ("weights and momentum re-split (dp 2 -> 1" in proc.stdout) and "data position: dp 2 -> 1" in proc.stdout
        assert "epoch 1 ends at it (2 of its 4 steps skipped)" in proc.stdout
        assert final["train_state"]["step"] == 6 and final["train_state"]["epoch"] == 2
        assert history(workdir, "train/epoch_steps_skipped") == {SAVED_STEP: 2.0}
        assert SAVED_STEP in history(workdir, "val/top1_error")  # the shortened epoch was validated


def test_both_dp1_resumes_train_on_the_same_batches(resume):
    """The dp=1 resumes (tp=2 and tp=1) take the same batches, dropout masks and learning rate.

    The first resumed step's loss is a forward pass of the same re-split weights on the same batch
    with the same masks, continuous in all of them: equal to RTOL. Later losses follow weights that
    a max-pool tie may have moved (module docstring): equal to LOSS_RTOL. A different batch or mask
    moves a loss by far more; the learning rates are compared as they are."""
    (tp2_dir, _), (tp1_dir, _) = (resume(t) for t in DP1_TARGETS)
    losses = {d: history(d, "train/loss") for d in (tp2_dir, tp1_dir)}
    steps = [3, 4, 5, 6]  # epoch 2, logged by the resumes (the copied run also holds steps 7 and 8)
    assert all(s in losses[d] for s in steps for d in losses)
    rel = {s: abs(losses[tp2_dir][s] - losses[tp1_dir][s]) / losses[tp1_dir][s] for s in steps}
    print(f"\ndp1xtp2 vs dp1xtp1: per-step loss within {', '.join(f'{r:.1e}' for r in rel.values())} (relative)")
    assert rel[steps[0]] <= RTOL, rel
    assert all(r <= LOSS_RTOL for r in rel.values()), rel
    lr = {d: history(d, "train/lr") for d in (tp2_dir, tp1_dir)}
    assert [lr[tp2_dir][s] for s in steps] == [lr[tp1_dir][s] for s in steps]
    # the validation that closed the shortened epoch 1 (the LR rule's input) saw the same weights
    for metric in ("val/loss", "val/top1_error"):
        a, b = (history(d, metric)[SAVED_STEP] for d in (tp2_dir, tp1_dir))
        assert abs(a - b) <= RTOL * abs(b), (metric, a, b)
