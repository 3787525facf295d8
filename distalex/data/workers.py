"""The loaders' DataLoader worker processes: started at once, the first batch fetched in the
background, and stopped at once.

Loader start-up (workers filling their shuffle buffers, a resumed epoch replaying the samples
before its first step) can take minutes, and torch asks a worker to stop only between two
batches. ``Prefetched`` lets the training loop wait for the first batch in slices (``ready``),
so that it can still act on a stop, and ``close`` makes the workers exit wherever they are.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import threading
import time

import torch
from torch.utils.data import DataLoader, IterableDataset


QUIT_POLL_S = 0.1


def _worker_init(quit_flag, _: int) -> None:
    torch.set_num_threads(1)  # the workers decode with PIL; torch ops here are tiny copies
    # torchrun (killpg) and SLURM (every process of the step) send SIGTERM to these workers too;
    # torch's worker handler dies on a SIGTERM that is not from its parent, and the training
    # process then raises "DataLoader worker ... killed by signal" mid-checkpoint. The training
    # process stops them itself after saving (quit_flag); SIGKILL still ends them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if quit_flag is not None:
        threading.Thread(target=_exit_on, args=(quit_flag, os.getppid()), daemon=True, name="distalex-worker-quit").start()


def _exit_on(quit_flag, parent: int) -> None:
    """A worker's way out that is not SIGTERM: the loader sets the shared flag (or its process is
    gone). A flag polled, not a multiprocessing.Event: setting an Event waits for every waiter to
    wake, and a worker that already finished its batches never does. Exit status 0: torch's SIGCHLD
    check reports failures only."""
    while not quit_flag.value and os.getppid() == parent:
        time.sleep(QUIT_POLL_S)
    os._exit(0)


def make_loader(dataset: IterableDataset, workers: int, device: torch.device, quit_flag=None) -> DataLoader:
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(_worker_init, quit_flag) if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )


class Prefetched:
    """``iter(DataLoader(dataset))`` whose first item is fetched on a helper thread from the start."""

    def __init__(self, dataset: IterableDataset, workers: int, device: torch.device):
        self._quit = mp.get_context().RawValue("b", 0) if workers > 0 else None  # shared memory, no lock
        self._source = iter(make_loader(dataset, workers, device, self._quit))
        self._first = None
        self._fetch = threading.Thread(target=self._fetch_first, daemon=True, name="distalex-first-batch")
        self._fetch.start()

    def _fetch_first(self) -> None:
        try:
            self._first = ("ok", next(self._source))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by __next__
            self._first = ("error", e)

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the first item is here; waits up to ``timeout`` seconds for it."""
        if self._fetch is not None:
            self._fetch.join(timeout)
        return self._fetch is None or not self._fetch.is_alive()

    def __next__(self):
        if self._fetch is None:
            return next(self._source)
        self._fetch.join()
        self._fetch, (status, item) = None, self._first
        if status == "error":
            raise item
        return item

    def close(self) -> None:
        """End the workers now; a first item still being fetched is abandoned with its thread."""
        if self._quit is not None:
            self._quit.value = 1
        if self._fetch is None or not self._fetch.is_alive():
            self._source = None  # the iterator's shutdown joins the (exited) workers
        self._fetch = None
