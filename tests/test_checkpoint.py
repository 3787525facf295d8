"""Checkpoint files in one process: a kill at any file operation of a save leaves a resumable
checkpoint; resume refuses a changed batch size or seed and reports data-position changes; random
streams and shards are read with weights_only=True; only a checkpoint whose files fail their
recorded size and CRC-32 is moved aside, any other load error keeps every checkpoint; each run
owns its checkpoints (pruning, resume, a new run in a used folder, a restart of the same job).

A "kill" here is an exception raised instead of the n-th rename, replace, unlink or rmdir the save
makes (shutil.rmtree's own deletions included): what the folder looks like at that moment is what
a SIGKILL there would leave. Every n is tried, from the first operation to past the last.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from distalex.checkpoint import (
    META, CheckpointError, CheckpointManager, CheckpointReadError, RandomStreams, TrainState, UnreadableCheckpoint,
    complete_checkpoints, latest_checkpoint, load_serial_state, rng_file, rng_source_rank,
)
from distalex.checkpoint.folders import save_durably
from distalex.config import Config
from distalex.engine import DDPEngine
from distalex.parallel.dims import ParallelDims
from tests.distributed import run_workers
from tests.test_tensor_parallel import tiny_model


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup code catches it."""


FILE_OPS = ("rename", "replace", "unlink", "rmdir")


def kill_at(monkeypatch, n: int) -> list[int]:
    """Raise Killed instead of the n-th (0-based) file operation; returns [operations done]."""
    done = [0]

    def wrap(real):
        def op(*args, **kwargs):
            if done[0] == n:
                raise Killed
            done[0] += 1
            return real(*args, **kwargs)

        return op

    for name in FILE_OPS:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    return done


def make_cfg(root: Path, keep: int = 1, **train) -> Config:
    return Config.model_validate({
        "model": {"num_classes": 10, "width": 1 / 16, "image_size": 63},
        "parallel": {"tp": 1, "device": "cpu"},
        "train": {"batch_size": 8, **train},
        "checkpoint": {"dir": str(root), "keep": keep},
    })


def engine(cfg: Config) -> DDPEngine:
    e = DDPEngine(tiny_model(), cfg, ParallelDims())
    x, y = torch.randn(4, 3, 63, 63), torch.randint(0, 10, (4,))
    e.train_step(x, y)  # momentum exists
    return e


def weights(e: DDPEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in e.module.state_dict().items()}


def loaded(cfg: Config, folder: Path) -> tuple[dict[str, torch.Tensor], TrainState]:
    fresh, state = DDPEngine(tiny_model(), cfg, ParallelDims()), TrainState()
    CheckpointManager(cfg, ParallelDims()).load(folder, fresh, state, RandomStreams())
    return weights(fresh), state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scenario", ["re-save step 5", "save step 6, prune step 5"])
def test_a_kill_anywhere_in_a_save_leaves_a_resumable_checkpoint(tmp_path, monkeypatch, scenario):
    """With checkpoint.keep=1, so a lost checkpoint would mean starting over. The old checkpoint is
    step 5 at epoch 0; the new one is step 5 again at epoch 1 with other weights (the re-save after
    a resume from a checkpoint written before the epoch's validation), or step 6."""
    base = tmp_path / "base"
    cfg = make_cfg(base)
    old_engine = engine(cfg)
    CheckpointManager(cfg, ParallelDims()).save(old_engine, TrainState(step=5), RandomStreams())
    old = weights(old_engine)
    new_engine = engine(cfg)
    new_engine.train_step(torch.randn(4, 3, 63, 63), torch.randint(0, 10, (4,)))
    new = weights(new_engine)
    new_state = TrainState(step=5, epoch=1) if scenario.startswith("re-save") else TrainState(step=6)
    assert not same(old, new)

    outcomes = set()
    for n in range(100):
        root = tmp_path / f"kill{n}"
        shutil.copytree(base, root)
        cfg_n = make_cfg(root)
        done = kill_at(monkeypatch, n)
        try:
            CheckpointManager(cfg_n, ParallelDims()).save(new_engine, new_state, RandomStreams())
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.undo()
        latest = latest_checkpoint(root)
        assert latest is not None, f"killed before file operation {n}: no complete checkpoint left"
        w, state = loaded(cfg_n, latest)
        if same(w, new):
            assert (state.step, state.epoch) == (new_state.step, new_state.epoch)
            outcomes.add("new")
        else:
            assert same(w, old) and (state.step, state.epoch) == (5, 0), f"kill {n}: neither the old nor the new checkpoint"
            outcomes.add("old, moved aside" if latest.name.startswith(".") else "old")
        # the next save tidies whatever the kill left: only the newest checkpoint remains
        CheckpointManager(cfg_n, ParallelDims()).save(new_engine, new_state, RandomStreams())
        assert sorted(p.name for p in root.iterdir()) == [f"step-{new_state.step:08d}"], n
        assert same(loaded(cfg_n, latest_checkpoint(root))[0], new)
        if finished:  # every file operation before this one was a kill point
            assert done[0] >= 4
            break
    else:
        pytest.fail("the save never finished in 100 file operations")
    expected = {"old", "new", "old, moved aside"} if scenario.startswith("re-save") else {"old", "new"}
    assert outcomes == expected, outcomes  # the re-save was killed between moving aside and renaming in


def test_changed_batch_size_or_seed_is_refused_by_key(tmp_path):
    cfg = make_cfg(tmp_path)
    e = engine(cfg)
    folder = CheckpointManager(cfg, ParallelDims()).save(e, TrainState(step=3), RandomStreams())
    other = make_cfg(tmp_path, batch_size=16, seed=1)
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(other, ParallelDims()).load(folder, engine(other), TrainState(), RandomStreams())
    assert "train.batch_size: checkpoint 8, now 16" in str(err.value)
    assert "train.seed: checkpoint 0, now 1" in str(err.value)
    assert str(folder) in str(err.value)


def test_data_position_changes_are_reported(tmp_path):
    cfg = make_cfg(tmp_path)
    folder = CheckpointManager(cfg, ParallelDims()).save(engine(cfg), TrainState(step=3, step_in_epoch=3), RandomStreams())
    same_cfg = CheckpointManager(cfg, ParallelDims()).load(folder, engine(cfg), TrainState(), RandomStreams())
    assert same_cfg.position_changes == [] and same_cfg.layout_changes == []
    moved = make_cfg(tmp_path)
    moved.data.workers, moved.data.shuffle_buffer = 7, 11
    resumed = CheckpointManager(moved, ParallelDims()).load(folder, engine(moved), TrainState(), RandomStreams())
    assert resumed.position_changes == ["data.workers 4 -> 7", "data.shuffle_buffer 2000 -> 11"]


def rewrite(folder: Path, name: str, obj) -> None:
    """Replace a checkpoint's file and its record in meta.json, as a save would have written them:
    the checkpoint stays whole by its checksums."""
    meta = json.loads((folder / META).read_text())
    meta["files"][name] = save_durably(obj, folder / name)
    (folder / META).write_text(json.dumps(meta))


def test_streams_are_read_without_running_code(tmp_path):
    """A random-stream file that unpickles into a call (here: creating a file) is refused unread:
    changed behind the checkpoint's back it fails its checksum; recorded as written it passes the
    checksum and weights_only refuses it, which is not a fault the checksum proves: nothing is moved."""
    cfg = make_cfg(tmp_path)
    folder = CheckpointManager(cfg, ParallelDims()).save(engine(cfg), TrainState(step=3), RandomStreams())
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"torch": Payload()}, rng_file(folder, 0))
    with pytest.raises(UnreadableCheckpoint, match="rng-rank00000.pt: .* bytes where .* were written"):
        CheckpointManager(cfg, ParallelDims()).load(folder, engine(cfg), TrainState(), RandomStreams())
    rewrite(folder, rng_file(folder, 0).name, {"torch": Payload()})
    with pytest.raises(CheckpointError, match="rng-rank00000.pt: does not load although its size and CRC-32 are the "
                                              "ones written .*UnpicklingError") as refused:
        CheckpointManager(cfg, ParallelDims()).resume(engine(cfg), TrainState(), RandomStreams())
    assert not isinstance(refused.value, UnreadableCheckpoint)
    assert not marker.exists()
    assert complete_checkpoints(tmp_path) == [folder]  # left in place


def test_streams_follow_the_dp_rank():
    """A rank continues the streams of the saved rank with its dp rank (tp peers share theirs)."""
    def source(dp, tp, rank, saved_dp, saved_tp):
        return rng_source_rank(ParallelDims(dp=dp, tp=tp, rank=rank), saved_dp, saved_tp)

    assert [source(2, 2, r, 2, 2) for r in range(4)] == [0, 1, 2, 3]  # same layout: own file
    assert [source(2, 1, r, 2, 2) for r in range(2)] == [0, 2]  # tp 2 -> 1
    assert [source(1, 2, r, 2, 2) for r in range(2)] == [0, 1]  # dp 2 -> 1
    assert [source(2, 2, r, 1, 2) for r in range(4)] == [0, 1, None, None]  # dp 1 -> 2: new dp rank
    assert [source(1, 2, r, 1, 1) for r in range(2)] == [0, 0]  # tp 1 -> 2


def test_complete_checkpoints_prefers_the_folder_in_place(tmp_path):
    for name in ("step-00000004", ".step-00000004.old", ".step-00000007.old", "step-00000009", ".step-00000010.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text("{}")
    (tmp_path / "step-00000009" / "meta.json").unlink()  # half deleted
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004", ".step-00000007.old"]


def save_at(cfg: Config, steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints at ``steps`` of one engine trained a step between them; step -> its weights."""
    e, saved = engine(cfg), {}
    for step in steps:
        e.train_step(torch.randn(4, 3, 63, 63), torch.randint(0, 10, (4,)))
        CheckpointManager(cfg, ParallelDims()).save(e, TrainState(step=step), RandomStreams())
        saved[step] = weights(e)
    return saved


def flip_a_weight(shard: Path) -> None:
    """Invert 4 bytes inside the largest weight tensor's data in a shard file, its size unchanged
    (as a bad disk block or a faulty copy does)."""
    weights = torch.load(shard, weights_only=True)["model"]
    raw = max(weights.values(), key=torch.Tensor.numel).numpy().tobytes()
    data = bytearray(shard.read_bytes())
    at = data.find(raw) + len(raw) // 2
    assert data.count(raw) == 1
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    shard.write_bytes(bytes(data))


def test_a_checkpoint_with_a_fault_is_moved_aside_and_the_previous_one_used(tmp_path, capsys):
    cfg = make_cfg(tmp_path, keep=3)
    saved = save_at(cfg, [3, 6, 9])
    shard = tmp_path / "step-00000009" / "model-tp00.pt"
    flip_a_weight(shard)  # torch.load alone would not notice
    rng = tmp_path / "step-00000006" / "rng-rank00000.pt"
    rng.write_bytes(rng.read_bytes()[:500])  # truncated, as by a full disk or a lost node
    fresh, state = engine(cfg), TrainState()
    folder, _ = CheckpointManager(cfg, ParallelDims()).resume(fresh, state, RandomStreams())
    assert folder.name == "step-00000003" and state.step == 3 and same(weights(fresh), saved[3])
    err = capsys.readouterr().err
    assert "step-00000009 has a fault" in err and "model-tp00.pt: corrupt (CRC-32 " in err
    assert "moved aside to .step-00000009.unreadable" in err
    assert "step-00000006 has a fault" in err and "rng-rank00000.pt: 500 bytes where " in err
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003"]  # out of resume's and pruning's way
    assert (tmp_path / ".step-00000009.unreadable" / "meta.json").is_file()  # kept for a look
    # The next save tidies nothing of them away, and its pruning counts only loadable ones.
    CheckpointManager(cfg, ParallelDims()).save(fresh, state, RandomStreams())
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003"]
    # The next start says what it does not resume.
    CheckpointManager(cfg, ParallelDims()).resume(engine(cfg), TrainState(), RandomStreams())
    note = capsys.readouterr().err
    assert "holds 2 checkpoint(s) moved aside for a fault found in them (.step-00000006.unreadable, " \
           ".step-00000009.unreadable): not resumed" in note, note


def test_the_flipped_bytes_load_without_the_checksum(tmp_path):
    """The bytes the test above flips change one weight and nothing else: without the checksum the
    checkpoint would resume with a damaged tensor."""
    cfg = make_cfg(tmp_path)
    saved = save_at(cfg, [3])
    shard = tmp_path / "step-00000003" / "model-tp00.pt"
    flip_a_weight(shard)
    damaged = torch.load(shard, weights_only=True)["model"]
    assert damaged.keys() == saved[3].keys()
    largest = max(saved[3], key=lambda k: saved[3][k].numel())
    assert [k for k in damaged if not torch.equal(damaged[k], saved[3][k])] == [largest]


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), MemoryError()])
def test_an_error_reading_a_checkpoint_moves_nothing(tmp_path, monkeypatch, error):
    """Reads of the newest checkpoint's files fail (a storage server briefly gone, no memory left):
    no fault is proven, so every checkpoint stays and the start ends with CheckpointReadError
    (exit status 5); once reads work, the newest resumes. The error is raised by ``open`` of the
    checkpoint's files, the one way its bytes are read."""
    cfg = make_cfg(tmp_path, keep=3)
    saved = save_at(cfg, [3, 6])
    names = sorted(p.name for p in tmp_path.iterdir())
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(tmp_path / "step-00000006")) and str(file).endswith(".pt"):
            raise error
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(CheckpointReadError, match=r"step-00000006/model-tp00.pt: cannot be read \(" + type(error).__name__):
        CheckpointManager(cfg, ParallelDims()).resume(engine(cfg), TrainState(), RandomStreams())
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    fresh, state = engine(cfg), TrainState()
    folder, _ = CheckpointManager(cfg, ParallelDims()).resume(fresh, state, RandomStreams())
    assert folder.name == "step-00000006" and same(weights(fresh), saved[6])


def test_no_loadable_checkpoint_is_an_error_naming_each(tmp_path):
    cfg = make_cfg(tmp_path, keep=3)
    save_at(cfg, [3, 6])
    for step in (3, 6):
        (tmp_path / f"step-{step:08d}" / "meta.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint loads: step-00000006 .*; step-00000003 "):
        CheckpointManager(cfg, ParallelDims()).resume(engine(cfg), TrainState(), RandomStreams())


def test_an_explicit_resume_path_that_does_not_load_is_not_replaced(tmp_path):
    cfg = make_cfg(tmp_path, keep=3)
    save_at(cfg, [3, 6])
    (tmp_path / "step-00000006" / "model-tp00.pt").write_bytes(b"")
    explicit = make_cfg(tmp_path, keep=3)
    explicit.checkpoint.resume = str(tmp_path / "step-00000006")
    with pytest.raises(CheckpointError, match="step-00000006/model-tp00.pt: 0 bytes where "):
        CheckpointManager(explicit, ParallelDims()).resume(engine(explicit), TrainState(), RandomStreams())
    assert (tmp_path / "step-00000006").is_dir()  # asked for by name: left where it is


def test_every_file_is_on_disk_before_the_checkpoint_counts(tmp_path, monkeypatch):
    """fsync of each shard and stream file, and of the folder, before meta.json makes it complete;
    of the checkpoint directory after the folder is renamed into place."""
    cfg = make_cfg(tmp_path)
    e = engine(cfg)
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", Path(dst).name))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    CheckpointManager(cfg, ParallelDims()).save(e, TrainState(step=5), RandomStreams())
    names = [n for _, n in events]
    meta = names.index("meta.json.tmp")  # meta.json is written, flushed, then replaced into place
    for f in ("model-tp00.pt", "rng-rank00000.pt", ".step-00000005.tmp"):
        assert f in names[:meta], (f, events)
    published = events.index(("rename", "step-00000005"))
    assert ("fsync", tmp_path.name) in events[published:], events


def _two_ranks_resume_and_check_sharing(root: str) -> tuple[int, str]:
    """Rank 1 sees no checkpoint yet (a network file system a moment behind): it still resumes rank
    0's choice. Then each rank points checkpoint.dir at a directory of its own (no shared file
    system): the check refuses it on every rank."""
    import distalex.checkpoint as checkpoint
    from distalex.parallel.dims import init_parallel

    dims = init_parallel(tp=1, towers=2, device="cpu")
    cfg = make_cfg(Path(root) / "shared")
    cfg.parallel.tp = 1
    listed = checkpoint.complete_checkpoints
    if dims.rank == 1:
        checkpoint.complete_checkpoints = lambda _root: []
    state = TrainState()
    found = CheckpointManager(cfg, dims).resume(DDPEngine(tiny_model(), cfg, dims), state, RandomStreams())
    checkpoint.complete_checkpoints = listed
    try:
        CheckpointManager(make_cfg(Path(root) / f"host{dims.rank}"), dims).check_shared_dir()
        error = "no error"
    except CheckpointError as e:
        error = str(e)
    return (state.step if found else -1), error


def test_every_rank_resumes_rank_0s_choice_and_an_unshared_checkpoint_dir_is_refused(tmp_path):
    save_at(make_cfg(tmp_path / "shared"), [5])
    results = run_workers(_two_ranks_resume_and_check_sharing, 2, str(tmp_path))
    assert [step for step, _ in results] == [5, 5]
    for _, error in results:
        assert error.startswith(f"checkpoint.dir: {tmp_path}/host0 is not one directory shared by all hosts: rank 1 ("), error
    assert not list((tmp_path / "host0").iterdir())  # rank 0's probe file is gone again


def run_saves(cfg: Config, steps: list[int], run_id: str | None = None) -> TrainState:
    """A run that saves at ``steps``: started as ``cfg.checkpoint.resume`` says, or, given ``run_id``,
    one that started when the folder was still empty (two jobs started together)."""
    e, state = engine(cfg), TrainState(run_id=run_id)
    if run_id is None:
        CheckpointManager(cfg, ParallelDims()).resume(e, state, RandomStreams())
    for step in steps:  # the same weights each time: whose checkpoint it is is what counts here
        state.step = step
        CheckpointManager(cfg, ParallelDims()).save(e, state, RandomStreams())
    return state


def names(root: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(root)]


def with_resume(cfg: Config, resume: str) -> Config:
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": resume})})


def test_a_new_run_in_a_folder_holding_another_runs_checkpoints_is_refused(tmp_path, monkeypatch):
    """The older run saved later steps; a new run (checkpoint.resume=none, same folder) is refused
    before its first step, with the ways out, and deletes nothing. Outside torchrun and Slurm."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = make_cfg(tmp_path, keep=3)
    older = run_saves(cfg, [28, 29, 30])
    with pytest.raises(CheckpointError) as refused:
        run_saves(with_resume(cfg, "none"), [1])
    assert str(refused.value) == (
        f"checkpoint.dir {tmp_path} holds another run's checkpoints (step-00000028 to step-00000030 (run "
        f"{older.run_id[:8]})); checkpoint.resume=none starts a new run, which would save beside them: continue that "
        "run with checkpoint.resume=auto, or give this one another run_name (or checkpoint.dir), or move them away")
    assert names(tmp_path) == ["step-00000028", "step-00000029", "step-00000030"]
    # resumed from a path in another folder, into this one: refused the same way
    elsewhere = make_cfg(tmp_path / "elsewhere", keep=3)
    run_saves(elsewhere, [5])
    with pytest.raises(CheckpointError, match=f"checkpoint.dir {tmp_path} holds another run's checkpoints .* the run "
                                              f"resumed from {tmp_path}/elsewhere/step-00000005 would save beside them"):
        run_saves(with_resume(cfg, str(tmp_path / "elsewhere" / "step-00000005")), [6])
    assert names(tmp_path) == ["step-00000028", "step-00000029", "step-00000030"]


def test_pruning_and_resume_keep_to_the_runs_own_checkpoints(tmp_path):
    """Two runs' checkpoints in one folder (two jobs started together when it was empty): each
    run's pruning deletes only its own, a re-save never replaces the other's, and resume=auto
    refuses to pick one of them."""
    cfg = make_cfg(tmp_path, keep=2)
    older = run_saves(cfg, [28, 29, 30], run_id="a" * 32)
    newer = run_saves(cfg, [1, 2, 3, 4], run_id="b" * 32)
    assert names(tmp_path) == ["step-00000003", "step-00000004", "step-00000029", "step-00000030"]
    assert older.run_id != newer.run_id
    with pytest.raises(CheckpointError, match=r"step-00000030 belongs to another run \(run aaaaaaaa\)"):
        run_saves(cfg, [30], run_id="b" * 32)
    assert names(tmp_path) == ["step-00000003", "step-00000004", "step-00000029", "step-00000030"]
    with pytest.raises(CheckpointError, match=rf"checkpoint.dir {tmp_path} holds checkpoints of 2 runs \(step-00000003 to "
                                              r"step-00000004 \(run bbbbbbbb\); step-00000029 to step-00000030 \(run "
                                              r"aaaaaaaa\)\): checkpoint.resume=auto cannot tell which to continue"):
        run_saves(cfg, [])


def test_a_restart_of_the_same_job_resumes_its_own_checkpoints(tmp_path, monkeypatch, capsys):
    """A job started with checkpoint.resume=none saves; a restart of that job (the same torchrun agent:
    here this process's parent stands for it; or the same Slurm job after a requeue) resumes them,
    while a new job (another agent, or a second run in the same Slurm allocation) is refused."""
    cfg = with_resume(make_cfg(tmp_path / "torchrun", keep=3), "none")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # under torchrun (without --rdzv-id)
    first = run_saves(cfg, [3, 6])
    restarted = run_saves(cfg, [])
    assert (restarted.step, restarted.run_id) == (6, first.run_id)
    assert f"a restart of this job: it resumes the checkpoints it saved in {tmp_path / 'torchrun'} " \
           "(checkpoint.resume=none was for its first start)" in capsys.readouterr().err
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # another launch: not this job's checkpoints
    with pytest.raises(CheckpointError, match="holds another run's checkpoints"):
        run_saves(cfg, [])

    cfg = with_resume(make_cfg(tmp_path / "slurm", keep=3), "none")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = run_saves(cfg, [3])
    with pytest.raises(CheckpointError, match="holds another run's checkpoints"):
        run_saves(cfg, [])  # a second run in the same allocation
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued
    assert run_saves(cfg, [5]).run_id == first.run_id
    monkeypatch.setenv("SLURM_JOB_ID", "43")  # another job
    with pytest.raises(CheckpointError, match="holds another run's checkpoints"):
        run_saves(cfg, [])
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert run_saves(cfg, []).step == 5  # its newest, saved after the first requeue


def as_saved_before_checksums(folder: Path) -> None:
    """Rewrite a checkpoint's meta.json as format 2 wrote it: no file records, no launch, no run id."""
    meta = json.loads((folder / META).read_text())
    del meta["files"], meta["launch"], meta["train_state"]["run_id"]
    meta["format"] = 2
    (folder / META).write_text(json.dumps(meta))


def test_a_checkpoint_from_before_checksums_resumes_exports_and_is_never_moved_aside(tmp_path):
    """Format 2: resumed and exported as before, the run taking it over (a new id; pruning counts it
    as the run's). Without a checksum nothing proves a fault in its files, so one that does not load
    is an error that leaves it in place."""
    cfg = make_cfg(tmp_path, keep=2)
    saved = save_at(cfg, [3, 6])
    for folder in complete_checkpoints(tmp_path):
        as_saved_before_checksums(folder)
    fresh, state = engine(cfg), TrainState()
    folder, _ = CheckpointManager(cfg, ParallelDims()).resume(fresh, state, RandomStreams())
    assert folder.name == "step-00000006" and same(weights(fresh), saved[6]) and state.run_id
    exported, _, _ = load_serial_state(folder)
    assert same(exported, saved[6])
    with pytest.raises(CheckpointError, match="holds another run's checkpoints .*a run from before run ids"):
        run_saves(with_resume(cfg, "none"), [1])
    shard = tmp_path / "step-00000006" / "model-tp00.pt"
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="model-tp00.pt: does not load .*written before checksums") as error:
        CheckpointManager(cfg, ParallelDims()).resume(engine(cfg), TrainState(), RandomStreams())
    assert not isinstance(error.value, UnreadableCheckpoint)
    assert names(tmp_path) == ["step-00000003", "step-00000006"]
    state.step = 7
    CheckpointManager(cfg, ParallelDims()).save(fresh, state, RandomStreams())
    assert names(tmp_path) == ["step-00000006", "step-00000007"]  # keep=2: step 3 was the run's too
