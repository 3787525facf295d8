"""Dead or slow on one machine, in seconds: ``parallel.liveness`` and the groups' timeouts.

Two real processes with torchrun's environment (gloo, the store rank 0's process serves). A
frozen peer (SIGSTOP: its sockets stay open and silent, as a frozen host or a cut link leaves
them) is found within ``peer_timeout_s``; a rank's failure record ends its peer, which waits in a
collective the failing rank never joins, with the failing rank's status; every group the job
makes times out after ``parallel.timeout_s``, not the backend's 30 minutes. The multi-host
versions of these faults are in tests/test_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from distalex.parallel.agent import torchrun_endpoint
from tests.distributed import free_port, run_workers
from tests.runs import REPO

PEER_TIMEOUT_S = 3

RANK_SCRIPT = textwrap.dedent('''
    import os, signal, sys, time, torch
    import torch.distributed as dist
    from distalex.jobs import exit_now, report_failure
    from distalex.parallel.dims import destroy_parallel, init_parallel

    case, rank = sys.argv[1], int(os.environ["RANK"])
    dims = init_parallel(tp=2, towers=2, device="cpu", timeout_s=600, peer_timeout_s=float(sys.argv[2]))
    print("ready", flush=True)
    if case == "frozen" and rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # silent from here on: no beat, no reset
    if case == "fails" and rank == 1:
        print("rank 1 fails", flush=True)
        dims.liveness.fail(2, "a bad shard (the test's)")
        os._exit(2)
    if case == "slow" and rank == 1:
        time.sleep(3 * float(sys.argv[2]))  # busy, not dead: its thread still beats
    try:
        dist.all_reduce(torch.ones(4), group=dims.tp_group)  # rank 1 joins only when it is slow
    except Exception as e:  # as the CLIs do: one line, and the job's status
        exit_now(report_failure(dims, e))
    print(f"rank {rank} done", flush=True)
    destroy_parallel(dims)  # as the CLIs end: leave, then wait for the peer
''')


def start_ranks(case: str, tmp_path, peer_timeout_s: float = PEER_TIMEOUT_S) -> list[subprocess.Popen]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), case, str(peer_timeout_s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s\n{out}\n{err}") from None
    return proc.returncode, out + err


def test_a_frozen_peer_is_found_within_the_peer_timeout(tmp_path):
    procs = start_ranks("frozen", tmp_path)
    try:
        t0 = time.monotonic()
        code, text = wait(procs[0], 60)
        took = time.monotonic() - t0
    finally:
        procs[1].kill()
        procs[1].wait()
    assert code == 4, text
    assert "error (rank 0, " in text and "rank 1 (" in text and "silent since" in text, text
    assert f"parallel.peer_timeout_s={PEER_TIMEOUT_S}" in text
    assert took < PEER_TIMEOUT_S + 15, f"{took:.1f} s"


def test_a_failure_record_ends_the_peer_with_the_failing_ranks_status(tmp_path):
    procs = start_ranks("fails", tmp_path)
    codes = [wait(p, 60) for p in procs]
    (code0, text0), (code1, _) = codes
    assert code1 == 2 and code0 == 2, codes  # rank 0 waited in an all-reduce rank 1 never joined
    assert "rank 0 done" not in text0
    assert "ending: rank 1 (" in text0 and "failed: a bad shard (the test's)" in text0, text0


@pytest.mark.slow  # waits out three peer timeouts
def test_a_rank_busier_than_the_peer_timeout_is_not_dead(tmp_path):
    procs = start_ranks("slow", tmp_path, peer_timeout_s=2)
    for rank, proc in enumerate(procs):
        code, text = wait(proc, 60)
        assert code == 0 and f"rank {rank} done" in text and "silent" not in text, text


def _late_collectives(tp: int, timeout_s: float) -> dict[str, float]:
    """Rank 1 joins no collective: each of rank 0's, one per group, fails after timeout_s."""
    import torch
    import torch.distributed as dist

    from distalex.parallel.dims import init_parallel

    dims = init_parallel(tp=tp, towers=2, device="cpu", timeout_s=timeout_s)
    names = ["tp_group", "control_group"] if tp == 2 else ["dp_group"]
    if dims.rank == 1:
        time.sleep(len(names) * timeout_s + 4)
        return {}
    took = {}
    for name in names:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(2), group=getattr(dims, name))
            took[name] = float("inf")  # joined: cannot be
        except RuntimeError:
            took[name] = time.monotonic() - t0
    return took


@pytest.mark.slow  # waits out the timeouts
@pytest.mark.parametrize("tp", [2, 1])
def test_parallel_timeout_applies_to_every_group(tp):
    timeout_s = 2.0
    took = run_workers(_late_collectives, 2, tp, timeout_s, timeout=120)[0]
    for name, seconds in took.items():
        assert timeout_s - 0.5 < seconds < timeout_s + 5, f"{name}: the collective failed after {seconds:.1f} s (timeout {timeout_s} s)"


def test_the_torchrun_agent_and_its_rendezvous_are_read_from_its_command_line():
    def endpoint_of(*args: str) -> str | None:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *args])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")) < 3:
                time.sleep(0.05)
            return torchrun_endpoint(proc.pid)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    c10d = ["--nnodes=1:2", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29400", "-m", "distalex.train"]
    assert endpoint_of("torch.distributed.run", *c10d) == "node01:29400"
    assert endpoint_of("torch.distributed.run", "--nnodes=2", "--master-addr=node02", "--master-port=1234",
                       "train.py") == "node02:1234"
    assert endpoint_of("torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py") is None
    assert endpoint_of("something.else", *c10d) is None


def test_leaving_waits_for_a_beat_inside_a_store_call():
    """A normal exit returns from leave() only when the beat thread is out of its store call: a thread
    that takes the GIL back while the interpreter exits aborts the process (SIGABRT after a run that
    finished). The store is a real in-process one, slowed (the test's) so that a call is in flight."""
    import threading
    import time

    import torch.distributed as dist

    from distalex.parallel import liveness

    class SlowStore:
        def __init__(self):
            self.store, self.in_call = dist.HashStore(), threading.Event()

        def add(self, key, n):
            self.in_call.set()
            time.sleep(0.5)
            return self.store.add(key, n)

        def __getattr__(self, name):
            return getattr(self.store, name)

    store = SlowStore()
    live = liveness.Liveness(store, "p/", 0, 2, peer_timeout_s=60, store_addr="in-process")
    for t in live._threads:
        t.start()
    assert store.in_call.wait(10)
    live.leave()
    assert not any(t.is_alive() for t in live._threads)
