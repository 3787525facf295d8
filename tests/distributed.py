"""Run a function on N local processes with torchrun's environment, gloo on CPU.

Each worker gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, as under torchrun, so the
code under test reads its layout exactly as it does in a real run. A worker's exception fails
the test with the worker's traceback; a worker that does not finish in time is killed and the
test fails instead of hanging.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        out = fn(*args)
        # Tensors go back as bytes: a tensor sent through the queue lives in this process's
        # shared memory, which is gone once the worker exits.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """fn(*args) on ``world_size`` processes; returns the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            try:
                rank, status, out = results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"workers did not finish within {timeout}s (hang?); got ranks {sorted(outs)}") from None
            if status == "error":
                errors.append(f"rank {rank}:\n{out}")
                break
            outs[rank] = torch.load(io.BytesIO(out), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("a worker failed:\n" + "\n".join(errors))
    return [outs[r] for r in range(world_size)]
