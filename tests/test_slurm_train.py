"""launch/slurm/train.sbatch on real SLURM clusters: training, requeue and resume, bad input, two nodes.

Every job is the demo config shortened (tests/runs.py) in its own working directory (sbatch
--chdir), with the repository's interpreter (PYTHON). The uninterrupted job is the reference the
preempted one must equal, weight for weight. The two-node job runs on a second cluster started
here: its own slurmctld and two slurmd daemons (`slurmd -N NAME`) on this machine, each node at its
own loopback address and port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch

from distalex.checkpoint import complete_checkpoints, load_serial_state
from tests.runs import DEMO_CONFIG, REPO, run_env, tiny_overrides, tiny_shards  # noqa: F401 - fixture
from tests.slurm_fixtures import KILL_TIMEOUT_S, STATE_DIR, SlurmCluster, slurm_cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
RUN = "tiny"
EPOCHS = 3  # 21 steps of 7 per epoch: long enough to requeue twice mid-run
STEPS_PER_EPOCH = 7
FINAL_STEP = EPOCHS * STEPS_PER_EPOCH
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Jobs:
    """Submits train.sbatch jobs; every job still queued at the end of the module is cancelled."""

    def __init__(self, cluster: SlurmCluster):
        self.cluster, self.ids = cluster, []
        self.env = run_env(PYTHON=sys.executable, SLURM_CONF=str(cluster.conf))
        for key in ("OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):  # the script's own defaults
            self.env.pop(key, None)

    def sbatch(self, workdir: Path, args: list[str], flags: tuple[str, ...] = (), wait: bool = False,
               **env: str) -> tuple[int, subprocess.CompletedProcess]:
        """sbatch --chdir=workdir [flags] train.sbatch ARGS with env added to the job's environment.

        The job's log is workdir/runs/slurm/distalex-<id>.out (Slurm does not create the folder).
        """
        (workdir / "runs" / "slurm").mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--chdir={workdir}", *(["--wait"] if wait else []), *flags, str(SCRIPT), *args]
        proc = subprocess.run(cmd, env=dict(self.env, **env), capture_output=True, text=True, timeout=300)
        assert proc.stdout.strip(), f"sbatch refused the job: {proc.stderr}"
        job_id = int(proc.stdout.strip().splitlines()[0].split(";")[0])
        self.ids.append(job_id)
        return job_id, proc

    def submit(self, workdir: Path, args: list[str], flags: tuple[str, ...] = (), **env: str) -> int:
        return self.sbatch(workdir, args, flags, **env)[0]

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.cluster.wait_for(job_id, DONE, timeout=timeout)

    def cancel_all(self) -> None:
        if self.ids:
            self.cluster.run("scancel", *map(str, self.ids), check=False)


@pytest.fixture(scope="module")
def jobs(slurm_cluster):
    j = Jobs(slurm_cluster)
    yield j
    j.cancel_all()


def log_of(workdir: Path, job_id: int) -> str:
    path = workdir / "runs" / "slurm" / f"distalex-{job_id}.out"
    return path.read_text().replace("\r", "\n") if path.exists() else ""


def wait_until(what: str, predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout}s: {what}")


def args_for(shards: Path, **extra) -> list[str]:
    # train.log_every=1: every step's loss goes to MLflow, so a run resumed anywhere must hold exactly
    # steps 1..N (with longer windows, a SIGTERM mid-window drops that window's loss: one gap per stop).
    return [str(DEMO_CONFIG), *tiny_overrides(shards, run_name=RUN, **{"train.epochs": EPOCHS, "train.log_every": 1, **extra})]


def ckpt_root(workdir: Path) -> Path:
    return workdir / "runs" / RUN / "checkpoints"


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_serial_state(ckpt_root(workdir))[0]


def loss_steps(workdir: Path) -> tuple[list[int], object]:
    """The steps of train/loss in the job's MLflow store (runs/mlflow.db), and its one run."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distalex")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert len(runs) == 1, f"{len(runs)} MLflow runs: a requeued job must continue the same run"
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")})
    return steps, runs[0]


@pytest.fixture(scope="module")
def reference_job(jobs, tiny_shards, tmp_path_factory):
    """`sbatch --wait` of the uninterrupted job: the exit status comes back to the submitter."""
    workdir = tmp_path_factory.mktemp("slurm-reference")
    job_id, proc = jobs.sbatch(workdir, args_for(tiny_shards), wait=True)
    return workdir, job_id, proc


def test_sbatch_wait_trains_checkpoints_and_tracks(reference_job, jobs):
    workdir, job_id, proc = reference_job
    log = log_of(workdir, job_id)
    assert proc.returncode == 0, f"sbatch --wait exit {proc.returncode}: {proc.stderr}\n{log[-5000:]}"
    info = jobs.cluster.job(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0")
    # one node, two gloo processes; OMP threads = --cpus-per-task 2 / 2 processes
    assert "1 node(s) x 2 process(es) = world 2, gloo (CPU), OMP_NUM_THREADS=1" in log
    assert f"preflight ok: run {RUN}, dp=1 x tp=2" in log
    # the loader fitted to the allocation: 2 cores (--cpus-per-task), one loading rank, its tp pair
    assert "cores: 2 on each node for 2 process(es), 1 loading rank(s) per node (tp=2): 2 core(s) per loading " \
           "rank -> data.workers=1" in log
    assert "--set data.workers=1" in log.split("config: ", 1)[1].splitlines()[0]
    assert f"epoch {EPOCHS}/{EPOCHS}" in log and "training exited with status 0" in log
    ckpts = complete_checkpoints(ckpt_root(workdir))
    assert ckpts and ckpts[-1].name == f"step-{FINAL_STEP:08d}"
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert meta["train_state"]["epoch"] == EPOCHS and meta["layout"]["tp"] == 2
    steps, run = loss_steps(workdir)
    assert run.info.status == "FINISHED" and run.info.run_id == meta["train_state"]["mlflow_run_id"]
    assert run.data.params["parallel.tp"] == "2" and run.data.params["train.epochs"] == str(EPOCHS)
    assert steps == list(range(1, FINAL_STEP + 1))


def stops_and_resumes(log: str) -> tuple[list[int], list[int]]:
    stopped = [int(s) for s in re.findall(r"stopped by SIGTERM at step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+),", log)]
    return stopped, resumed


def test_requeued_job_resumes_and_continues_one_mlflow_run(reference_job, jobs, tiny_shards, tmp_path):
    """Preempted twice: `scontrol requeue` from outside after the first checkpoint, then the warning
    signal (USR1 to the batch shell) after the resume, which makes the script requeue itself. Each
    time the training saves and stops on SIGTERM and the next start resumes from that checkpoint;
    the job ends COMPLETED with the uninterrupted job's final step, weights and one MLflow run."""
    ref_dir = reference_job[0]
    job_id = jobs.submit(tmp_path, args_for(tiny_shards))
    cluster = jobs.cluster

    wait_until("a first checkpoint", lambda: complete_checkpoints(ckpt_root(tmp_path)), timeout=120, interval=0.05)
    cluster.run("scontrol", "requeue", str(job_id))
    cluster.start_requeued_now(job_id)
    # In its training loop, where a stop saves (during start-up a stop saves nothing: nothing is new)
    wait_until("the first resume's training loop", lambda: "distalex: world" in log_of(tmp_path, job_id).partition(
        "resumed from")[2], timeout=90)
    # the warning that --signal=B:USR1@90 sends before the time limit, as the resumed run starts
    cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    cluster.start_requeued_now(job_id)
    info = jobs.wait_done(job_id, timeout=150)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), log[-5000:]
    assert f"SIGUSR1: the time limit or a preemption is near; requeueing job {job_id}" in log
    for restart in (0, 1, 2):
        assert f"job {job_id} (restart {restart})" in log
    stopped, resumed = stops_and_resumes(log)
    assert len(stopped) == 2 and len(resumed) == 2, log[-5000:]
    for stop, resume in zip(stopped, resumed):  # no completed step is lost, wherever the stop falls
        assert resume == stop, f"stopped at step {stop} but resumed from {resume}"
    assert f"epoch {EPOCHS}/{EPOCHS}" in log and "training exited with status 0" in log.split("(restart 2)")[1]

    steps, run = loss_steps(tmp_path)
    assert run.info.status == "FINISHED"
    assert steps == loss_steps(ref_dir)[0] == list(range(1, FINAL_STEP + 1)), f"train/loss steps: {steps}"
    ref, resumed_weights = final_weights(ref_dir), final_weights(tmp_path)
    for name, tensor in ref.items():
        assert torch.equal(resumed_weights[name], tensor), f"{name} differs from the uninterrupted job"


def test_broken_submissions_fail_fast_with_the_error_in_the_log(jobs, tiny_shards, tmp_path):
    """A bad key, missing shards and a world size that tp does not divide fail in the preflight
    (exit 2, no srun); missing shards with the preflight off fail in torchrun's workers (exit 1).
    None hangs: all four are done within a minute of submission."""
    t0 = time.monotonic()
    one_cpu = ("--cpus-per-task=1",)  # side by side on the 2-core node
    nowhere = tmp_path / "nowhere"
    no_data = args_for(tiny_shards, **{"data.train_shards": nowhere})
    in_training = jobs.submit(tmp_path, no_data, one_cpu, PREFLIGHT="0", MAX_RESTARTS="0")
    no_shards = jobs.submit(tmp_path, no_data, one_cpu)
    odd_world = jobs.submit(tmp_path, args_for(tiny_shards), one_cpu, GPUS_PER_NODE="3")
    bad_key, proc = jobs.sbatch(tmp_path, args_for(tiny_shards) + ["--set", "optim.lrr=1"], one_cpu, wait=True)
    assert proc.returncode == 2  # sbatch --wait hands the job's status to the submitter
    assert "optim.lrr: unknown key, did you mean optim.lr?" in log_of(tmp_path, bad_key)

    expected = {no_shards: f"error: {nowhere}: no _info.json found",
                odd_world: "error: world size 3 (nodes x processes per node) is not divisible by parallel.tp=2"}
    for job_id, message in expected.items():
        info = jobs.wait_done(job_id, timeout=60 - (time.monotonic() - t0))
        log = log_of(tmp_path, job_id)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log[-3000:]
        assert message in log, log[-3000:]
        assert "srun" not in log and "torch.distributed" not in log  # no torchrun was started

    info = jobs.wait_done(in_training, timeout=60 - (time.monotonic() - t0))
    log = log_of(tmp_path, in_training)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0"), log[-3000:]
    assert f"error (rank 0): {nowhere}: no _info.json found" in log, log[-3000:]
    assert "training exited with status 1" in log
    assert time.monotonic() - t0 < 60


@dataclass
class TwoNodes(SlurmCluster):
    nodes: tuple[str, str] = ("", "")


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster) -> Iterator[TwoNodes]:
    """A cluster of two nodes on this machine, beside the one-node cluster: the same config with
    ports 100 higher, node <host> at 127.0.0.1 and node <host>2 at 127.0.0.2, one slurmd each:
    `slurmd -N NAME` with a port, pid file and spool directory (%n) per node. The nodes share this
    machine's cores and file system."""
    root = Path(f"{STATE_DIR}-2nodes")  # short: slurmstepd's sockets live in the spool directory
    stop_daemons(list(root.glob("*.pid")))  # left by a session that was killed
    subprocess.run(["rm", "-rf", str(root)], check=True)
    conf, text = root / "slurm.conf", slurm_cluster.conf.read_text()
    host, addr = re.search(r"^NodeName=(\S+) NodeAddr=(\S+)", text, re.MULTILINE).groups()
    nodes = (host, f"{host}2")
    ctld_port = int(re.search(r"^SlurmctldPort=(\d+)", text, re.MULTILINE).group(1)) + 100
    slurmd_port = int(re.search(r"^SlurmdPort=(\d+)", text, re.MULTILINE).group(1)) + 100
    node_line = re.search(r"^NodeName=\S+ NodeAddr=\S+ (.*)$", text, re.MULTILINE)
    text = text[: node_line.start()] + "\n".join([
        f"NodeName={host} NodeAddr={addr} Port={slurmd_port} {node_line.group(1)}",
        f"NodeName={nodes[1]} NodeAddr=127.0.0.2 NodeHostname={host} Port={slurmd_port + 1} {node_line.group(1)}",
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"  # fmt: skip
    for key, value in {
        "ClusterName": "distalex2nodes", "SlurmctldPort": ctld_port, "SlurmdPort": slurmd_port,
        "StateSaveLocation": root / "state", "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmctldLogFile": root / "slurmctld.log", "SlurmdSpoolDir": root / "spool" / "%n",
        "SlurmdPidFile": root / "slurmd.%n.pid", "SlurmdLogFile": root / "slurmd.%n.log",
    }.items():  # fmt: skip
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
    for folder in ("state", "spool/" + nodes[0], "spool/" + nodes[1]):
        (root / folder).mkdir(parents=True)
    conf.write_text(text)
    daemons = [["/usr/sbin/slurmctld", "-f", str(conf), "-i"]] + [["/usr/sbin/slurmd", "-f", str(conf), "-N", n] for n in nodes]
    pid_files = [root / "slurmctld.pid"] + [root / f"slurmd.{n}.pid" for n in nodes]
    cluster = TwoNodes(conf=conf, env=dict(os.environ, SLURM_CONF=str(conf)), nodes=nodes)
    try:
        for cmd in daemons:  # they fork into the background; no pipe of ours stays open in them
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True, timeout=30)
        wait_until("both nodes idle", lambda: cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
                   == ["idle", "idle"], timeout=30, interval=0.2)
        yield cluster
    finally:
        stop_daemons(pid_files)


def stop_daemons(pid_files: list[Path]) -> None:
    """SIGTERM to each daemon of a pid file (if it still runs that cluster's config); a daemon
    removes its pid file when it has stopped."""
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text())
            if str(pid_file.parent) not in Path(f"/proc/{pid}/cmdline").read_text():
                raise ProcessLookupError(pid)  # the pid is another process's now
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):  # gone already
            pid_file.unlink(missing_ok=True)
    wait_until("the daemons to stop", lambda: not any(p.exists() for p in pid_files), timeout=20)


def test_two_nodes_rendezvous_and_train_like_one(reference_job, two_nodes, tiny_shards, tmp_path):
    """--nodes=2 with one process per node: srun starts a torchrun agent on each node, the agents
    meet at the c10d endpoint on the first node, and the world of 2 trains to the same weights as
    one node with 2 processes."""
    jobs = Jobs(two_nodes)
    try:
        job_id = jobs.submit(tmp_path, args_for(tiny_shards), ("--nodes=2", "--cpus-per-task=1"),
                             GPUS_PER_NODE="1", LOGLEVEL="INFO")
        info = jobs.wait_done(job_id, timeout=120)
    finally:
        jobs.cancel_all()
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    head, second = two_nodes.nodes
    assert f"on {head},{second}: 2 node(s) x 1 process(es) = world 2" in log
    for task in (0, 1):  # srun --label: each agent's lines carry its task number, task 1 on node 2
        line = rf"^{task}: .*\]"
        assert re.search(rf"{line} +rdzv_endpoint +: {head}:\d+$", log, re.MULTILINE), log[:5000]
        assert re.search(rf"{line} +group_world_size=2$", log, re.MULTILINE)
        assert re.search(rf"{line} +group_rank={task}$", log, re.MULTILINE)
        assert re.search(rf"{line} +master_addr={head}$", log, re.MULTILINE), "MASTER_ADDR is not the first node"
    ref = final_weights(reference_job[0])
    two = final_weights(tmp_path)
    for name, tensor in ref.items():
        assert torch.equal(two[name], tensor), f"{name} differs from the one-node job"


def test_requeue_onto_fewer_nodes_continues_the_run(two_nodes, tiny_shards, tmp_path):
    """2 nodes x 2 processes (dp=2 x tp=2). After the first checkpoint the second node is drained and
    the job requeued, and its request cut to the one node left (as a user does to start sooner): it
    comes back on one node (dp=1 x tp=2), resumes from the SIGTERM checkpoint with the weights and
    momentum re-split, ends the interrupted epoch there (the data-position rule for a new dp) and
    completes, in one MLflow run."""
    epochs, steps = 2, STEPS_PER_EPOCH
    jobs = Jobs(two_nodes)
    head, second = two_nodes.nodes
    try:
        job_id = jobs.submit(tmp_path, args_for(tiny_shards, **{"train.epochs": epochs}),
                             ("--nodes=2", "--cpus-per-task=2"), GPUS_PER_NODE="2")
        wait_until("a first checkpoint", lambda: complete_checkpoints(ckpt_root(tmp_path)), timeout=240, interval=0.05)
        two_nodes.run("scontrol", "update", f"NodeName={second}", "State=DRAIN", "Reason=distalex-test")
        two_nodes.run("scontrol", "requeue", str(job_id))
        two_nodes.wait_for(job_id, {"PENDING"}, timeout=KILL_TIMEOUT_S)
        # the request: one node, one task (a torchrun agent) with its 2 CPUs
        two_nodes.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1", "NumCPUs=2")
        two_nodes.start_requeued_now(job_id)
        info = jobs.wait_done(job_id, timeout=240)
    finally:
        jobs.cancel_all()
        two_nodes.run("scontrol", "update", f"NodeName={second}", "State=RESUME", check=False)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-5000:]
    first, second_start = log.split("(restart 1)")
    assert f"on {head},{second}: 2 node(s) x 2 process(es) = world 4" in first
    assert f"on {head}: 1 node(s) x 2 process(es) = world 2" in second_start.splitlines()[0]
    (stop,), (resume,) = stops_and_resumes(log)
    assert resume == stop
    assert "weights and momentum re-split (dp 2 -> 1)" in second_start
    meta = json.loads((complete_checkpoints(ckpt_root(tmp_path))[-1] / "meta.json").read_text())
    if stop % steps:  # stopped inside an epoch: that epoch ends at the stop, the next runs whole
        skipped = steps - stop % steps
        assert f"({skipped} of its {steps} steps skipped)" in second_start
        final = stop + (epochs - stop // steps - 1) * steps
    else:  # at an epoch's end: nothing to skip
        final = epochs * steps
    assert meta["train_state"]["step"] == final and meta["train_state"]["epoch"] == epochs
    assert meta["world"] == {"dp": 1, "tp": 2, "engine": "ddp"}
    steps_logged, run = loss_steps(tmp_path)
    assert run.info.status == "FINISHED" and steps_logged[-1] == final
