"""DataLoader worker processes that start at once, never outlive, nor hang, the training process.

Loader start-up (workers filling their shuffle buffers, a resumed epoch replaying the samples
before its first step) can take minutes: the first batch is fetched on a helper thread from the
start, and ``WorkerPool.ready(timeout)`` lets the training loop wait for it in slices, so that it
can still act on a stop.

The workers ignore SIGTERM and SIGINT: torchrun (killpg) and SLURM (every process of the step)
send SIGTERM to them too, and a terminal's Ctrl-C (or torchrun passing it on) sends SIGINT to the
training process's whole process group. A worker that died of either would make the training
process raise mid-checkpoint ("DataLoader worker ... killed by signal") while it saves after its
own stop signal. Ignoring them removes the usual way workers end, so they are ended by other means:

- ``WorkerPool.close`` kills them (SIGKILL) and is called on every path out of an epoch
  (``try/finally`` in the loaders). Killing is safe: a worker holds nothing that needs a clean
  exit (its batches travel in shared memory unlinked at creation), and a polite shutdown can
  wait many seconds on a worker blocked in a network read.
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
import ctypes
import functools
import os
import signal
import sys
import threading
import time
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="distalex-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(parent: int, _worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers decode with PIL; torch ops here are tiny copies
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # see the module docstring
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)


_open_pools: weakref.WeakSet = weakref.WeakSet()


class WorkerPool:
    """``iter(DataLoader(dataset, ...))`` whose workers end when ``close()`` is called, or at exit."""

    def __init__(self, dataset: IterableDataset, workers: int, device: torch.device):
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
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
        return [w.pid for w in getattr(self._it, "_workers", [])]

    def close(self) -> None:
        """Kill the workers and release the loader; safe to call more than once."""
        it, self._it = self._it, None
        self._fetch = None  # a first fetch still running fails once its workers are gone; nobody reads it
        _open_pools.discard(self)
        workers = getattr(it, "_workers", [])
        if not workers:
            return
        if getattr(it, "_worker_pids_set", False):
            # First tell torch's SIGCHLD handler to stop watching them, or their death raises here.
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(timeout=10)
        it._shutdown_workers()  # queues and the pin-memory thread; the workers are already gone


@atexit.register
def _close_open_pools() -> None:
    for pool in list(_open_pools):
        pool.close()
