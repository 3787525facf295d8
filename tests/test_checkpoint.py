"""Checkpoint files in one process: a kill at any file operation of a save leaves a resumable
checkpoint; resume refuses a changed batch size or seed and reports data-position changes; random
streams and shards are read with weights_only=True.

A "kill" here is an exception raised instead of the n-th rename, replace, unlink or rmdir the save
makes (shutil.rmtree's own deletions included): what the folder looks like at that moment is what
a SIGKILL there would leave. Every n is tried, from the first operation to past the last.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from distalex.checkpoint import (
    CheckpointError, CheckpointManager, RandomStreams, TrainState, complete_checkpoints, latest_checkpoint,
    rng_file, rng_source_rank,
)
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


def test_streams_are_read_without_running_code(tmp_path):
    """A random-stream file that unpickles into a call (here: creating a file) is refused unread."""
    cfg = make_cfg(tmp_path)
    folder = CheckpointManager(cfg, ParallelDims()).save(engine(cfg), TrainState(step=3), RandomStreams())
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"torch": Payload()}, rng_file(folder, 0))
    with pytest.raises(CheckpointError, match="rng-rank00000.pt: unreadable"):
        CheckpointManager(cfg, ParallelDims()).load(folder, engine(cfg), TrainState(), RandomStreams())
    assert not marker.exists()


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


def test_a_checkpoint_that_does_not_load_is_moved_aside_and_the_previous_one_used(tmp_path, capsys):
    cfg = make_cfg(tmp_path, keep=3)
    saved = save_at(cfg, [3, 6, 9])
    shard = tmp_path / "step-00000009" / "model-tp00.pt"
    shard.write_bytes(shard.read_bytes()[:500])  # truncated, as by a full disk or a lost node
    (tmp_path / "step-00000006" / "rng-rank00000.pt").write_bytes(b"not a tensor file")
    fresh, state = engine(cfg), TrainState()
    folder, _ = CheckpointManager(cfg, ParallelDims()).resume(fresh, state, RandomStreams())
    assert folder.name == "step-00000003" and state.step == 3 and same(weights(fresh), saved[3])
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step-00000009 does not load" in err and "moved aside to .step-00000009.unreadable" in err
    assert "step-00000006 does not load" in err and "rng-rank00000.pt: unreadable" in err
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003"]  # out of resume's and pruning's way
    assert (tmp_path / ".step-00000009.unreadable" / "meta.json").is_file()  # kept for a look
    # The next save tidies nothing of them away, and its pruning counts only loadable ones.
    CheckpointManager(cfg, ParallelDims()).save(fresh, TrainState(step=4), RandomStreams())
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


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
    with pytest.raises(CheckpointError, match="step-00000006: cannot load rank 0's shard"):
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
