"""End-to-end training under torchrun on CPU: tp=2 runs, kill-and-resume, SIGTERM, export, bad input.

Every run here is the demo config shortened (tests/runs.py): real JPEG shards, 2 gloo ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch

from distalex.checkpoint import complete_checkpoints, load_serial_state
from tests.runs import launch, run_env, tiny_overrides, tiny_shards, torchrun_cmd  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

KILL_WAIT_S = 30  # Slurm's default time from SIGTERM to SIGKILL


def final_state(workdir: Path, name: str) -> dict[str, torch.Tensor]:
    state, _, _ = load_serial_state(workdir / "runs" / name / "checkpoints")
    return state


def mlflow_runs(workdir: Path):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("distalex")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def assert_ok(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def reference_run(tiny_shards, tmp_path_factory):
    """An uninterrupted tp=2 run: the baseline the interrupted runs must equal."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = launch(workdir, tiny_overrides(tiny_shards, run_name="tiny"))
    assert_ok(proc)
    return workdir, proc


def test_run_trains_checkpoints_and_tracks(reference_run):
    workdir, proc = reference_run
    assert "epoch 2/2" in proc.stdout and "val top-1 error" in proc.stdout
    ckpts = complete_checkpoints(workdir / "runs" / "tiny" / "checkpoints")
    assert ckpts, "no checkpoint written"
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert meta["train_state"]["epoch"] == 2 and meta["layout"]["tp"] == 2
    assert (workdir / "runs" / "tiny" / "model.pt").is_file()
    client, runs = mlflow_runs(workdir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == meta["train_state"]["mlflow_run_id"]
    assert run.data.params["parallel.tp"] == "2" and run.data.params["model.width"] == "0.125"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) >= 4 and all(m.value > 0 for m in losses)
    assert len(client.get_metric_history(run.info.run_id, "val/top1_error")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in artifacts and "config.yaml" in artifacts


def find_workers(parent_pid: int) -> list[int]:
    """Worker processes of a torchrun agent (its children running distalex.train)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent_pid and "distalex.train" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_killed_rank_restarts_and_resumes_to_the_same_weights(reference_run, tiny_shards, tmp_path, resume):
    """SIGKILL one rank after the first checkpoint: torchrun restarts the job, which resumes from
    the latest complete checkpoint and ends with the uninterrupted run's weights, in one MLflow run.
    Started with checkpoint.resume=none too: the restart is the same job, so it resumes the
    checkpoints that job saved (a new job would be refused by them)."""
    ref_dir, _ = reference_run
    ckpt_root = tmp_path / "runs" / "tiny" / "checkpoints"
    proc = subprocess.Popen(
        torchrun_cmd(2, max_restarts=1) + tiny_overrides(tiny_shards, run_name="tiny", **{"checkpoint.resume": resume}),
        cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        if complete_checkpoints(ckpt_root):
            workers = find_workers(proc.pid)
            if workers:
                killed = max(workers)
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, f"never saw a checkpoint and a worker to kill\n{err[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-6000:]}"
    assert "resumed from" in out
    assert ("a restart of this job: it resumes the checkpoints it saved" in err) == (resume == "none"), err[-3000:]
    ref, resumed = final_state(ref_dir, "tiny"), final_state(tmp_path, "tiny")
    for name, tensor in ref.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after kill-and-resume"
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1, "a restarted job must continue the same MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    ref_client, ref_runs = mlflow_runs(ref_dir)
    assert max(steps) == max(m.step for m in ref_client.get_metric_history(ref_runs[0].info.run_id, "train/loss"))


def test_sigterm_saves_a_checkpoint_then_exits(tiny_shards, tmp_path):
    ckpt_root = tmp_path / "runs" / "term" / "checkpoints"
    proc = subprocess.Popen(
        torchrun_cmd(2) + tiny_overrides(tiny_shards, run_name="term", **{"checkpoint.every_steps": 0, "train.epochs": 20}),
        cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    started = tmp_path / "runs" / "term" / "config.yaml"  # written once set-up is done
    deadline = time.time() + 120
    while time.time() < deadline and not started.exists():
        time.sleep(0.1)
    time.sleep(1.5)  # into the first epoch, before its end
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert "stopped by SIGTERM" in out, err[-4000:]
    # The whole job, torchrun included, is gone well within Slurm's default KillWait (30 s).
    print(f"\nSIGTERM to torchrun's exit: {took:.1f} s")
    assert took < KILL_WAIT_S * 2 / 3
    ckpts = complete_checkpoints(ckpt_root)
    assert ckpts, "SIGTERM must leave a checkpoint"
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert meta["train_state"]["step"] > 0


def test_export_evaluates_the_same_at_tp1_as_the_tp2_run(reference_run, tiny_shards, tmp_path):
    workdir, proc = reference_run
    model = workdir / "runs" / "tiny" / "model.pt"
    blob = torch.load(model, weights_only=True)  # plain torch can read it
    assert blob["model_config"]["towers"] == 2
    data = ["--config", str(workdir / "runs" / "tiny" / "config.yaml")]  # the run's data settings
    serial = subprocess.run([*evaluate_cmd(), str(model), *data, "--set", "parallel.tp=1"], capture_output=True, text=True, env=run_env())
    assert serial.returncode == 0, serial.stderr[-3000:]
    tp2 = subprocess.run(
        [*torchrun_eval_cmd(), str(workdir / "runs" / "tiny" / "checkpoints"), *data, "--set", "parallel.tp=2"],
        capture_output=True, text=True, env=run_env(),
    )
    assert tp2.returncode == 0, tp2.stderr[-3000:]
    err1, err2 = error_of(serial.stdout), error_of(tp2.stdout)
    assert err1[:2] == err2[:2]
    assert abs(err1[2] - err2[2]) <= 1e-5 * err1[2], (err1, err2)  # the loss: only summation order differs
    # ... and what the training run reported for its last epoch
    last_epoch = [line for line in proc.stdout.splitlines() if line.startswith("epoch 2/2")][0]
    assert f"top-1 error {err1[0]}" in last_epoch


def evaluate_cmd():
    return [os.environ.get("PYTHON", "python3"), "-m", "distalex.evaluate"]


def torchrun_eval_cmd():
    return [os.environ.get("PYTHON", "python3"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "distalex.evaluate"]


def error_of(stdout: str) -> tuple[str, str, float]:
    line = [ln for ln in stdout.splitlines() if "top-1 error" in ln][-1]
    top1 = line.split("top-1 error ")[1].split("%")[0] + "%"
    top5 = line.split("top-5 error ")[1].split("%")[0] + "%"
    return top1, top5, float(line.split("loss ")[1].split()[0])


# ----------------------------------------------------------------------------- bad input


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_shards, tmp_path):
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="nan", **{"optim.lr": 1e6, "checkpoint.every_steps": 1}))
    assert proc.returncode != 0
    # the loss of a step is checked, and the weights before a save (the update after a finite loss can overflow)
    assert any(m in proc.stderr.lower() for m in ("loss is nan", "loss is inf", "weights hold nan or inf")), proc.stderr[-3000:]
    assert "last good checkpoint" in proc.stderr
    for ckpt in complete_checkpoints(tmp_path / "runs" / "nan" / "checkpoints"):
        state, _, _ = load_serial_state(ckpt)
        assert all(torch.isfinite(t).all() for t in state.values()), f"{ckpt} holds non-finite weights"


def test_resume_with_a_different_model_batch_size_or_seed_is_refused(reference_run, tiny_shards, tmp_path):
    ref_dir, _ = reference_run
    ckpts = ref_dir / "runs" / "tiny" / "checkpoints"
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="other", **{"checkpoint.resume": ckpts, "model.width": 0.25}))
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert "model.width: checkpoint 0.125, now 0.25" in proc.stderr, proc.stderr[-3000:]
    changed = {"checkpoint.resume": ckpts, "train.batch_size": 16, "train.seed": 5}
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="other", **changed))
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr  # torchrun reports the workers' status 2
    assert "a resumed run cannot change train.batch_size: checkpoint 32, now 16; train.seed: checkpoint 0, now 5" in proc.stderr, proc.stderr[-3000:]


def test_hybrid_layout_trains_like_towers_and_the_other_layout_is_refused(reference_run, tiny_shards, tmp_path):
    """The reference run's config under ``parallel.layout: hybrid`` (the loader scatters each rank its
    samples) trains the same net: the first two checkpoints (steps 3 and 6) hold the same weights
    within 1e-5 relative, as the parity tests require, and every logged loss agrees within 1e-4.
    Only the first checkpoints: the layouts round differently, and a few steps later (step 10-12 on
    this data) one fc6 unit's pre-activation, within rounding of zero for one image, falls on the
    other side of the ReLU; from then on the runs differ by that image's share of a gradient
    (measured: weights 3e-7 apart at step 9, fc6.bias 6e-3 at step 12, losses within 1e-5 throughout).
    Checkpoints say which parameters are split; resuming under the other layout is refused by name
    with exit status 2, both ways."""
    ref_dir, _ = reference_run
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="hy", **{"parallel.layout": "hybrid"}))
    assert_ok(proc)
    assert "layout=hybrid" in proc.stdout
    ckpts = tmp_path / "runs" / "hy" / "checkpoints"
    meta = json.loads((complete_checkpoints(ckpts)[-1] / "meta.json").read_text())
    assert meta["layout"]["layout"] == "hybrid" and meta["layout"]["tp"] == 2
    assert meta["partition"]["conv1.weight"] is None and meta["partition"]["fc6.weight"] == 1  # replicated / split
    ref_ckpts = ref_dir / "runs" / "tiny" / "checkpoints"
    for ref_step, step in zip(complete_checkpoints(ref_ckpts)[:2], complete_checkpoints(ckpts)[:2]):
        assert ref_step.name == step.name
        ref, hybrid = load_serial_state(ref_step)[0], load_serial_state(step)[0]
        for name, tensor in ref.items():
            err = (hybrid[name] - tensor).abs().max().item()
            assert err <= 1e-5 * tensor.abs().max().item(), f"{step.name} {name}: {err:.2e}"
    losses = []
    for workdir in (ref_dir, tmp_path):
        client, runs = mlflow_runs(workdir)
        losses.append({m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")})
    assert losses[0].keys() == losses[1].keys() and len(losses[0]) >= 4
    for step, value in losses[0].items():
        assert abs(losses[1][step] - value) <= 1e-4 * value, (step, losses[1][step], value)
    for resume, layout, saved in ((ckpts, "towers", "hybrid"), (ref_ckpts, "hybrid", "towers")):
        proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="x", **{"checkpoint.resume": resume, "parallel.layout": layout}))
        assert proc.returncode != 0 and "exitcode: 2" in proc.stderr, proc.stderr[-3000:]
        assert f"parallel.layout: checkpoint {saved}, now {layout}" in proc.stderr, proc.stderr[-3000:]


def test_corrupt_or_partial_checkpoint_is_refused_with_its_path(reference_run, tiny_shards, tmp_path):
    ref_dir, _ = reference_run
    src = complete_checkpoints(ref_dir / "runs" / "tiny" / "checkpoints")[-1]
    partial = tmp_path / "ckpts" / "step-00000099"
    partial.mkdir(parents=True)
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="p", **{"checkpoint.resume": partial}))
    # torchrun itself exits 1 and reports the workers' status 2 (bad input)
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert f"{partial}: incomplete checkpoint" in proc.stderr, proc.stderr[-3000:]
    corrupt = tmp_path / "ckpts" / src.name
    subprocess.run(["cp", "-r", str(src), str(corrupt)], check=True)
    shard = corrupt / "model-tp01.pt"
    shard.write_bytes(shard.read_bytes()[: 1000])
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="c", **{"checkpoint.resume": corrupt}))
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert f"{corrupt}/model-tp01.pt: 1000 bytes where " in proc.stderr, proc.stderr[-3000:]
    assert corrupt.is_dir()  # asked for by path: left where it is


def test_bad_layout_and_data_fail_fast(tiny_shards, tmp_path):
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="x"), nproc=3, timeout=120)
    assert proc.returncode != 0 and "world size 3 is not divisible by parallel.tp=2" in proc.stderr
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="x", **{"data.train_shards": tmp_path / "nowhere"}), timeout=120)
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr.split("error")[0]
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="x") + ["--set", "optim.lrr=1"], timeout=120)
    assert proc.returncode != 0 and "optim.lrr: unknown key, did you mean optim.lr?" in proc.stderr
