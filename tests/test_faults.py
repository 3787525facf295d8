"""Faults at scale, on real separate hosts: a fault anywhere ends the job or heals it in seconds.

Two or three hosts in network namespaces (``tests/hosts.py``), one torchrun agent each, gloo over
the veth, one training process per host (dp=2 or 3, tp=1), c10d rendezvous on host 1, torchrun's
own defaults otherwise (its shared agent store included). Faults land after the first checkpoint,
mid-epoch (``tests/paced_train.py`` paces the steps). Every case asserts its time against
``parallel.peer_timeout_s`` (10 s here) or torchrun's rendezvous timeouts, and prints one
``faults-at-scale`` line with what it measured: these are the numbers in docs/training.md ("Faults
at scale"). No worker may make its agent SIGKILL it (checked on every host's log after each test).

Three cases need one host only: the one-sided data error of the loading rank (its HTTP shard
server gone for good, tp=2), a step slower than peer_timeout_s, which is not a fault, and a wedged
rank (dp=3).
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
                 shared: bool = True, rdzv_conf: str = "", agent_env: dict | None = None, **extra):
        self.hosts, self.workdir, self.shared = hosts, workdir, shared
        self.nnodes, self.max_restarts, self.rdzv_conf = nnodes, max_restarts, rdzv_conf
        self.agent_env = agent_env or {}
        self.overrides = overrides(shards, **extra)
        self.procs: dict[int, subprocess.Popen] = {}
        self.port = 29400 + int(hosts.tag[2:]) % 500

    def cwd(self, i: int) -> Path:
        return self.workdir if self.shared else self.workdir / f"host{i}"

    def log(self, i: int) -> Path:
        return self.workdir / f"host{i}.log"

    def start(self, i: int) -> None:
        cmd, env = agent(self.hosts, i, self.nnodes, self.overrides, self.port, self.max_restarts, PACED, self.rdzv_conf)
        env = host_env(self.hosts, i, PACE_STEP_S="0.5", **env, **self.agent_env)
        self.procs[i] = self.hosts.start(i, cmd, self.cwd(i), self.log(i), env)

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


FORCED_KILL = "forcefully exiting"
"""What torchrun's agent logs when a worker ignored its SIGTERM for 30 s and it sent SIGKILL."""


def no_forced_kill(text: str) -> None:
    """No worker made its agent SIGKILL it: each ends on its own within the agent's grace."""
    assert FORCED_KILL not in text, "\n".join(line for line in text.splitlines() if FORCED_KILL in line)


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
    """Start every host, wait for the first checkpoint, inject ``fault()``; its monotonic time."""
    for i in range(1, job.hosts.count + 1):
        job.start(i)
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
def make_hosts():
    """make_hosts(count): that many hosts, removed after the test, whose logs must show no worker
    that its torchrun agent had to SIGKILL."""
    require_hosts()
    made: list[Hosts] = []

    def make(count: int) -> Hosts:
        made.append(Hosts(count))
        return made[-1]

    try:
        yield make
        for log in (log for h in made for log in h.logs):
            no_forced_kill(log.read_text(errors="replace"))
    finally:
        for h in made:
            h.close()


@pytest.fixture
def hosts(make_hosts):
    return make_hosts(2)


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


@pytest.mark.hosts
def test_one_host_of_three_lost_the_others_heal_in_one_round(make_hosts, tiny_shards, tmp_path):
    """--nnodes=2:3, torchrun's defaults (its rendezvous timeouts, its shared agent store: as a user
    who starts torchrun on each host): host 3 killed mid-epoch; hosts 1 and 2 re-form a world of two
    in one rendezvous round and finish at dp=2. Each world meets in a store of its own: in the
    agent's store the previous world's gloo addresses were read, refused, and the round failed.
    The global batch, 35, divides neither 3 nor 2: both worlds split it unevenly (12+12+11, 18+17)."""
    hosts = make_hosts(3)
    job = Job(hosts, tmp_path, tiny_shards, nnodes="2:3", max_restarts=3, agent_env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"},
              **{"train.batch_size": 35})
    killed = fault_after_first_checkpoint(job, lambda: hosts.kill(3))
    resumed = job.wait_for(1, r"resumed from \S+", 240) - killed
    assert job.exit_code(1, 240) == 0 and job.exit_code(2, 60) == 0, job.tail(1) + job.tail(2)
    text = job.text(1)
    worlds = re.findall(r"distalex: world=(\d)", text)
    assert worlds == ["3", "2"], f"one world of 3, then one of 2 (one rendezvous round): {worlds}\n{job.tail(1)}"
    assert "of 35 images, per dp rank 12 or 11" in text and "of 35 images, per dp rank 18 or 17" in text, job.tail(1)
    assert "resumed at world=2 (dp=2 x tp=1)" in text, job.tail(1)
    before = text.split("resumed from")[0]  # the first world, which the kill ended: rank 0's own line, or rank 1's cause
    assert re.search(r"error \(rank 0[^)]*\): (ending: rank \d \([^)]+\) failed: )?a collective failed \(.*(closed|reset) "
                     r"by peer.*\): a peer's process, host or link is gone", before), job.tail(1)
    assert "Traceback (most recent call last)" not in workers_part(before), job.tail(1)
    for i in (1, 2):
        assert "connectFullMesh failed" not in job.text(i) and "Connection refused" not in job.text(i), job.tail(i)
    assert resumed < 120, f"resumed {resumed:.1f} s after the kill"
    (run,) = job.mlflow_runs()
    assert run.info.status == "FINISHED"
    report("one host of three killed, --nnodes=2:3, torchrun's defaults, batch 35",
           f"hosts 1 and 2 resume at dp=2 {resumed:.1f} s after the kill, in one round, {job.steps_lost()}")


@pytest.mark.hosts
def test_an_error_no_restart_can_fix_ends_every_host_under_elastic_settings(make_hosts, tiny_shards, tmp_path):
    """A training set that does not exist, --nnodes=1:3 --max-restarts=3: every rank fails the same
    way; the job's rendezvous is closed, so each agent ends after its workers' one failure."""
    hosts = make_hosts(3)
    job = Job(hosts, tmp_path, tiny_shards, nnodes="1:3", max_restarts=3, **{"data.train_shards": tmp_path / "none"})
    for i in (1, 2, 3):
        job.start(i)
    deadline = time.monotonic() + 240
    while not any(re.search(r"^error \(rank \d", job.text(i), re.M) for i in (1, 2, 3)):
        assert time.monotonic() < deadline, "no error within 240 s\n" + job.tail(1)
        time.sleep(0.2)
    gone = gone_within(hosts, time.monotonic(), 30)
    for i in (1, 2, 3):
        text = job.text(i)
        assert job.exit_code(i, 5) != 0
        assert len(re.findall(r"failed \(exitcode: 2\)", text)) == 1, f"host {i}: one failure, no restart\n{job.tail(i)}"
        # its rank's own error, or the one line that names the rank whose error ended it; once
        assert len(re.findall(r"^error \(rank \d.*none: no _info\.json found", text, re.M)) == 1, job.tail(i)
    assert any("not restarted: a restart would end the same way" in job.text(i) for i in (1, 2, 3))
    report("an error no restart fixes (no training set), --nnodes=1:3 --max-restarts=3",
           f"every host gone {max(gone.values()):.1f} s after the first error, one failure each, not restarted")


@pytest.mark.hosts
def test_a_host_frozen_for_50_s_rejoins_the_job(hosts, tiny_shards, tmp_path):
    """--nnodes=1:2: host 2 stops (SIGSTOP) for 50 s. Host 1 finds it silent and resumes alone;
    woken, host 2 finds its world gone, its agent joins the next round, and the job finishes at
    dp=2, no worker deaf to its agent's SIGTERM on the way."""
    # Long enough that host 1, alone, is still training when host 2 is back (freeze + 50 s + a round).
    job = Job(hosts, tmp_path, tiny_shards, nnodes="1:2", max_restarts=3, rdzv_conf=ELASTIC, **{"train.epochs": 24})
    frozen = fault_after_first_checkpoint(job, lambda: hosts.freeze(2))
    alone = job.wait_for(1, r"resumed at world=1 \(dp=1 x tp=1\)", BOUND_S + 60) - frozen
    time.sleep(max(0.0, 50 - (time.monotonic() - frozen)))
    hosts.thaw(2)
    woken = time.monotonic()
    rejoined = job.wait_for(1, r"resumed at world=2 \(dp=2 x tp=1\)", 180) - woken
    assert job.exit_code(1, 240) == 0 and job.exit_code(2, 60) == 0, job.tail(1) + job.tail(2)
    (run,) = job.mlflow_runs()
    assert run.info.status == "FINISHED"
    report("a host frozen 50 s (SIGSTOP), elastic", f"host 1 resumes alone {alone:.1f} s after the freeze; "
           f"woken, host 2 is back in training at dp=2 {rejoined:.1f} s later")


def ends_within(proc: subprocess.Popen, timeout: float, log: Path, since: str) -> int:
    """The exit status of ``proc`` (a job writing to ``log``); fails after ``timeout`` s ``since`` what."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {timeout} s after {since}\n{log.read_text()[-4000:]}") from None


def paced_torchrun(nproc: int) -> list[str]:
    """torchrun of tests/paced_train.py on this host, ``nproc`` processes, no restart."""
    cmd = torchrun_cmd(nproc)
    cmd[cmd.index("-m", cmd.index("--max-restarts=0")):cmd.index("distalex.train") + 1] = [str(PACED)]
    return cmd


def test_a_data_error_on_the_loading_rank_ends_every_rank(tiny_shards, tmp_path):
    """tp=2 on one host over HTTP: the server goes away for good after the first checkpoint; rank 0
    (the loading rank) fails, rank 1 (waiting in the batch broadcast) ends on its failure record."""
    server = ShardServer(tiny_shards)
    names = read_info(tiny_shards).splits["train"].shards
    extra = {"data.train_shards": ",".join(f"{server.url}/{n}" for n in names), "data.info": tiny_shards / "_info.json",
             "data.retries": 1, "data.retry_wait_s": 0.2, "data.stall_timeout_s": 5, "train.epochs": 6,
             "parallel.peer_timeout_s": PEER_TIMEOUT_S}
    cmd = paced_torchrun(2)
    log = tmp_path / "job.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd + tiny_overrides(tiny_shards, run_name="d", **extra), cwd=tmp_path,
                                    env=run_env(PACE_STEP_S="0.3", PYTHONPATH=str(REPO)), stdout=out, stderr=subprocess.STDOUT)
        wait_for(log, r"checkpoint: \S+step-", 240)
    finally:
        server.close()
    failed = wait_for(log, r"error \(rank 0\): .*no readable sample", 120)
    code = ends_within(proc, 30, log, "rank 0's error")
    took = time.monotonic() - failed
    text = log.read_text()
    # rank 1 ended on rank 0's failure record, with its status; the one line of the cause is rank 0's
    assert code != 0 and re.search(r"failed \(exitcode: 2\) local_rank: 1", text), text[-4000:]
    assert len(re.findall(r"^error \(rank", text, re.M)) == 1, text[-4000:]
    assert "Traceback (most recent call last)" not in workers_part(text), text[-4000:]
    report("one-sided data error (loading rank)", f"every rank ends {took:.1f} s after rank 0's error, status {code}")


def test_a_wedged_rank_ends_the_job_naming_it_after_every_rank_wrote_its_stack(tiny_shards, tmp_path):
    """dp=3 on one host: rank 1's main thread blocks for good in step 6 (its process and threads
    live, so it keeps beating); ranks 0 and 2 wait for it in the step's gradient all-reduce."""
    limit = 10
    log = tmp_path / "job.log"
    extra = {"parallel.tp": 1, "train.batch_size": 48, "train.epochs": 4, "parallel.progress_timeout_s": limit}
    with open(log, "wb") as out:
        proc = subprocess.Popen(paced_torchrun(3) + tiny_overrides(tiny_shards, run_name="w", **extra), cwd=tmp_path,
                                env=run_env(PACE_STEP_S="0.3", WEDGE="1:6", PYTHONPATH=str(REPO)), stdout=out,
                                stderr=subprocess.STDOUT)
    wedged = wait_for(log, r"paced_train: rank 1 wedged in step 6", 240)
    code = ends_within(proc, limit + 60, log, "the wedge")
    took = time.monotonic() - wedged
    text = log.read_text()
    assert code != 0 and re.search(r"failed \(exitcode: 6\)", text), text[-4000:]
    line = re.search(r"error \(rank 0, [^)]+\): (rank \d \([^)]+\)) made no progress for (\d+) s "
                     rf"\(parallel\.progress_timeout_s={limit}\): stuck in training step 6 ", text)
    assert line and line[1].startswith("rank 1 ") and int(line[2]) >= limit, text[-4000:]  # rank 1 alone is behind
    for rank in range(3):  # every rank's stack, the main thread's first; rank 1's ends in the wedge
        stack = re.findall(rf"^\[rank {rank} \(node 0 [^)]+\)\] (.*)$", text, re.M)
        assert stack and stack[1] == "thread MainThread:", (rank, stack[:5], text[-4000:])
        main = stack[2:stack.index(next(s for s in stack[2:] if s.startswith("thread ")))]
        assert any("distalex/train.py" in s and "in train_epoch" in s for s in main), (rank, main)
        assert ("threading.Event().wait()" in "\n".join(main)) == (rank == 1), (rank, main)
    assert text.index("[rank 1 (") < text.index("made no progress"), "rank 1's stack after the line"
    assert took < limit + 30, f"{took:.1f} s from the wedge to the end of the job"
    no_forced_kill(text)
    report("a wedged rank (main thread stuck, process alive)",
           f"the job ends {took:.1f} s after the wedge (parallel.progress_timeout_s={limit}), naming rank 1, every rank's stack in the log")


def test_a_first_step_or_a_checkpoint_slower_than_the_timeouts_is_not_a_fault(tiny_shards, tmp_path):
    """tp=2 on one host, parallel.peer_timeout_s and progress_timeout_s 4 s: rank 1's first step
    (where a compile would run) takes 10 s, every checkpoint write 6 s more; the job trains on."""
    slow_s, save_s, limit = 2 * 4 + 2, 6, 4
    extra = {"parallel.peer_timeout_s": limit, "parallel.progress_timeout_s": limit, "train.epochs": 1}
    proc = subprocess.run(
        paced_torchrun(2) + tiny_overrides(tiny_shards, run_name="s", **extra), cwd=tmp_path,
        env=run_env(SLOW_STEP=f"1:1:{slow_s}", SLOW_SAVE_S=str(save_s), PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"rank 1 sleeps {slow_s} s in step 1" in proc.stdout + proc.stderr
    assert len(re.findall(r"checkpoint: ", proc.stderr)) == 3, proc.stderr[-4000:]  # steps 3 and 6, the epoch's end
    assert "silent since" not in proc.stderr and "made no progress" not in proc.stderr
    no_forced_kill(proc.stderr)
    report("a first step or a checkpoint write slower than the timeouts",
           f"not a fault: a {slow_s} s first step and {save_s} s checkpoint writes with peer_timeout_s and "
           f"progress_timeout_s at {limit} train on")
