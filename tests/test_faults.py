"""Faults at scale, on real separate hosts: a fault anywhere ends the job or heals it in seconds.

Two hosts in network namespaces (``tests/hosts.py``), one torchrun agent each, gloo over the veth,
one training process per host (dp=2, tp=1), c10d rendezvous on host 1. Faults land after the first
checkpoint, mid-epoch (``tests/paced_train.py`` paces the steps). Every case asserts its time
against ``parallel.peer_timeout_s`` (10 s here) and prints one ``faults-at-scale`` line with what
it measured: these are the numbers in docs/training.md ("Faults at scale").

Two cases need one host only (2 local ranks, tp=2): the one-sided data error of the loading rank
(its HTTP shard server gone for good) and a step slower than peer_timeout_s, which is not a fault.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from distalex.data.info import read_info
from tests.hosts import Hosts, agent, host_env, require_hosts
from tests.runs import REPO, run_env, tiny_overrides, tiny_shards, torchrun_cmd  # noqa: F401 - fixture
from tests.servers import ShardServer

pytestmark = pytest.mark.e2e

PEER_TIMEOUT_S = 10
BOUND_S = PEER_TIMEOUT_S + 30
"""Every process of a lost job is gone within this many seconds of the fault."""
PACED = REPO / "tests" / "paced_train.py"
ELASTIC = "last_call_timeout=5"
"""The re-rendezvous waits this long for more hosts once it has the minimum (torchrun's default: 30 s)."""


def overrides(shards: Path, **extra) -> list[str]:
    return tiny_overrides(shards, run_name="f", **{
        "parallel.tp": 1, "train.epochs": 4, "train.log_every": 1, "parallel.peer_timeout_s": PEER_TIMEOUT_S,
        **extra})


def report(fault: str, outcome: str) -> None:
    print(f"faults-at-scale | {fault} | {outcome}")


class Job:
    """The hosts' torchrun agents of one training job, their logs and what they print."""

    def __init__(self, hosts: Hosts, workdir: Path, shards: Path, nnodes: str, max_restarts: int,
                 shared: bool = True, rdzv_conf: str = "", **extra):
        self.hosts, self.workdir, self.shared = hosts, workdir, shared
        self.nnodes, self.max_restarts, self.rdzv_conf = nnodes, max_restarts, rdzv_conf
        self.overrides = overrides(shards, **extra)
        self.procs: dict[int, subprocess.Popen] = {}
        self.port = 29400 + int(hosts.tag[2:]) % 500

    def cwd(self, i: int) -> Path:
        return self.workdir if self.shared else self.workdir / f"host{i}"

    def log(self, i: int) -> Path:
        return self.workdir / f"host{i}.log"

    def start(self, i: int) -> None:
        cmd, env = agent(self.hosts, i, self.nnodes, self.overrides, self.port, self.max_restarts, PACED, self.rdzv_conf)
        self.procs[i] = self.hosts.start(i, cmd, self.cwd(i), self.log(i), host_env(self.hosts, i, PACE_STEP_S="0.5", **env))

    def text(self, i: int) -> str:
        return self.log(i).read_text(errors="replace") if self.log(i).exists() else ""

    def wait_for(self, i: int, pattern: str, timeout: float) -> float:
        return wait_for(self.log(i), pattern, timeout)

    def wait_first_checkpoint(self, timeout: float = 240) -> float:
        """After the first checkpoint and two more paced steps: a fault between checkpoints."""
        seen = self.wait_for(1, r"checkpoint: \S+step-0000000[1-9]", timeout)
        time.sleep(1.0)
        return seen

    def exit_code(self, i: int, timeout: float) -> int:
        try:
            return self.procs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"host {i}'s agent still running after {timeout} s\n{self.tail(i)}") from None

    def tail(self, i: int, n: int = 4000) -> str:
        return "".join(line for line in self.text(i).splitlines(True) if not line.startswith("frame #"))[-n:]

    def mlflow_runs(self) -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{self.workdir / 'runs' / 'mlflow.db'}")
        return client.search_runs([client.get_experiment_by_name("distalex").experiment_id])

    def steps_lost(self) -> str:
        """Training steps done after the checkpoint the run resumed from (logged twice: before the
        fault and again after the resume), and the epoch's steps the resume at a new dp skipped."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{self.workdir / 'runs' / 'mlflow.db'}")
        (run,) = self.mlflow_runs()
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        skipped = sum(m.value for m in client.get_metric_history(run.info.run_id, "train/epoch_steps_skipped"))
        return f"{len(steps) - len(set(steps))} steps lost (trained again), {skipped:.0f} of the epoch's steps skipped"


def workers_part(text: str) -> str:
    """What the training processes printed before torchrun's agent reported them failed (the
    agent's own ChildFailedError traceback follows)."""
    return re.split(r"failed \(exitcode: ", text)[0]


def wait_for(log: Path, pattern: str, timeout: float) -> float:
    """The monotonic time ``pattern`` (a regex) first shows in ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"{log}: no {pattern!r} within {timeout} s\n{log.read_text(errors='replace')[-4000:]}")


def fault_after_first_checkpoint(job: Job, fault) -> float:
    """Start both hosts, wait for the first checkpoint, inject ``fault()``; its monotonic time."""
    job.start(1), job.start(2)
    job.wait_first_checkpoint()
    fault()
    return time.monotonic()


def gone_within(hosts: Hosts, since: float, bound: float) -> dict[int, float]:
    """Seconds from ``since`` until each host has no process left; fails past ``bound``."""
    gone: dict[int, float] = {}
    while len(gone) < hosts.count and time.monotonic() - since < bound:
        for i in range(1, hosts.count + 1):
            if i not in gone and not hosts.pids(i):
                gone[i] = time.monotonic() - since
        time.sleep(0.2)
    left = {i: hosts.pids(i) for i in range(1, hosts.count + 1) if i not in gone}
    assert not left, f"processes still running {bound} s after the fault: {left}"
    return gone


@pytest.fixture
def hosts():
    require_hosts()
    made = Hosts(2)
    try:
        yield made
    finally:
        made.close()


def assert_healed(job: Job) -> None:
    assert job.exit_code(1, 240) == 0, job.tail(1)
    text = job.text(1)
    assert "resumed at world=1 (dp=1 x tp=1)" in text and "run directory: runs/f" in text, job.tail(1)
    (run,) = job.mlflow_runs()  # one MLflow run across the restart
    assert run.info.status == "FINISHED"


@pytest.mark.hosts
def test_a_cut_link_ends_both_hosts_within_the_peer_timeout(hosts, tiny_shards, tmp_path):
    """Fixed --nnodes=2: host 1 finds host 2 silent, host 2 finds the store silent; both end."""
    job = Job(hosts, tmp_path, tiny_shards, nnodes="2", max_restarts=0)
    cut = fault_after_first_checkpoint(job, lambda: hosts.cut(2))
    gone = gone_within(hosts, cut, BOUND_S)
    assert job.exit_code(1, 5) != 0 and job.exit_code(2, 5) != 0
    assert re.search(r"error \(rank 0, node 0 \S+\): rank 1 \(node 1 \S+\) silent since \d\d:\d\d:\d\d", job.text(1)), job.tail(1)
    assert "has not answered since" in job.text(2) and "Ending this host's torchrun agent" in job.text(2), job.tail(2)
    report("link cut, fixed --nnodes=2", f"both hosts end: host 1 in {gone[1]:.1f} s, host 2 in {gone[2]:.1f} s")


@pytest.mark.hosts
def test_a_cut_link_under_elastic_settings_heals_on_the_rendezvous_host(hosts, tiny_shards, tmp_path):
    job = Job(hosts, tmp_path, tiny_shards, nnodes="1:2", max_restarts=3, rdzv_conf=ELASTIC)
    cut = fault_after_first_checkpoint(job, lambda: hosts.cut(2))
    host2 = hosts.wait_gone(2, BOUND_S)
    assert host2 is not None, f"host 2 still runs {BOUND_S} s after the cut: {hosts.pids(2)}\n{job.tail(2)}"
    assert "has not answered since" in job.text(2), job.tail(2)
    resumed = job.wait_for(1, r"resumed from \S+", BOUND_S + 60) - cut
    assert_healed(job)
    report("link cut, elastic", f"host 1 resumes at dp=1 {resumed:.1f} s after the cut, {job.steps_lost()}; host 2 ends in {host2:.1f} s")


@pytest.mark.hosts
def test_a_killed_host_is_survived_under_elastic_settings(hosts, tiny_shards, tmp_path):
    job = Job(hosts, tmp_path, tiny_shards, nnodes="1:2", max_restarts=3, rdzv_conf=ELASTIC)
    killed = fault_after_first_checkpoint(job, lambda: hosts.kill(2))  # every process, the agent included
    resumed = job.wait_for(1, r"resumed from \S+", BOUND_S + 60) - killed
    assert_healed(job)
    before = job.text(1).split("resumed from")[0]  # the first attempt, which the kill ended
    assert re.search(r"error \(rank 0\): a collective failed \(.*(closed|reset) by peer.*\): a peer's process, host or "
                     r"link is gone", before), job.tail(1)
    assert "Traceback (most recent call last)" not in workers_part(before), job.tail(1)
    report("host killed, elastic", f"host 1 resumes at dp=1 {resumed:.1f} s after the kill, {job.steps_lost()}")


@pytest.mark.hosts
def test_a_host_joining_an_elastic_job_is_taken_in(hosts, tiny_shards, tmp_path):
    job = Job(hosts, tmp_path, tiny_shards, nnodes="1:2", max_restarts=3, rdzv_conf=ELASTIC)
    job.start(1)
    job.wait_first_checkpoint()
    job.start(2)
    joined = time.monotonic()
    taken_in = job.wait_for(1, r"resumed at world=2 \(dp=2 x tp=1\)", 180) - joined
    assert job.exit_code(1, 240) == 0 and job.exit_code(2, 60) == 0, job.tail(1)
    assert "stopped by SIGTERM" in job.text(1)  # the agent's restart for the new host: a save, no loss
    (run,) = job.mlflow_runs()
    assert run.info.status == "FINISHED"
    report("host joins, elastic", f"training at dp=2 {taken_in:.1f} s after the second agent started, "
           f"{job.steps_lost()}")


@pytest.mark.hosts
def test_losing_the_rendezvous_host_ends_the_others_with_the_reason(hosts, tiny_shards, tmp_path):
    job = Job(hosts, tmp_path, tiny_shards, nnodes="1:2", max_restarts=3, rdzv_conf=ELASTIC)
    killed = fault_after_first_checkpoint(job, lambda: hosts.kill(1))
    gone = gone_within(hosts, killed, BOUND_S)
    assert job.exit_code(2, 5) != 0
    assert "the rendezvous host (torchrun's store at" in job.text(2), job.tail(2)
    report("rendezvous host lost", f"host 2 ends in {gone[2]:.1f} s, naming the rendezvous host")


@pytest.mark.hosts
def test_no_shared_checkpoint_directory_stops_before_the_first_step(hosts, tiny_shards, tmp_path):
    job = Job(hosts, tmp_path, tiny_shards, nnodes="2", max_restarts=0, shared=False)
    started = time.monotonic()
    job.start(1), job.start(2)
    codes = [job.exit_code(i, 180) for i in (1, 2)]
    took = time.monotonic() - started
    assert all(c != 0 for c in codes)
    for i in (1, 2):
        assert re.search(r"error \(rank \d\): checkpoint\.dir: \S*/runs/f/checkpoints is not one directory shared by all "
                         r"hosts: rank 1 \(node 1 \S+\) does not see the file", job.text(i)), job.tail(i)
        assert "Traceback (most recent call last)" not in workers_part(job.text(i)), job.tail(i)
    assert not list((tmp_path / "host1" / "runs" / "f" / "checkpoints").glob("step-*"))
    assert "train:" not in job.text(1)  # no step was taken
    report("no shared checkpoint.dir", f"both hosts stop before step 1 with the key named, {took:.1f} s after start")


def test_a_data_error_on_the_loading_rank_ends_every_rank(tiny_shards, tmp_path):
    """tp=2 on one host over HTTP: the server goes away for good after the first checkpoint; rank 0
    (the loading rank) fails, rank 1 (waiting in the batch broadcast) ends on its failure record."""
    server = ShardServer(tiny_shards)
    names = read_info(tiny_shards).splits["train"].shards
    extra = {"data.train_shards": ",".join(f"{server.url}/{n}" for n in names), "data.info": tiny_shards / "_info.json",
             "data.retries": 1, "data.retry_wait_s": 0.2, "data.stall_timeout_s": 5, "train.epochs": 6,
             "parallel.peer_timeout_s": PEER_TIMEOUT_S}
    cmd = torchrun_cmd(2)
    cmd[cmd.index("-m", cmd.index("--max-restarts=0")):cmd.index("distalex.train") + 1] = [str(PACED)]
    log = tmp_path / "job.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd + tiny_overrides(tiny_shards, run_name="d", **extra), cwd=tmp_path,
                                    env=run_env(PACE_STEP_S="0.3", PYTHONPATH=str(REPO)), stdout=out, stderr=subprocess.STDOUT)
        wait_for(log, r"checkpoint: \S+step-", 240)
    finally:
        server.close()
    failed = wait_for(log, r"error \(rank 0\): .*no readable sample", 120)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 30 s after rank 0's error\n{log.read_text()[-4000:]}") from None
    took = time.monotonic() - failed
    text = log.read_text()
    # rank 1 ended on rank 0's failure record, with its status; the one line of the cause is rank 0's
    assert code != 0 and re.search(r"failed \(exitcode: 2\) local_rank: 1", text), text[-4000:]
    assert len(re.findall(r"^error \(rank", text, re.M)) == 1, text[-4000:]
    assert "Traceback (most recent call last)" not in workers_part(text), text[-4000:]
    report("one-sided data error (loading rank)", f"every rank ends {took:.1f} s after rank 0's error, status {code}")


def test_a_step_slower_than_the_peer_timeout_is_not_a_fault(tiny_shards, tmp_path):
    slow_s = 2 * 4 + 2
    cmd = torchrun_cmd(2)
    cmd[cmd.index("-m", cmd.index("--max-restarts=0")):cmd.index("distalex.train") + 1] = [str(PACED)]
    proc = subprocess.run(
        cmd + tiny_overrides(tiny_shards, run_name="s", **{"parallel.peer_timeout_s": 4, "train.epochs": 1}),
        cwd=tmp_path, env=run_env(SLOW_STEP=f"1:3:{slow_s}", PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"rank 1 sleeps {slow_s} s in step 3" in proc.stdout + proc.stderr
    assert "silent since" not in proc.stderr
    report("a step slower than peer_timeout_s", f"not a fault: a {slow_s} s step with peer_timeout_s=4 trains on")
