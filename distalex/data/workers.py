"""DataLoader worker processes that start at once, never outlive, nor hang, the training process.

Loader start-up (workers filling their shuffle buffers, a resumed epoch replaying the samples
before its first step) can take minutes: the first batch is fetched on a helper thread from the
start, and ``WorkerPool.ready(timeout)`` lets the training loop wait for it in slices, so that it
can still act on a stop.

The workers ignore SIGTERM and SIGINT: torchrun (killpg) and SLURM (every process of the step)
send SIGTERM to them too, and a terminal's Ctrl-C (or torchrun passing it on) sends SIGINT to the
training process's whole process group. A worker that died of either would make the training
process raise mid-checkpoint ("DataLoader worker ... killed by signal") while it saves after its
own stop signal. Ignoring them removes the usual way workers end, so they are ended by other means,
with public APIs only (torch's DataLoader and Python's multiprocessing and signal modules; nothing
private of torch):

- ``WorkerPool.close`` ends them and is called on every path out of an epoch (``try/finally`` in
  the loaders). Each worker registers its pid at start and handles SIGUSR1 by ``os._exit(0)``:
  close sends it to the worker's main thread (``tgkill`` on Linux: a signal sent to the process
  may land on one of its helper threads, the queue feeder for one, whose handler flag the main
  thread, blocked in a read, would not see), so a worker ends at once even when it is blocked in
  a network read, and with
  exit status 0, which the DataLoader's SIGCHLD handler (installed where the loader starts in the
  main thread) does not report as a failure. Only then is the loader's iterator released: its own
  shutdown (queues, the pin-memory thread) finds the workers gone and waits for nothing. A worker
  still alive after EXIT_GRACE_S (stuck in C code that holds the GIL) is killed (SIGKILL), with
  that SIGCHLD handler set aside meanwhile so that the kill is not reported as a crash. Ending a
  worker abruptly is safe: it holds nothing that needs a clean exit (its batches travel in shared
  memory unlinked at creation), and a polite shutdown can wait many seconds on a worker blocked
  in a network read.
- An ``atexit`` hook closes any pool still open. Python's own exit handler would otherwise send
  the workers SIGTERM (ignored) and then wait for them forever: every unhandled exception in the
  training process became a hang. atexit runs the last registered first, and this module is
  imported after multiprocessing registered its handler, so ours runs before it.
- Each worker asks the kernel to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG`` on Linux;
  elsewhere a thread watches the parent pid), so a training process killed outright leaves none.
  Linux ties this to the thread that started the workers: start an epoch from a thread that
  lives as long as the loop (the training loop's own thread does).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset

from distalex import allocator

log = logging.getLogger("distalex.data")

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent: int) -> None:
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="distalex-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


EXIT_SIGNAL = signal.SIGUSR1
"""What ``WorkerPool.close`` sends a worker to end it (handled by ``os._exit(0)``)."""
EXIT_GRACE_S = 2.0
"""How long close waits for the workers to act on EXIT_SIGNAL before it kills them."""
FETCH_END_S = 10.0
"""After a kill, how long close waits for a first fetch still in progress to give the loader up."""
PREFETCH_FACTOR = 4
"""Batches the DataLoader asks each worker for ahead of the one the training process takes."""


def _exit_now(_signum, _frame) -> None:
    os._exit(0)  # status 0: the DataLoader reports a worker that died of a signal as a crash


def _worker_init(parent: int, pids, worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes and crops one image at a time; its torch ops are small
    allocator.keep_freed_memory()  # each decoded image is freed before the next: reuse its pages
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # see the module docstring
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(EXIT_SIGNAL, _exit_now)
    pids[worker_id] = os.getpid()  # after the handler: a registered worker can be ended by close
    _die_with_parent(parent)


def worker_context():
    """The multiprocessing context the workers start in (the DataLoader's default); what they share
    with the training process (the pid table, the batch slots' lock) is made in it."""
    return multiprocessing.get_context()


_open_pools: weakref.WeakSet = weakref.WeakSet()


class WorkerPool:
    """``iter(DataLoader(dataset, ...))`` whose workers end when ``close()`` is called, or at exit."""

    def __init__(self, dataset: IterableDataset, workers: int, device: torch.device):
        context = worker_context()  # named, so that the pid table is shared with the workers
        self._pids = context.RawArray("q", max(workers, 1))  # worker id -> pid, 0 until that worker has started
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            worker_init_fn=functools.partial(_worker_init, os.getpid(), self._pids) if workers > 0 else None,
            prefetch_factor=PREFETCH_FACTOR if workers > 0 else None, multiprocessing_context=context if workers > 0 else None,
        )
        self._it = iter(loader)  # the workers start here, in the caller's thread (see _die_with_parent)
        _open_pools.add(self)
        self._first = None
        self._fetch = threading.Thread(target=self._fetch_first, daemon=True, name="distalex-first-batch")
        self._fetch.start()

    def _fetch_first(self) -> None:
        try:
            self._first = ("ok", next(self._it))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by __next__
            self._first = ("error", e)

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the first item is here (or the pool is closed); waits up to ``timeout`` seconds."""
        fetch = self._fetch
        if fetch is not None:
            fetch.join(timeout)
        return fetch is None or not fetch.is_alive()

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            raise StopIteration
        if self._fetch is not None:
            self._fetch.join()
            self._fetch, (status, item) = None, self._first
            if status == "error":
                raise item
            return item
        return next(self._it)

    def pids(self) -> list[int]:
        """The workers that have started (their pids)."""
        return [pid for pid in self._pids if pid]

    def close(self) -> list[int]:
        """End the workers and release the loader; safe to call more than once. Returns the pids
        of the workers that had to be killed (they did not act on EXIT_SIGNAL in time)."""
        it, self._it = self._it, None
        fetch, self._fetch = self._fetch, None  # a first fetch still running fails once its workers are gone
        _open_pools.discard(self)
        if it is None:
            return []
        pids = self.pids()
        for pid in pids:
            _signal_main_thread(pid, EXIT_SIGNAL)
        alive = _still_running(pids, EXIT_GRACE_S)
        if not alive:
            return []  # `it` goes with this frame: the DataLoader's own shutdown runs now (or when the first fetch ends)
        with _sigchld_set_aside():
            for pid in alive:
                _signal(pid, signal.SIGKILL)
            del it
            if fetch is not None:  # it holds the loader until it sees the workers gone (seconds)
                fetch.join(FETCH_END_S)  # the loader stops watching the killed ones only once released
        log.warning("loader workers %s did not end within %.0f s of %s; killed them",
                    ", ".join(map(str, alive)), EXIT_GRACE_S, EXIT_SIGNAL.name)
        return alive


def _still_running(pids: list[int], timeout: float) -> list[int]:
    """The children of ``pids`` that have not exited within ``timeout`` seconds (none reaped here:
    multiprocessing joins them)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not _exited(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # gone already (reaped)
        pass


_tgkill = getattr(_LIBC, "tgkill", None)  # glibc >= 2.30, musl
if _tgkill is not None:
    _tgkill.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]


def _signal_main_thread(pid: int, signum: int) -> None:
    """``signum`` to the main thread of process ``pid`` (whose thread id is its pid on Linux);
    to the process where tgkill is missing or fails for another reason than the worker being gone."""
    if _tgkill is None or (_tgkill(pid, pid, signum) != 0 and ctypes.get_errno() != errno.ESRCH):
        _signal(pid, signum)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (multiprocessing joins it later)."""
    if not hasattr(os, "waitid"):  # macOS: cannot tell a zombie from a live process; wait the grace out
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


@contextlib.contextmanager
def _sigchld_set_aside():
    """SIGCHLD's default action while workers are killed, where it can be changed (the main thread):
    the DataLoader's handler would report the kill as a worker crash (an exception in this thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


@atexit.register
def _close_open_pools() -> None:
    for pool in list(_open_pools):
        pool.close()
