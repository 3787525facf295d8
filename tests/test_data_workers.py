"""WorkerPool ends its loader workers promptly through public APIs only (no private DataLoader
attribute), and the DataLoader never reports the ending as a worker crash.

The pool is made in this (the main) thread, so torch's SIGCHLD handler watches its workers, as in
a training process: a worker that ends by a signal would make that handler raise here (or, where
it lands in the loader's own shutdown, print "Exception ignored ... DataLoader worker ... killed by
signal"). After each close another child process exits (a SIGCHLD) and the test waits for the
handler to run; then neither may have happened.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch
from torch.utils.data import IterableDataset

from distalex.data import workers
from distalex.data.workers import WorkerPool

# The crash report from inside the loader's shutdown reaches pytest as an unraisable exception.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


class BlockedRead(IterableDataset):
    """Yields one item, then blocks each worker in a socket read that never returns (a stalled
    network read). With ``deaf``, the worker also blocks the pool's exit signal, as a worker stuck
    in C code that holds the GIL never acts on it."""

    def __init__(self, deaf: bool = False):
        self.deaf = deaf

    def __iter__(self):
        if self.deaf:
            signal.pthread_sigmask(signal.SIG_BLOCK, {workers.EXIT_SIGNAL})
        yield torch.zeros(2)
        a, _b = socket.socketpair()
        a.recv(1)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def close_and_check(pool: WorkerPool, limit_s: float, capfd, killed: int) -> None:
    pids = pool.pids()
    assert len(pids) == 2, pids
    t0 = time.monotonic()
    had_to_kill = pool.close()
    took = time.monotonic() - t0
    assert len(had_to_kill) == killed, (had_to_kill, took)
    assert took < limit_s, took
    assert all(gone(pid) for pid in pids), [psutil.Process(p).status() for p in pids if not gone(p)]
    subprocess.run(["true"], check=True)  # a SIGCHLD: torch's handler checks the workers it watches
    time.sleep(0.3)
    # twice is fine
    assert pool.close() == []
    assert "DataLoader worker" not in capfd.readouterr().err


def started(pool: WorkerPool) -> WorkerPool:
    assert next(pool).shape == (2,)
    deadline = time.monotonic() + 30
    while len(pool.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return pool


def test_workers_blocked_in_a_read_end_at_once_with_status_0(capfd):
    # they act on the signal: no kill is needed, and close takes far less than the grace a kill waits out
    close_and_check(started(WorkerPool(BlockedRead(), 2, torch.device("cpu"))), 1.5, capfd, killed=0)


def test_workers_that_ignore_the_signal_are_killed_without_a_crash_report(capfd):
    close_and_check(started(WorkerPool(BlockedRead(deaf=True), 2, torch.device("cpu"))),
                    workers.EXIT_GRACE_S + workers.FETCH_END_S, capfd, killed=2)


def test_workers_ignore_sigterm(capfd):
    pool = started(WorkerPool(BlockedRead(), 2, torch.device("cpu")))
    try:
        for pid in pool.pids():
            psutil.Process(pid).send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not any(gone(pid) for pid in pool.pids())
    finally:
        close_and_check(pool, 1.5, capfd, killed=0)
