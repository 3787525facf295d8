"""The training step as a GPU would run it, checked on CPU ranks: nothing in a step hands Python
data to a tensor or reads one back on the host (each would make the host wait for the device), and
the prefetching device feed serves the plain iteration's batches, in its order, bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distributed import run_workers
from tests.test_data_loader import write_shards
from tests.runs import DEMO_CONFIG, tiny_overrides, tiny_shards  # noqa: F401 - fixture


def overrides(shards, **extra) -> list[str]:
    pairs = tiny_overrides(shards, **{"tracking.enabled": False, "train.log_every": 4, "checkpoint.every_steps": 0,
                                      "train.epochs": 1, **extra})
    return pairs[1::2]  # the values of ["--set", "k=v", ...]


# ----------------------------------------------------------------------------- tensors from Python data


def made_worker(workdir: str, values: list[str]) -> dict:
    """One epoch of train_epoch under PythonDataSpy, what it records split by step: a step runs from
    asking for its batch (the feed, the loader and the tp exchange of the batch included) to asking
    for the next one (normalisation with the lighting, forward, backward, SGD, the log point)."""
    from distalex.config import load_config
    from distalex.parallel.dims import init_parallel
    from distalex.parallel.trace import PythonDataSpy
    from distalex.stopping import StopRequested
    import distalex
    import distalex.train as train

    os.chdir(workdir)
    cfg = load_config(DEMO_CONFIG, values)
    dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu", layout=cfg.parallel.layout)
    run = train.setup(cfg, dims, StopRequested())
    made, marks = PythonDataSpy(), []
    real_fetch = run.times.fetch

    def fetch(batches):
        marks.append((f"step {run.state.step + 1}", len(made.calls)))
        return real_fetch(batches)

    run.times.fetch = fetch
    with made:
        train.train_epoch(run, None)
    mine = made.calls_from(distalex.__path__[0])
    ends = [n for _, n in marks[1:]] + [len(made.calls)]
    return {
        "rank": dims.rank,
        "made": {step: [f"{c.kind}: {c.op} {c.shape} at {c.where}" for c in made.calls[begin:end] if c in mine]
                 for (step, begin), end in zip(marks, ends)},
    }


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["towers", "hybrid"])
def test_no_tensor_from_python_data_and_no_host_read_in_a_step(tiny_shards, tmp_path, layout):
    """log_every=4: of the epoch's 7 steps, 4 and 7 log (the loss and the step times are read there)
    and 2, 3, 5 and 6 are plain steps (step 1 may make the per-device constants once), and asking for an eighth batch ends the epoch. In the plain
    steps no distalex code makes a tensor from Python data, reads one on the host, or copies from
    pageable memory to a device (trace.PythonDataSpy), on either tp rank: the batch from the
    loader and its tp exchange, normalisation and lighting, forward, backward and SGD included."""
    values = overrides(tiny_shards, **{"parallel.layout": layout})
    for result in run_workers(made_worker, 2, str(tmp_path), values, timeout=240):
        # "step 8": asking for a batch after the epoch's last one
        assert sorted(result["made"]) == [f"step {k}" for k in range(1, 9)], result["made"]
        for step in ("step 2", "step 3", "step 5", "step 6", "step 8"):
            assert result["made"][step] == [], (result["rank"], step, result["made"][step])
        # the spy does see the log points' reads
        for step in ("step 4", "step 7"):
            assert any(m.startswith("host read") for m in result["made"][step]), result["made"]


# ----------------------------------------------------------------------------- the prefetching feed


def feed_worker(root: str, layout: str) -> dict:
    """Every batch of an epoch and of a resume at step 3, prefetched and plain, on this tp rank."""
    from distalex.data.loader import TrainLoader
    from distalex.parallel.dims import init_parallel
    from tests.test_data_loader import SIZE, cfg_for

    d = init_parallel(tp=2, towers=2, device="cpu", layout=layout)
    ld = TrainLoader(cfg_for(Path(root), workers=1, start_method="fork"), d, global_batch=8, image_size=SIZE, seed=11)
    out = {"tp_rank": d.tp_rank, "steps": ld.steps_per_epoch}
    for prefetch in (True, False):
        for start in (0, 3):
            out[prefetch, start] = [(b.images.clone(), b.labels.clone(), b.skipped.clone())
                                    for b in ld.epoch(1, start, prefetch=prefetch)]
    d.barrier()
    return out


@pytest.mark.slow  # two tp=2 epochs over real shards each way: 10-14 s on 2 busy cores
@pytest.mark.parametrize("layout", ["towers", "hybrid"])
def test_the_prefetching_feed_serves_the_plain_iterations_batches(tmp_path, layout):
    """At tp=2, with a loader worker: the prefetched epoch, and the epoch resumed at step 3, are
    the plain iteration's batches in the same order, bit for bit (pixels, labels, skipped count), on
    both tp ranks; under hybrid the peer holds only its own half of each batch's rows."""
    write_shards(tmp_path, [9, 14, 5, 12, 8], corrupt=(17,))  # 48: 6 steps of 8 (the skipped one made up)
    outs = run_workers(feed_worker, 2, str(tmp_path), layout, timeout=240)
    assert [o["tp_rank"] for o in outs] == [0, 1] and outs[0]["steps"] == 6
    for o in outs:
        for start in (0, 3):
            fed, plain = o[True, start], o[False, start]
            assert len(fed) == len(plain) == 6 - start
            for k, (a, b) in enumerate(zip(fed, plain)):
                for x, y, what in zip(a, b, ("images", "labels", "skipped")):
                    assert torch.equal(x, y), (o["tp_rank"], start, k, what)
        assert [int(b[2]) for b in o[True, 0]][-1] == 1, "the corrupt sample is counted"
    peer, loading = outs[1][True, 0], outs[0][True, 0]
    for (pi, pl, _), (li, ll, _) in zip(peer, loading):
        assert torch.equal(pl, ll)
        if layout == "towers":
            assert torch.equal(pi, li)
        else:
            assert torch.equal(pi[4:], li[4:]) and not pi[:4].any()


def test_a_worker_error_is_raised_at_its_own_batch_with_or_without_prefetch(tmp_path):
    """Two workers over one shard of 16: worker 0 serves batches 0 and 2, worker 1 (samples 8-15,
    all corrupt) batches 1 and 3, and has no readable sample. Prefetching fetches batch 1 while
    handing over batch 0, but the DataError comes when batch 1 is asked for, as in the plain
    iteration: one good batch first, then the error, and the workers end."""
    from distalex.data.info import DataError
    from distalex.data.loader import TrainLoader
    from tests.test_data_loader import SIZE, cfg_for, dims, ids_of

    write_shards(tmp_path, [16], corrupt=tuple(range(8, 16)))
    ld = TrainLoader(cfg_for(tmp_path, workers=2, shuffle_buffer=0, start_method="fork"), dims(), global_batch=4, image_size=SIZE, seed=1)
    for prefetch in (True, False):
        batches = ld.start(0, prefetch=prefetch)
        got = []
        with pytest.raises(DataError, match="worker 1: no readable sample"):
            for b in batches:
                got.append(ids_of(b.images))
        batches.close()
        assert got == [[0, 1, 2, 3]], (prefetch, got)


def test_prefetching_fetches_the_next_batch_before_handing_over_this_one(tmp_path, monkeypatch):
    """Counted at the loader's own fetch (the real one runs): when batch k is handed over, the feed
    has fetched k + 2 batches (one ahead; the epoch's end bounds it), the plain iteration k + 1."""
    from distalex.data import loader as loader_module
    from distalex.data.loader import TrainLoader
    from tests.test_data_loader import SIZE, cfg_for, dims

    fetched = []
    real = loader_module._next_item
    monkeypatch.setattr(loader_module, "_next_item", lambda pool: fetched.append(1) or real(pool))
    write_shards(tmp_path, [20])
    ld = TrainLoader(cfg_for(tmp_path, workers=0), dims(), global_batch=4, image_size=SIZE, seed=2)
    for prefetch, ahead in ((True, 2), (False, 1)):
        fetched.clear()
        seen = [len(fetched) for _ in ld.epoch(0, prefetch=prefetch)]
        assert seen == [min(k + ahead, 5) for k in range(5)], (prefetch, seen)


def stop_worker(workdir: str, values: list[str]) -> dict:
    """A run stopped by SIGTERM during its 3rd step (the loading rank has batch 4 fetched or on its
    way), resumed to the end; then the same run uninterrupted. Both final weights."""
    import contextlib
    import io

    import torch.distributed as dist

    from distalex.config import load_config
    from distalex.engine.ddp import DDPEngine
    from distalex.parallel.dims import init_parallel
    from distalex.parallel.plan import full_state_dict
    from distalex.stopping import StopRequested
    from tests.test_stop import Stopper
    import distalex.train as train

    os.chdir(workdir)
    cfg = load_config(DEMO_CONFIG, values)
    dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu", layout=cfg.parallel.layout)
    stopper, steps, real_step = Stopper(), [], DDPEngine.train_step

    def step_then_sigterm(self, images, labels):  # the signal comes from outside the loop, as a scheduler's
        steps.append(1)
        if len(steps) == 3 and dims.rank == 0:
            stopper.now()
        return real_step(self, images, labels)

    out = {"stdout": []}
    DDPEngine.train_step = step_then_sigterm
    try:
        for _ in range(2):  # stopped, then resumed to the end
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                out.setdefault("codes", []).append(train.train(cfg, dims, StopRequested()))
            out["stdout"].append(text.getvalue())
    finally:
        DDPEngine.train_step = real_step
    out["weights"] = full_state_dict(train.setup(cfg, dims, StopRequested()).engine.module, dims.tp_group)
    reference = cfg.model_copy(update={"run_name": "uninterrupted"})
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.train(reference, dims, StopRequested()) == 0
    out["reference"] = full_state_dict(train.setup(reference, dims, StopRequested()).engine.module, dims.tp_group)
    dist.barrier()
    return out


@pytest.mark.e2e
def test_a_stop_with_a_batch_prefetched_resumes_to_the_uninterrupted_weights(tiny_shards, tmp_path):
    """SIGTERM in step 3 of 14 (2 epochs of 7) on rank 0: the ranks agree to stop a step later and
    save there, with the next batch already fetched; that batch is dropped with the workers, and
    the resumed run fetches it again: its final weights equal the uninterrupted run's bit for bit."""
    values = overrides(tiny_shards, **{"train.epochs": 2})
    for rank, out in enumerate(run_workers(stop_worker, 2, str(tmp_path), values, timeout=300)):
        assert out["codes"] == [0, 0]
        if rank == 0:
            stopped = out["stdout"][0]
            assert "stopped by SIGTERM at step" in stopped and "(during training)" in stopped, stopped
            step = int(stopped.split("stopped by SIGTERM at step ")[1].split()[0])
            assert 3 <= step < 7, stopped  # inside the first epoch, with batches left to prefetch
            assert "epoch 2/2" in out["stdout"][1], out["stdout"][1]
        assert out["weights"].keys() == out["reference"].keys()
        for name, tensor in out["reference"].items():
            assert torch.equal(out["weights"][name], tensor), (rank, name)
