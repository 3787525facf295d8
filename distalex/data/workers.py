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
  the loaders). It knows the workers as the processes that starting the loader added
  (``multiprocessing.active_children``), at once, even those still starting. Each handles SIGUSR1
  by ``os._exit(0)`` from its init on, and has it blocked until then, so a SIGUSR1 that comes
  while it starts ends it as soon as it can act on it. close sends it to the worker's main thread
  (``tgkill`` on Linux: a signal sent to the process may land on one of its helper threads, the
  queue feeder for one, whose handler flag the main thread, blocked in a read, would not see), so
  a worker ends at once even when it is blocked in a network read, and with exit status 0, which
  the DataLoader's SIGCHLD handler (installed where the loader starts in the main thread) does
  not report as a failure. Only then is the loader's iterator released: its own
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
  Linux ties this to the thread that started the workers (under forkserver the server is tied so
  to the thread whose loader started it): start an epoch from a thread that lives as long as the
  loop (the training loop's own thread does).
- SIGTERM, SIGINT and SIGUSR1 are blocked in the thread that starts the workers while it starts
  them, so a worker inherits them blocked (across spawn's exec too; a fork-served one from the
  server, which keeps them so) and acts on none before its init has set how it takes each
  (CPython's resource tracker starts its process the same way). A spawned worker's start takes
  seconds.
- A spawned worker's normal exit (the DataLoader tells a worker whose data has ended to exit) would
  go through the interpreter's finalization, seconds with torch loaded, during which the exit
  signal's default action, death, is back: it ends with ``os._exit(0)`` as a forked one does.

The start method (``data.start_method``) is passed to the DataLoader as its
``multiprocessing_context``, so Python's default (fork on Linux up to 3.13, forkserver from 3.14)
and a ``multiprocessing.set_start_method`` anywhere change nothing:

- ``forkserver`` (``auto`` on Linux): each worker is forked from a single-threaded server process,
  started once per training process, as its loader is built (``start_early``). Its workers are its children, not the training process's,
  and each holds the server's "clients alive" pipe: left as it is, the server outlives a training
  process killed outright and keeps its workers running, and a SIGTERM to the job ends the server
  and, through their parent-death signal, the workers. ``distalex.data.fork_server``, preloaded
  into it, gives the server the workers' rules: it dies with the training process and ignores
  SIGTERM; it also imports the loader and the training's main module, which each worker would
  otherwise import again, and freezes them out of the garbage collector, so that the workers share
  their pages. The server's other children (another forkserver user's) get the default SIGTERM
  and unblocked stop signals back before they run. close tells a worker's exit with a pidfd (it
  cannot wait for another process's child), and the DataLoader's SIGCHLD handler never sees these
  workers. A server that other code of the training process started before the first loader
  lacks all this: its workers refuse to run (an error at the first batch that says so).
- ``fork``: the fastest, but it copies a process that runs threads (the liveness heartbeats,
  MLflow's sender, gloo, the CPU loops' pool); a lock one of them held at that moment stays locked
  in the worker for good, a hang that no test shows (Python 3.12 warns of it, and 3.14 dropped it
  as Linux's default for that reason).
- ``spawn``: a fresh interpreter per worker, which imports torch and the training's main module,
  every epoch and every validation pass: seconds per start, and none of its memory shared.

Measured on this machine (``python bench/start_methods.py``: the demo's training loader, 4 workers,
in a process that has imported ``distalex.train``; 2 cores shared with other jobs, load average
6-8): from the start of an epoch to its first batch forkserver 0.4 s (2.9 s for the first epoch,
which starts the server), fork 0.7 s, spawn 17 s; each worker's own memory (USS) 16, 15 and 311 MiB
(66 MiB under forkserver before the server froze its objects).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import gc
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.spawn
import multiprocessing.util
import os
import select
import signal
import sys
import threading
import time
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset

from distalex import allocator
from distalex.config import ConfigError

log = logging.getLogger("distalex.data")

PR_SET_PDEATHSIG = 1
EXIT_SIGNAL = signal.SIGUSR1
"""What ``WorkerPool.close`` sends a worker to end it (handled by ``os._exit(0)``)."""
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_STARTUP_SIGNALS = _STOP_SIGNALS | {EXIT_SIGNAL}
"""Blocked in a worker from its first moment until its init has set how it takes them (the stop
signals ignored, EXIT_SIGNAL handled): one that arrives meanwhile waits for that."""
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

START_METHODS = ("fork", "forkserver", "spawn")
AUTO_START_METHOD = "forkserver" if _LIBC is not None else "spawn"
"""What ``data.start_method: auto`` means: forkserver where the kernel can tie the server to the
training process (Linux), else spawn (see the module docstring)."""
FORK_SERVER_MODULE = "distalex.data.fork_server"
FORK_SERVER_ENV = "DISTALEX_FORK_SERVER"
"""Set by a training process before its fork server starts (JSON): its pid (the server acts on
FORK_SERVER_MODULE only as that process's child), and the main module and sys.path its workers
prepare (multiprocessing.spawn's preparation data)."""
_MAIN_KEYS = ("sys_path", "init_main_from_name", "init_main_from_path")


def loader_context(start_method: str = "auto") -> multiprocessing.context.BaseContext:
    """The multiprocessing context the loader's workers start in, for ``data.start_method``."""
    method = AUTO_START_METHOD if start_method == "auto" else start_method
    if method not in START_METHODS or method not in multiprocessing.get_all_start_methods():
        raise ConfigError(f"data.start_method={start_method!r}: not available here "
                          f"(this platform has {', '.join(multiprocessing.get_all_start_methods())})")
    if method == "forkserver" and _LIBC is None:
        raise ConfigError("data.start_method='forkserver' needs Linux (the server is tied to the training "
                          "process with PR_SET_PDEATHSIG); use spawn")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        _prepare_fork_server(context)
    return context


def start_early(start_method: str) -> None:
    """Under forkserver, start the server now: it imports its modules (seconds) while the caller
    goes on with its own setup, so that the first epoch's workers start as fast as the next ones'
    and a stop during that start is acted on as soon. Call it from the thread that will start the
    workers (the server dies with that thread)."""
    if loader_context(start_method).get_start_method() == "forkserver":
        with _blocked(_STARTUP_SIGNALS):
            multiprocessing.forkserver.ensure_running()


def _prepare_fork_server(context) -> None:
    """Have the fork server load FORK_SERVER_MODULE; no effect on a server already running (its
    workers find out)."""
    main = {k: v for k, v in multiprocessing.spawn.get_preparation_data("").items() if k in _MAIN_KEYS}
    os.environ[FORK_SERVER_ENV] = json.dumps({"parent": os.getpid(), **main})
    context.set_forkserver_preload([FORK_SERVER_MODULE])


def serve_as_fork_server() -> int | None:
    """In the fork server a training process prepared: take the workers' rules (die with that
    process, ignore SIGTERM and SIGINT, kept blocked too so that a worker inherits them so), and
    import the training's main module as each worker would otherwise (Python's own preload of
    ``__main__`` never does: up to 3.13 it looks for a key the preparation data lacks). Returns this
    process's pid there, None anywhere else (the module was imported by something else)."""
    setup = json.loads(os.environ.get(FORK_SERVER_ENV, "{}"))
    if _LIBC is None or setup.get("parent") != os.getppid():
        return None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SIGINT the server ignores by itself
    signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_SIGNALS)
    multiprocessing.util.register_after_fork(sys.modules[__name__], _stop_signals_back)
    _die_with_parent(setup["parent"])
    try:
        multiprocessing.spawn.prepare({k: setup[k] for k in _MAIN_KEYS if k in setup})
    except Exception as e:  # noqa: BLE001 - each worker imports it again, and reports the error there
        log.warning("the fork server could not import the training's main module: %s", e)
    # Out of the collector's reach, the objects imported so far are never written by a worker's
    # collections, so their pages stay shared (measured: 66 -> 16 MiB of each worker's own memory).
    gc.freeze()
    return os.getpid()


def _stop_signals_back(_module) -> None:
    """In each process the fork server forks, before it runs: SIGTERM's default action and no
    signal blocked, as the server's children of other code expect; a loader worker keeps them
    until its init."""
    if not _is_loader_worker:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_SIGNALS)


def _fork_server_pid() -> int:
    """In a worker forked by the fork server: that server's pid, if a training process prepared it."""
    server = sys.modules.get(FORK_SERVER_MODULE)
    pid = getattr(server, "SERVER_PID", None)
    if pid is None:
        raise RuntimeError(
            "data.start_method=forkserver: multiprocessing's fork server was started before distalex's "
            f"loader could prepare it ({FORK_SERVER_MODULE} is not loaded in it), so the loader workers "
            "would not end with the training process; set data.start_method to spawn or fork, or start no "
            "forkserver process before the loader")
    return pid


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


EXIT_GRACE_S = 2.0
"""How long close waits for the workers to act on EXIT_SIGNAL before it kills them."""
FETCH_END_S = 10.0
"""After a kill, how long close waits for a first fetch still in progress to give the loader up."""
PREFETCH_FACTOR = 4
"""Batches the DataLoader asks each worker for ahead of the one the training process takes."""


def _exit_now(_signum, _frame) -> None:
    os._exit(0)  # status 0: the DataLoader reports a worker that died of a signal as a crash


_is_loader_worker = False
"""True in a process that unpickled a _WorkerInit: a spawned or fork-served loader worker."""


class _WorkerInit:
    """The DataLoader's ``worker_init_fn``, the first code of the loader a worker runs."""

    def __init__(self, method: str):
        self.training_pid, self.method = os.getpid(), method

    def __setstate__(self, state: dict) -> None:
        # A spawned or fork-served worker unpickles this before it runs anything (_stop_signals_back).
        global _is_loader_worker
        _is_loader_worker = True
        self.__dict__.update(state)

    def __call__(self, _worker_id: int) -> None:
        torch.set_num_threads(1)  # a worker decodes and crops one image at a time; its torch ops are small
        allocator.keep_freed_memory()  # each decoded image is freed before the next: reuse its pages
        try:
            for signum in _STOP_SIGNALS:  # see the module docstring
                signal.signal(signum, signal.SIG_IGN)
            signal.signal(EXIT_SIGNAL, _exit_now)
            # A spawned worker would end through the interpreter's finalization: seconds with torch
            # loaded, during which EXIT_SIGNAL has its default action (death) back. End it as a forked
            # one ends.
            atexit.register(os._exit, 0)
            _die_with_parent(_fork_server_pid() if self.method == "forkserver" else self.training_pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_SIGNALS)  # an EXIT_SIGNAL sent meanwhile acts now




_open_pools: weakref.WeakSet = weakref.WeakSet()


class WorkerPool:
    """``iter(DataLoader(dataset, ...))`` whose workers end when ``close()`` is called, or at exit."""

    def __init__(self, dataset: IterableDataset, workers: int, device: torch.device, start_method: str = "auto"):
        context = loader_context(start_method) if workers > 0 else None
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            worker_init_fn=_WorkerInit(context.get_start_method()) if workers > 0 else None,
            prefetch_factor=PREFETCH_FACTOR if workers > 0 else None, multiprocessing_context=context,
        )
        before = set(multiprocessing.active_children())
        with _blocked(_STARTUP_SIGNALS):
            self._it = iter(loader)  # the workers start here, in the caller's thread (see _die_with_parent)
        # The processes that starting the loader added: its workers, known at once (they may still be starting).
        self._pids = [p.pid for p in multiprocessing.active_children() if p not in before]
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
            self._fetch, self._first, (status, item) = None, None, self._first
            if status == "error":
                raise item
            return item
        return next(self._it)

    def pids(self) -> list[int]:
        """The workers' pids."""
        return list(self._pids)

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
    """Whether process ``pid`` has exited, without reaping it (multiprocessing joins its workers
    later). A pidfd tells it of any process; without one (not Linux) only of a child."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # exited and reaped
        return True
    except (AttributeError, OSError):  # no pidfd_open (not Linux, or a kernel before 5.3)
        return _child_exited(pid)
    try:
        return bool(select.select([pidfd], [], [], 0)[0])  # readable once the process has exited
    finally:
        os.close(pidfd)


def _child_exited(pid: int) -> bool:
    if not hasattr(os, "waitid"):  # macOS: cannot tell a zombie from a live process; wait the grace out
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


@contextlib.contextmanager
def _blocked(signals: set[int]):
    """``signals`` blocked in this thread (and so in the processes it starts) while in the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
