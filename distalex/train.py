"""Train the two-tower AlexNet: ``torchrun --nproc_per_node=2 -m distalex.train --config FILE``.

train() -> train_epoch() -> engine.train_step(); validation, checkpoints and MLflow at the edges.
Every rank runs this file; rank 0 alone prints, shows the progress bar and talks to MLflow.

Exit status: see ``distalex.jobs`` (0 finished, or stopped by SIGTERM or Ctrl-C after saving; 2 bad
input; 3 diverged; 4 a peer or the job's store lost; 6 stalled; 130 aborted; 143 a stop not done in
20 s). A failure on any rank ends every rank within seconds; 2, 3 and 130 end the job, not retried.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from distalex import allocator, determinism, signal_watch
from distalex.build import build_parallel_model, channels_last
from distalex.checkpoint import (
    CheckpointManager, RandomStreams, Resumed, TrainState, data_position_settings, latest_checkpoint,
)
from distalex.config import Config, ConfigError, absolute_paths, add_config_args, config_from_args, to_yaml
from distalex.data.augment import normalize
from distalex.data.info import DataError, read_info
from distalex.data.loader import EpochBatches, TrainLoader, ValLoader
from distalex.data.read import longest_stall_s
from distalex.engine import Engine, build_engine
from distalex.evaluate import evaluate
from distalex.jobs import EXIT_BAD_INPUT, EXIT_DIVERGED, exit_job, exit_now, report_failure
from distalex.model import build_model
from distalex.parallel.dims import (
    ParallelConfigError, ParallelDims, destroy_parallel, init_parallel, small_batch_warning,
)
from distalex.parallel.liveness import ON_END_S
from distalex.parallel.plan import full_state_dict, gather_full, is_sharded
from distalex.plateau import PlateauWatch, check_plateau
from distalex.progress import progress as progress_bar
from distalex.serving import training_settings
from distalex.steptime import StepTimes, epoch_report, gather, host_names, median_compute
from distalex.stopping import StopAgreement, StopRequested
from distalex.tracking import (
    METRIC_COMPUTE_MS, METRIC_DATA_WAIT, METRIC_EPOCH_LOSS, METRIC_IMAGES_PER_S, METRIC_LOSS, METRIC_LR,
    METRIC_SKIPPED, METRIC_STEPS_SKIPPED, METRIC_TOP1, METRIC_TOP5, METRIC_VAL_LOSS, Tracker,
)

LOADER_POLL_S = 0.2
"""While an epoch's loader starts, how often the ranks agree on a stop."""
STOP_TRACKER_CLOSE_S = 10.0
"""After a stop, how long MLflow may take to send what is queued: the job must be gone within the
cluster's grace period (Slurm's KillWait, 30 s by default) even when the server does not answer."""


class Diverged(RuntimeError):
    """The loss became NaN or inf."""


@dataclass
class Run:
    """What one training job holds, built in ``setup``."""

    cfg: Config
    dims: ParallelDims
    engine: Engine
    train_loader: TrainLoader
    val_loader: ValLoader
    checkpoints: CheckpointManager
    state: TrainState
    streams: RandomStreams
    lighting: torch.Generator
    tracker: Tracker
    run_dir: Path
    classes: list[str]
    agree: StopAgreement
    times: StepTimes
    hosts: list[str] | None
    """Rank 0: each rank's host, for the perf/<host>/ metrics and the straggler line (None elsewhere)."""
    saved: tuple | None = None
    """The train state this process last saved (a stop right after a save does not save it again)."""
    plateau: PlateauWatch | None = None
    """Whether the loss sits at ln(classes) (``distalex.plateau``); set in ``setup``."""


def setup(cfg: Config, dims: ParallelDims, stop: StopRequested) -> Run:
    cfg = absolute_paths(cfg)  # what the run saves must not depend on this directory
    determinism.choose_kernels(cfg.train.deterministic, dims.device)
    if dims.device.type == "cpu":
        allocator.keep_freed_memory()  # no page faults for the step's large tensors, every step
    info = read_info(cfg.data.train_shards, cfg.data.info)
    if info.num_classes != cfg.model.num_classes:
        raise DataError(
            f"{cfg.data.train_shards}: the shards hold {info.num_classes} classes but model.num_classes={cfg.model.num_classes}"
        )
    train_loader = TrainLoader(cfg.data, dims, cfg.train.batch_size, cfg.model.image_size, cfg.train.seed)
    val_loader = ValLoader(cfg.data, dims, train_loader.batch_size, cfg.model.image_size, ten_crop=cfg.train.eval_ten_crop)
    model = build_parallel_model(cfg, dims)
    engine = build_engine(model, cfg, dims)
    lighting = torch.Generator(device=dims.device).manual_seed(cfg.train.seed * 1_000_003 + dims.dp_rank)
    streams = RandomStreams({"lighting": lighting, **{f"dropout{i}": m.stream_on(dims.device) for i, m in enumerate(model.dropouts())}})
    position = data_position_settings(cfg, dims, train_loader.num_samples, train_loader.steps_per_epoch)
    prep, names = training_settings(cfg)
    checkpoints = CheckpointManager(cfg, dims, info.classes, position, {"class_names": names, "preprocessing": prep.to_dict()})
    checkpoints.check_shared_dir()
    state = TrainState(lr=cfg.optim.lr)
    found = checkpoints.resume(engine, state, streams)  # rank 0's choice, loaded by every rank
    resume, resumed = found if found is not None else (None, None)
    if resume is not None and dims.is_main:
        print(f"resumed from {resume} (step {state.step}, epoch {state.epoch}, batch {state.step_in_epoch})", flush=True)
    engine.lr = state.lr
    run_dir = cfg.run_dir
    tracker = Tracker.start(cfg, dims, run_dir, run_id=state.mlflow_run_id)
    if dims.liveness is not None:  # a rank ended by a lost peer still closes its MLflow run (a restart reopens it)
        dims.liveness.on_end = lambda: tracker.close("FAILED", timeout=ON_END_S)
    opened = (tracker.run_id, tracker.tracking_uri) if dims.is_main else None
    state.mlflow_run_id, state.mlflow_tracking_uri = dims.broadcast_object(opened)
    tracker.watch_host(cfg, dims, state.mlflow_run_id, state.mlflow_tracking_uri)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if resume is None:
            tracker.log_text(to_yaml(cfg), "config.yaml")
            tracker.log_datasets(cfg.data)
    run = Run(cfg, dims, engine, train_loader, val_loader, checkpoints, state, streams, lighting, tracker, run_dir,
              info.classes, StopAgreement(stop, dims), StepTimes(engine.module, dims.device), host_names(dims))
    if resumed is not None:
        continue_at_this_layout(run, resumed)
    run.plateau = PlateauWatch(cfg.model.num_classes, cfg.train.plateau_steps, cfg.train.plateau_margin)
    return run


def continue_at_this_layout(run: Run, resumed: Resumed) -> None:
    """Say what a resume at another layout changed, and apply the data-position rule: when the
    settings that split an epoch's samples over dp ranks, workers and steps changed (dp,
    data.workers, data.shuffle_buffer, data.train_samples, the shards), the saved position names no
    sample under the new ones, so the interrupted epoch ends at its saved step (validation and the
    LR rule run as at any epoch's end) and the run continues from the start of the next epoch.
    A change of tp alone moves no sample: the run continues exactly where it stopped."""
    state, steps = run.state, run.train_loader.steps_per_epoch
    if resumed.layout_changes and run.dims.is_main:
        print(f"resumed at {run.dims.describe()}: weights and momentum re-split ({', '.join(resumed.layout_changes)})", flush=True)
    if not resumed.position_changes or state.step_in_epoch == 0:
        return
    skipped = max(resumed.saved_steps_per_epoch - state.step_in_epoch, 0)
    message = (
        f"data position: {', '.join(resumed.position_changes)} since the checkpoint, so step {state.step_in_epoch} of "
        f"epoch {state.epoch + 1} means no sample now: epoch {state.epoch + 1} ends at it ({skipped} of its "
        f"{resumed.saved_steps_per_epoch} steps skipped) and the run continues from the start of epoch {state.epoch + 2}"
    )
    state.step_in_epoch = steps
    run.tracker.log_metrics({METRIC_STEPS_SKIPPED: float(skipped)}, step=state.step)
    run.tracker.log_text(message + "\n", f"resumes/step-{state.step:08d}.txt")
    if run.dims.is_main:
        print(message, flush=True)


def train_epoch(run: Run, progress) -> str | None:
    """The rest of the current epoch from the saved data position. Returns where a stop was
    agreed ("during loader start-up", "during training"), None at the epoch's end or train.max_steps."""
    cfg, dims, state, engine = run.cfg, run.dims, run.state, run.engine
    steps = run.train_loader.steps_per_epoch
    batches = run.train_loader.start(state.epoch, start_step=state.step_in_epoch)
    try:
        if not loader_started(batches, run.agree):
            save(run, flush=False)
            return "during loader start-up"
        # The loss stays on the device and is read every log_every steps: reading it is a sync.
        window_sum, window_n = torch.zeros((), device=dims.device), 0
        dims.progress.watch()  # from here a rank that stops finishing steps stalls the job (parallel.liveness)
        fetch = iter(batches)
        while True:
            try:
                batch = run.times.fetch(fetch)  # the time it waits for the batch is this rank's data wait
            except StopIteration:
                break
            x = normalize(batch.images, train=True, data_cfg=cfg.data, generator=run.lighting)
            if channels_last(cfg, dims.device):
                x = x.contiguous(memory_format=torch.channels_last)
            loss = engine.train_step(x, batch.labels)
            window_sum += loss
            window_n += 1
            state.step += 1
            state.step_in_epoch += 1
            dims.progress.step_done(state.step)
            stopping = run.agree.after_step()  # no wait: decided by the flags of one step ago, the same on every rank
            last = state.step_in_epoch == steps or state.step == cfg.train.max_steps
            periodic = cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0
            saving = stopping or (periodic and not last)  # the epoch's end is saved after validation
            # A save closes the loss window too, so the epoch's loss holds every step after a resume.
            if window_n == cfg.train.log_every or last or saving:
                mean = checked_loss(window_sum, window_n, run)  # sync point; a checkpoint only follows finite losses
                per_rank = gather(run.times.window(), dims)  # every rank's data wait and compute, on rank 0
                skipped = float(batch.skipped)  # a device tensor: read at log points only
                if per_rank is not None:
                    ips = window_n * cfg.train.batch_size / max(per_rank[0].wall, 1e-9)
                    data = max(t.data_percent for t in per_rank)  # the rank that waits most holds every rank up
                    run.tracker.log_metrics(
                        {METRIC_LOSS: mean, METRIC_LR: engine.lr, METRIC_IMAGES_PER_S: ips, METRIC_SKIPPED: skipped,
                         METRIC_DATA_WAIT: data, METRIC_COMPUTE_MS: 1000 * median_compute(per_rank)},
                        step=state.step,
                    )
                    if progress is not None:
                        progress.set_postfix(loss=f"{mean:.4f}", lr=f"{engine.lr:.2e}", img_s=f"{ips:.0f}",
                                             data=f"{data:.0f}%", refresh=False)
                state.epoch_loss_sum += mean * window_n
                state.epoch_loss_steps += window_n
                check_plateau(run.plateau, state.step, window_n, mean, run.tracker, dims.is_main)
                window_sum.zero_()
                window_n = 0
            if progress is not None:
                progress.update(1)
            if saving:
                save(run, flush=not stopping)
            if stopping:
                return "during training"
            if state.step == cfg.train.max_steps:
                break
        return None
    finally:
        dims.progress.unwatch()
        batches.close()


def loader_started(batches: EpochBatches, agree: StopAgreement) -> bool:
    """Wait for the first batch on every loading rank, agreeing on a stop every LOADER_POLL_S;
    False if a stop was agreed first."""
    while True:
        stop, busy = agree.poll(busy=not batches.ready(timeout=LOADER_POLL_S))
        if stop:
            return False
        if not busy:
            return True


def report_step_times(run: Run) -> None:
    """At an epoch's end: each host's data wait and compute, and a line naming any rank clearly
    slower than the median rank (``steptime.epoch_report``)."""
    per_rank = gather(run.times.end_epoch(), run.dims)
    if per_rank is not None:
        metrics, lines = epoch_report(per_rank, run.hosts, run.state.epoch + 1)
        run.tracker.log_metrics(metrics, step=run.state.step)
        for line in lines:
            print(line, file=sys.stderr, flush=True)


def checked_loss(window_sum: torch.Tensor, window_n: int, run: Run) -> float:
    """The mean loss of the window over all dp groups; raises Diverged if it is NaN or inf."""
    mean = mean_over_dp(window_sum / window_n, run.dims)
    if not math.isfinite(mean):
        raise Diverged(f"loss is {mean} at step {run.state.step} (epoch {run.state.epoch + 1})")
    return mean


def mean_over_dp(value: torch.Tensor, dims: ParallelDims) -> float:
    """The loss averaged over data-parallel groups (tp peers hold the same value). Each group's loss
    is weighted by its share of the global batch (``Engine.loss``), so this is the global batch's
    mean loss also where the groups' batches differ."""
    if dims.dp_enabled:
        value = value.detach().clone()
        dist.all_reduce(value, group=dims.dp_group)
        value /= dims.dp
    return value.item()


def save(run: Run, flush: bool = True) -> None:
    """A checkpoint of the current state, unless this process saved exactly this state already.
    ``flush=False`` on a stop: MLflow's queue is sent at exit, after the checkpoint is safe."""
    state = run.state
    key = (state.step, state.epoch, state.step_in_epoch, state.validated_step)
    if run.saved == key:
        return
    # The last checked loss came from before the last update, which can still have overflowed.
    finite = torch.stack([torch.isfinite(p).all() for p in run.engine.module.parameters()]).all()
    if run.dims.any_rank(not bool(finite)):  # one device sync
        raise Diverged(f"the weights hold NaN or inf after step {state.step} (epoch {state.epoch + 1})")
    with run.dims.progress.paused():  # a slow write is no stall
        if flush:
            run.tracker.flush()
        path = run.checkpoints.save(run.engine, state, run.streams)
    run.saved = key
    if run.dims.is_main:
        print(f"checkpoint: {path}", file=sys.stderr, flush=True)


def validate(run: Run) -> dict | None:
    """Validation of the current weights; None if a stop was agreed during it (within one batch)."""
    cfg = run.cfg
    return evaluate(run.engine.module, run.val_loader, run.dims, cfg.data, autocast=run.engine.autocast, poll_stop=run.agree.poll)


def end_of_epoch(run: Run, result: dict, t0: float) -> None:
    """After validating an epoch's weights: adjust the LR on a plateau, log, print, next epoch."""
    cfg, dims, state, engine = run.cfg, run.dims, run.state, run.engine
    train_loss = state.epoch_loss_sum / max(state.epoch_loss_steps, 1)  # over restarts too
    improved = result["top1_error"] < state.best_top1_error - 1e-6
    state.best_top1_error = min(state.best_top1_error, result["top1_error"])
    state.epochs_since_best = 0 if improved else state.epochs_since_best + 1
    if state.epochs_since_best > cfg.optim.lr_patience and state.lr > cfg.optim.min_lr:
        state.lr = max(state.lr * cfg.optim.lr_drop_factor, cfg.optim.min_lr)
        state.epochs_since_best = 0
        engine.lr = state.lr
    log_validation(run, result, {METRIC_EPOCH_LOSS: train_loss, "epoch": float(state.epoch + 1)})
    report_step_times(run)
    if dims.is_main:
        print(
            f"epoch {state.epoch + 1}/{cfg.train.epochs}: train loss {train_loss:.4f}, {describe(result, cfg)}, "
            f"lr {state.lr:.2e}, {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0


def end_at_max_steps(run: Run, result: dict) -> None:
    """Validation where train.max_steps ends a run inside an epoch: logged and printed, but a
    partial epoch neither counts for the LR plateau rule nor ends the epoch (a longer run resumed
    from here finishes it)."""
    log_validation(run, result, {})
    if run.dims.is_main:
        print(f"step {run.state.step} (train.max_steps, in epoch {run.state.epoch + 1}): {describe(result, run.cfg)}", flush=True)


def describe(result: dict, cfg: Config) -> str:
    return (
        f"val top-1 error {100 * result['top1_error']:.2f}%, top-5 error {100 * result['top5_error']:.2f}% "
        f"({result['samples']} images{', 10-crop' if cfg.train.eval_ten_crop else ''})"
    )


def log_validation(run: Run, result: dict, extra: dict) -> None:
    metrics = {METRIC_TOP1: result["top1_error"], METRIC_TOP5: result["top5_error"], METRIC_VAL_LOSS: result["loss"], **extra}
    run.tracker.log_metrics(metrics, step=run.state.step)
    log_kernels(run)


def log_kernels(run: Run) -> None:
    """The conv1 kernel picture (the paper's Figure 3) and each tower's colour statistic, to MLflow."""
    from distalex.report.kernels import kernel_summary  # matplotlib: only where the picture is drawn

    conv1 = run.engine.module.conv1.weight
    if run.dims.dp_rank != 0:
        return
    full = gather_full(conv1, is_sharded(conv1), 0, run.dims.tp_group)  # (96, 3, 11, 11) at width 1
    if run.dims.is_main:
        png = run.run_dir / "kernels" / f"conv1-step{run.state.step:08d}.png"
        stats = kernel_summary(full.float().cpu(), run.cfg.model.towers, png)
        run.tracker.log_metrics(stats, step=run.state.step)
        run.tracker.log_artifact(png, "kernels")


def finish(run: Run) -> Path | None:
    """Export the serial model (rank 0 writes it), log it as an artifact and as an MLflow model."""
    from distalex.export import save_serial_model
    from distalex.serving import log_mlflow_model

    if run.dims.dp_rank != 0:
        return None
    state = full_state_dict(run.engine.module, run.dims.tp_group)
    if not run.dims.is_main:
        return None
    prep, names = training_settings(run.cfg)
    mlflow_run = {"run_id": run.state.mlflow_run_id, "tracking_uri": run.state.mlflow_tracking_uri} if run.state.mlflow_run_id else None
    path = save_serial_model(run.run_dir / "model.pt", state, run.cfg.model, run.classes, names, prep,
                             run.cfg.data.model_dump(), mlflow_run)
    run.tracker.log_artifact(path)
    serial = build_model(run.cfg.model)
    serial.load_state_dict(state)
    register_as = run.cfg.tracking.register_as
    uri = log_mlflow_model(run.tracker, serial, prep, run.classes, names, step=run.state.step, register_as=register_as,
                           model_config=run.cfg.model.model_dump())
    if uri:
        print(f"MLflow model: {uri}" + (f" (registered as {register_as})" if register_as else ""), flush=True)
    return path


def run_epochs(run: Run, progress) -> str | None:
    """Train, validate and save to the end. Returns where a stop was agreed, None when done."""
    cfg, state = run.cfg, run.state
    steps = run.train_loader.steps_per_epoch
    while state.epoch < cfg.train.epochs:
        t0 = time.perf_counter()
        if state.step_in_epoch < steps and not at_max_steps(run):
            where = train_epoch(run, progress)
            if where is not None:
                return where
        epoch_done = state.step_in_epoch == steps
        if not epoch_done and state.validated_step == state.step:
            break  # stopped by train.max_steps, validated already
        if run.agree.now():
            save(run, flush=False)
            return "before validation"
        result = validate(run)
        if result is None:
            save(run, flush=False)
            return "during validation"
        state.validated_step = state.step
        if epoch_done:
            end_of_epoch(run, result, t0)
        else:
            end_at_max_steps(run, result)
        save(run)
        if run.agree.now():
            return "after the epoch-end checkpoint"
        if at_max_steps(run):
            break
    return None


def at_max_steps(run: Run) -> bool:
    return run.cfg.train.max_steps is not None and run.state.step >= run.cfg.train.max_steps


def train(cfg: Config, dims: ParallelDims, stop: StopRequested) -> int:
    run = setup(cfg, dims, stop)
    state = run.state
    steps = run.train_loader.steps_per_epoch
    total = cfg.train.max_steps or cfg.train.epochs * steps
    progress = None
    if dims.is_main:
        print(f"distalex: {dims.describe()}, {steps} steps/epoch of {dims.describe_batch(cfg.train.batch_size)}", flush=True)
        warning = small_batch_warning(cfg.train.batch_size, dims.dp, dims.tp, dims.device.type)
        if warning is not None:
            warnings.warn(warning, stacklevel=2)
        progress = progress_bar(total, "train", "step", initial=state.step, interval_s=cfg.train.progress_interval_s,
                                dynamic_ncols=True)
    status = "FAILED"
    stop.started = True  # from here a stop saves where training is
    try:
        where = run_epochs(run, progress)
        if where is not None:
            status = "KILLED"
            if dims.is_main:
                print(f"stopped by {stop.describe()} at step {state.step} ({where}); resume continues from the checkpoint",
                      flush=True)
            return 0
        model_path = finish(run)
        status = "FINISHED"
        if dims.is_main:
            progress.close()
            print(f"run directory: {run.run_dir}\nmodel: {model_path}\ncheckpoints: {run.checkpoints.root}", flush=True)
            run.tracker.print_location()
        return 0
    except Diverged as e:  # every rank sees the same loss and the same weight check: no one to tell
        if dims.is_main:
            last = latest_checkpoint(run.checkpoints.root)
            print(f"error: {e}; stopping. The last good checkpoint is {last or '(none yet)'}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except BaseException as e:
        report_failure(dims, e)  # the other ranks end now, not after the MLflow run is closed below
        raise
    finally:
        stop.finishing = True  # a later Ctrl-C must not cut off the end of the MLflow run
        if progress is not None:
            progress.close()
        run.times.close()
        if stop.aborted:
            status = "KILLED"
        if status == "KILLED":
            run.tracker.close(status, timeout=STOP_TRACKER_CLOSE_S)
        else:
            run.tracker.close(status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distalex.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    stop = StopRequested()  # first: a SIGTERM during start-up ends the process at once, a later one saves
    stop.hear_while_blocked()
    try:  # ends with exit_job (SystemExit) or exit_now (the process's end)
        try:
            cfg = config_from_args(args)  # exits 2 on a bad config, before any process group exists
            par = cfg.parallel
            if cfg.train.deterministic:
                determinism.prepare(par.device)  # before the first CUDA call
            dims = init_parallel(par.tp, cfg.model.towers, par.device, par.timeout_s, par.layout, par.peer_timeout_s,
                                 max(par.progress_timeout_s, longest_stall_s(cfg.data)))
        except (ConfigError, ParallelConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            exit_job(EXIT_BAD_INPUT)
        except SystemExit as e:  # config_from_args printed the error
            exit_job(e.code)
        try:
            code = train(cfg, dims, stop)
        except BaseException as e:  # noqa: BLE001 - every failure ends every rank, with one line
            exit_now(report_failure(dims, e))
        destroy_parallel(dims)
        exit_job(code)
    finally:  # a process that goes on (a test that called main) is not ended by a signal meant for this run
        signal_watch.unfollow(stop)


if __name__ == "__main__":
    main()
