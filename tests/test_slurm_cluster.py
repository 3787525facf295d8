"""The local SLURM cluster runs real batch jobs, and requeues them the way train.sbatch needs.

Every test talks to real slurmctld/slurmd daemons (Slurm 22.05) started by
launch/slurm/local-cluster.sh; see tests/slurm_fixtures.py.
"""

from __future__ import annotations

import socket
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _wait_for_file(path: Path, min_lines: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(lines := path.read_text().splitlines()) >= min_lines:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path} has fewer than {min_lines} lines after {timeout}s")


def test_batch_job_runs_two_srun_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "hello.out"
    script = _write(
        tmp_path / "hello.sbatch",
        f"""#!/bin/bash
#SBATCH --job-name=distalex-hello
#SBATCH --ntasks=2
#SBATCH --time=2
#SBATCH --output={out}
echo "batch nodelist=$SLURM_JOB_NODELIST ntasks=$SLURM_NTASKS"
srun --ntasks=2 bash -c 'echo "task procid=$SLURM_PROCID ntasks=$SLURM_NTASKS job=$SLURM_JOB_ID host=$(hostname -s)"'
""",
    )
    done = slurm_cluster.run("sbatch", "--wait", str(script), timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = int(done.stdout.split()[-1])  # "Submitted batch job N"

    host = socket.gethostname().split(".")[0]
    lines = out.read_text().splitlines()
    assert f"batch nodelist={host} ntasks=2" in lines
    tasks = sorted(line for line in lines if line.startswith("task "))
    assert tasks == [f"task procid={rank} ntasks=2 job={job_id} host={host}" for rank in (0, 1)]
    info = slurm_cluster.job(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")


def test_sbatch_wait_returns_the_job_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = _write(tmp_path / "fail.sbatch", f"#!/bin/bash\n#SBATCH --output={tmp_path}/fail.out\nexit 3\n")
    done = slurm_cluster.run("sbatch", "--wait", str(script), timeout=60, check=False)
    assert done.returncode == 3
    info = slurm_cluster.job(int(done.stdout.split()[-1]))
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0")


def _parse_time(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()


def test_requeued_job_gets_sigterm_and_runs_again(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """scontrol requeue: SIGTERM to the batch shell and every step, a BeginTime of
    cred_expire + 1 s later, and `scontrol update StartTime=now` starts it again at once."""
    counter, signals = tmp_path / "counter", tmp_path / "signals"
    script = _write(
        tmp_path / "requeue.sbatch",
        f"""#!/bin/bash
#SBATCH --job-name=distalex-requeue
#SBATCH --ntasks=1
#SBATCH --time=5
#SBATCH --output={tmp_path}/requeue.out
#SBATCH --open-mode=append
echo "${{SLURM_RESTART_COUNT:-unset}}" >> {counter}
if [[ -z ${{SLURM_RESTART_COUNT:-}} ]]; then
    trap 'echo batch-TERM >> {signals}; exit 143' TERM
    srun --ntasks=1 bash -c 'trap "echo step-TERM >> {signals}; exit 0" TERM; sleep 300 & wait' &
    wait
fi
""",
    )
    job_id = slurm_cluster.submit(script)
    slurm_cluster.wait_for(job_id, {"RUNNING"})
    _wait_for_file(counter, 1)
    time.sleep(1)  # let srun start its step so that the step, too, sees the requeue

    requeued_at = time.time()
    slurm_cluster.run("scontrol", "requeue", str(job_id))
    # COMPLETING while the old run is killed; the requeue's BeginTime is set when it ends, so an
    # earlier `scontrol update StartTime=now` is silently overwritten.
    info = slurm_cluster.wait_for(job_id, {"PENDING"}, timeout=30)
    assert (info["Reason"], info["Restarts"]) == ("BeginTime", "1")
    cred_expire = int(slurm_cluster.config_value("AuthInfo").split("cred_expire=")[1].split(",")[0])
    held_for = _parse_time(info["EligibleTime"]) - requeued_at
    assert cred_expire - 2 <= held_for <= cred_expire + 5, (held_for, cred_expire)
    assert sorted(_wait_for_file(signals, 2)) == ["batch-TERM", "step-TERM"]

    slurm_cluster.start_requeued_now(job_id)
    info = slurm_cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info
    assert counter.read_text().splitlines() == ["unset", "1"]
    assert "DUE TO JOB REQUEUE" in (tmp_path / "requeue.out").read_text()


def test_preempted_job_traps_usr1_and_requeues_itself(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The train.sbatch pattern: --signal=B:USR1@90, srun in the background, a trap that
    requeues. A job in partition `urgent` preempts it; the USR1 comes at once
    (preempt_send_user_signal), long before the 120 s GraceTime would requeue it."""
    log = tmp_path / "victim.log"
    victim = _write(
        tmp_path / "victim.sbatch",
        f"""#!/bin/bash
#SBATCH --job-name=distalex-victim
#SBATCH --partition=debug
#SBATCH --exclusive
#SBATCH --time=10
#SBATCH --signal=B:USR1@90
#SBATCH --output={tmp_path}/victim.out
#SBATCH --open-mode=append
echo "start ${{SLURM_RESTART_COUNT:-0}}" >> {log}
[[ ${{SLURM_RESTART_COUNT:-0}} -gt 0 ]] && exit 0
trap 'echo USR1 >> {log}; scontrol requeue $SLURM_JOB_ID' USR1
srun --ntasks=1 sleep 300 &
wait
""",
    )
    victim_id = slurm_cluster.submit(victim)
    slurm_cluster.wait_for(victim_id, {"RUNNING"})
    _wait_for_file(log, 1)

    preempted_at = time.monotonic()
    urgent = slurm_cluster.run(
        "sbatch", "--wait", "--partition=urgent", "--exclusive", "--time=2",
        f"--output={tmp_path}/urgent.out", "--wrap", "echo urgent-ran",
        timeout=60, check=False,
    )  # fmt: skip
    assert urgent.returncode == 0, urgent.stdout + urgent.stderr
    assert (tmp_path / "urgent.out").read_text().strip() == "urgent-ran"
    assert time.monotonic() - preempted_at < 60  # not the 120 s GraceTime

    info = slurm_cluster.wait_for(victim_id, {"PENDING"}, timeout=30)
    assert (info["Reason"], info["Restarts"]) == ("BeginTime", "1")
    assert log.read_text().splitlines() == ["start 0", "USR1"]

    slurm_cluster.start_requeued_now(victim_id)
    info = slurm_cluster.wait_for(victim_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    assert log.read_text().splitlines() == ["start 0", "USR1", "start 1"]
