"""WorkerPool ends its loader workers promptly through public APIs only (no private DataLoader
attribute), and the DataLoader never reports the ending as a worker crash; under each start method.

The pool is made in this (the main) thread, so torch's SIGCHLD handler watches its workers, as in
a training process: a worker that ends by a signal would make that handler raise here (or, where
it lands in the loader's own shutdown, print "Exception ignored ... DataLoader worker ... killed by
signal"). After each close another child process exits (a SIGCHLD) and the test waits for the
handler to run; then neither may have happened. Under forkserver the workers are the fork server's
children, not this process's: close must still see them exit and kill the deaf ones.

Each case runs under every start method: auto's forkserver in the quick tier, fork and spawn (a
fresh interpreter per worker, seconds each) in the slow one.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distalex.data import workers
from distalex.data.workers import WorkerPool
from tests.runs import REPO, run_env, tiny_overrides, tiny_shards, torchrun_cmd  # noqa: F401 - fixture

# The crash report from inside the loader's shutdown reaches pytest as an unraisable exception.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

START_METHODS = [pytest.param("forkserver"), pytest.param("fork", marks=pytest.mark.slow),
                 pytest.param("spawn", marks=pytest.mark.slow)]
"""Every start method the loader supports: auto's forkserver in the quick tier, the others slow."""
CPU = torch.device("cpu")


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


class SlowTeardown:
    """Takes seconds to be deleted, as when the interpreter tears its modules down at exit."""

    def __del__(self):
        time.sleep(3)


class OneWorkerEnds(IterableDataset):
    """Worker 0 yields one item and ends, leaving a module global that slows an interpreter's exit
    (torch's modules take seconds to tear down on a busy machine); worker 1 yields three items,
    then blocks in a read."""

    def __iter__(self):
        global _teardown
        if get_worker_info().id == 0:
            _teardown = SlowTeardown()
            yield torch.zeros(2)
            return
        yield from (torch.zeros(2) for _ in range(3))
        a, _b = socket.socketpair()
        a.recv(1)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def close_and_check(pool: WorkerPool, limit_s: float, capfd, killed: int | None) -> None:
    """close ends both workers within ``limit_s``, having killed ``killed`` of them (None: any),
    and nothing reports a crash."""
    pids = pool.pids()
    assert len(pids) == 2, pids
    t0 = time.monotonic()
    had_to_kill = pool.close()
    took = time.monotonic() - t0
    assert killed is None or len(had_to_kill) == killed, (had_to_kill, took)
    assert took < limit_s, took
    assert all(gone(pid) for pid in pids), [psutil.Process(p).status() for p in pids if not gone(p)]
    subprocess.run(["true"], check=True)  # a SIGCHLD: torch's handler checks the workers it watches
    time.sleep(0.3)
    # twice is fine
    assert pool.close() == []
    assert "DataLoader worker" not in capfd.readouterr().err


def started(pool: WorkerPool) -> WorkerPool:
    """``pool`` once each of its 2 workers has handed over its first item (the round robin asks
    worker 0, then worker 1): both are past their init."""
    assert next(pool).shape == next(pool).shape == (2,)
    return pool


def started_by(pid: int) -> str:
    """The start method that made process ``pid``, read from its command line: a spawned worker runs
    multiprocessing.spawn's entry point, the fork server and its forks the server's; a fork is a copy
    of its parent."""
    cmdline = " ".join(psutil.Process(pid).cmdline())
    for method in ("spawn", "forkserver"):
        if f"multiprocessing.{method}" in cmdline:
            return method
    return "fork"


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_blocked_in_a_read_end_at_once_with_status_0(method, capfd):
    # they act on the signal: no kill is needed, and close takes far less than the grace a kill waits out
    pool = started(WorkerPool(BlockedRead(), 2, CPU, method))
    assert {started_by(pid) for pid in pool.pids()} == {method}
    close_and_check(pool, 1.5, capfd, killed=0)


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_that_ignore_the_signal_are_killed_without_a_crash_report(method, capfd):
    close_and_check(started(WorkerPool(BlockedRead(deaf=True), 2, CPU, method)),
                    workers.EXIT_GRACE_S + workers.FETCH_END_S, capfd, killed=2)


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_still_starting_end_at_close_and_nothing_waits_at_exit(method, tmp_path):
    """close right after the loader starts (a stop while an epoch's loader starts), when a worker
    may not have reached its init yet (a spawned one takes seconds, a fork-served one a fraction of
    one): every worker ends, none is reported as a crash, and the process exits at once (Python's
    exit handler waits for every child it started)."""
    script = textwrap.dedent(f'''
        import time, torch
        from tests.test_data_workers import BlockedRead, gone
        from distalex.data.workers import WorkerPool
        pool = WorkerPool(BlockedRead(), 2, torch.device("cpu"), {method!r})
        pids = pool.pids()
        pool.close()
        print("WORKERS", len(pids), "LEFT", [pid for pid in pids if not gone(pid)], flush=True)
        print("CLOSED", time.time(), flush=True)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    ended = time.time()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["WORKERS"] == "2 LEFT []", lines["WORKERS"]  # all ended by close, none left running
    assert ended - float(lines["CLOSED"]) < 10, "the exit waited for something"
    assert "DataLoader worker" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("method", START_METHODS)
def test_a_worker_that_ended_on_its_own_is_not_reported_as_a_crash(method, capfd):
    """The DataLoader tells a worker whose data has ended to exit, and goes on with the others; a
    close right after must not turn that exit into a crash (a spawned worker's interpreter takes
    seconds to finalise, and gives the exit signal its default action, death, back meanwhile)."""
    pool = started(WorkerPool(OneWorkerEnds(), 2, CPU, method))
    next(pool)  # this third item comes after worker 0's end, which the DataLoader answers with an exit
    time.sleep(1)  # worker 0 exits meanwhile
    close_and_check(pool, 1.5, capfd, killed=0)


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_ignore_sigterm_and_sigint_sent_to_the_whole_job(method, capfd):
    """As torchrun's killpg, SLURM and a terminal's Ctrl-C do: to the workers and to the fork server
    (their parent under forkserver; a worker tied to it would die with it)."""
    pool = started(WorkerPool(BlockedRead(), 2, CPU, method))
    try:
        parents = {psutil.Process(pid).ppid() for pid in pool.pids()} - {os.getpid()}
        assert len(parents) == (method == "forkserver"), parents
        for pid in [*pool.pids(), *parents]:
            for signum in (signal.SIGTERM, signal.SIGINT):
                os.kill(pid, signum)
        time.sleep(0.5)
        assert not any(gone(pid) for pid in [*pool.pids(), *parents])
    finally:
        close_and_check(pool, 1.5, capfd, killed=0)


# fork while the pestering thread runs (Python 3.12 warns): the hazard the module docstring names
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", START_METHODS)
def test_workers_ignore_sigterm_and_sigint_while_they_start(method, capfd):
    """As when a job is stopped while an epoch's loader starts: every process this one starts gets
    SIGTERM and SIGINT again and again from its first moments (a spawned worker's start-up takes
    seconds, a fork-served one's a fraction of one), before its init could ignore them."""
    stop = threading.Event()

    def pester() -> None:
        while not stop.is_set():
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGTERM)
                    child.send_signal(signal.SIGINT)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        pool = started(WorkerPool(BlockedRead(), 2, CPU, method))
    finally:
        stop.set()
        thread.join()
    close_and_check(pool, 1.5, capfd, killed=0)


@pytest.mark.parametrize("users", ["forkserver", pytest.param("fork", marks=pytest.mark.slow),
                                   pytest.param("spawn", marks=pytest.mark.slow)])
def test_a_set_start_method_elsewhere_changes_nothing(users, capfd):
    """The start method is the loader's own (auto: forkserver), whatever the process's default is
    (Python 3.14 made it forkserver on Linux, and a user may set any)."""
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(users, force=True)
    try:
        pool = started(WorkerPool(BlockedRead(), 2, CPU))
        assert {started_by(pid) for pid in pool.pids()} == {workers.AUTO_START_METHOD}
        close_and_check(pool, 1.5, capfd, killed=0)
    finally:
        multiprocessing.set_start_method(previous, force=True)


@pytest.mark.slow
def test_the_fork_server_starts_when_the_loader_is_built_before_its_first_epoch(tmp_path, shards):
    """A TrainLoader on the loading rank starts the fork server at once (it imports its modules
    while the training's set-up goes on), not at the first epoch."""
    script = textwrap.dedent(f'''
        import psutil
        from pathlib import Path
        from distalex.data.loader import TrainLoader
        from tests.test_data_loader import cfg_for, dims, SIZE
        from tests.test_data_workers import started_by
        TrainLoader(cfg_for(Path({str(shards)!r}), workers=2), dims(), 4, SIZE, 0)
        print("CHILDREN", *sorted(started_by(c.pid) for c in psutil.Process().children()))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forkserver" in proc.stdout.split("CHILDREN", 1)[1].split(), proc.stdout  # beside the resource tracker


def compiled_loops(queue) -> None:
    """Run in a process the fork server started: the crop's compiled loops (numba dispatchers) and how
    many signatures each already has, before this process has called any."""
    from distalex.data import resample

    queue.put({name: len(f.signatures) for name, f in vars(resample).items() if hasattr(f, "signatures")})


@pytest.mark.slow
def test_workers_from_the_fork_server_start_with_the_crop_loops_compiled(tmp_path):
    """The fork server compiles the crop loops before it forks: a worker that compiled them itself
    would spend about 1.3 CPU-seconds on it, in every worker of every epoch."""
    from distalex.data.resample import AVAILABLE

    if not AVAILABLE:
        pytest.skip("numba is not installed: the workers crop with Pillow and compile nothing")
    script = textwrap.dedent('''
        import json
        from distalex.data.workers import loader_context
        from tests.test_data_workers import compiled_loops
        ctx = loader_context("forkserver")
        queue = ctx.Queue()
        worker = ctx.Process(target=compiled_loops, args=(queue,))
        worker.start()
        print("LOOPS", json.dumps(queue.get(timeout=60)))
        worker.join()
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loops = json.loads(proc.stdout.split("LOOPS", 1)[1])
    assert len(loops) >= 3 and all(n > 0 for n in loops.values()), loops


def test_a_sigterm_while_the_fork_server_starts_leaves_it_serving(tmp_path):
    """Slurm's SIGTERM to the whole job can reach the fork server while it is still importing its
    modules (seconds): it must go on serving, so that the training process saves instead of failing."""
    script = textwrap.dedent('''
        import json, multiprocessing.forkserver, os, signal, time
        import psutil
        from distalex.data.workers import loader_context
        from tests.test_data_workers import compiled_loops
        ctx = loader_context("forkserver")
        multiprocessing.forkserver.ensure_running()  # starts the server; its imports go on without us
        server = next(c for c in psutil.Process().children() if "forkserver" in " ".join(c.cmdline()))
        deadline = time.monotonic() + 60
        while "libtorch" not in open(f"/proc/{server.pid}/maps").read():  # in its imports (seconds of them)
            assert time.monotonic() < deadline, "the fork server did not load torch"
            time.sleep(0.005)
        os.kill(server.pid, signal.SIGTERM)
        queue = ctx.Queue()
        worker = ctx.Process(target=compiled_loops, args=(queue,))
        worker.start()
        print("LOOPS", json.dumps(queue.get(timeout=60)), "SERVER", server.is_running(), flush=True)
        worker.join()
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and "SERVER True" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.fixture
def shards(tmp_path):
    from tests.test_data_loader import write_shards

    write_shards(tmp_path / "shards", [20, 20])
    return tmp_path / "shards"


@pytest.mark.slow
def test_a_fork_server_the_loader_did_not_prepare_is_refused_with_the_way_out(tmp_path):
    """A fork server started before the loader (here by a forkserver process of the user's) lacks the
    preload that ties it to the training process: its workers would survive a kill. The first batch
    raises, naming the key and the way out."""
    script = textwrap.dedent('''
        import multiprocessing, os, torch
        from tests.test_data_workers import BlockedRead
        from distalex.data.workers import WorkerPool
        users = multiprocessing.get_context("forkserver").Process(target=os.getpid)
        users.start(); users.join()
        pool = WorkerPool(BlockedRead(), 2, torch.device("cpu"), "forkserver")
        try:
            next(pool)
        except RuntimeError as e:
            print("REFUSED", "set data.start_method to spawn or fork" in str(e))
        finally:
            pool.close()
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and "REFUSED True" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.e2e
def test_a_run_forced_to_spawn_trains_bit_for_bit_as_the_default(tiny_shards, tmp_path):
    """``data.start_method=spawn`` (the method furthest from auto's forkserver) on a demo-sized torchrun
    run: its workers are spawned, and it ends with the same weights, bit for bit, as the run under
    auto: the loader handed over the same batches."""
    from distalex.checkpoint import load_serial_state

    weights, methods = {}, {}
    for method in ("auto", "spawn"):
        workdir = tmp_path / method
        workdir.mkdir()
        overrides = tiny_overrides(tiny_shards, run_name="tiny", **{"data.workers": 2, "data.start_method": method})
        proc = subprocess.Popen(torchrun_cmd(2) + overrides, cwd=workdir, env=run_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen: dict[int, str] = {}
        while proc.poll() is None:  # the job's processes by start method: torchrun's ranks count as forks
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, started_by(child.pid))
            time.sleep(0.1)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, out[-6000:]
        methods[method] = sorted(seen.values())
        weights[method], _, _ = load_serial_state(workdir / "runs" / "tiny" / "checkpoints")
    # rank 0's workers, 2 for each training epoch and validation pass (and auto's fork server)
    assert methods["spawn"].count("spawn") >= 4 and "forkserver" not in methods["spawn"], methods["spawn"]
    assert methods["auto"].count("forkserver") >= 5 and "spawn" not in methods["auto"], methods["auto"]
    assert weights["auto"].keys() == weights["spawn"].keys()
    different = [name for name, value in weights["auto"].items() if not torch.equal(value, weights["spawn"][name])]
    assert not different, f"weights that differ: {different}"
