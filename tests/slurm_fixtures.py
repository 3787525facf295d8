"""A real one-node SLURM cluster for tests, brought up by launch/slurm/local-cluster.sh.

Import the fixture into a test module (``from tests.slurm_fixtures import slurm_cluster``)
and take ``slurm_cluster`` as an argument. The first use in a session starts the cluster and the
session's end stops it again. A cluster that was already up before the session is used and left
running.

The cluster needs root and Debian's Slurm packages (``local-cluster.sh check`` says what is
missing). Without them the tests that use it are skipped with that reason; with
``DISTALEX_REQUIRE_SLURM=1`` (which .ci/run sets) a missing prerequisite fails them instead, and
missing packages are installed by ``local-cluster.sh start`` (apt-get).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm" / "local-cluster.sh"
STATE_DIR = Path(os.environ.get("DISTALEX_SLURM_DIR", "/tmp/distalex-slurm"))

# apt-get on a fresh machine plus daemon start; later starts take about a second.
START_TIMEOUT_S = 600
REQUIRE = "DISTALEX_REQUIRE_SLURM"
CHECK_INSTALLABLE, CHECK_IMPOSSIBLE = 3, 4  # local-cluster.sh check: packages missing / not root or not Debian
# A requeued or cancelled job leaves COMPLETING within KillWait (30 s) of its SIGTERM.
KILL_TIMEOUT_S = 45


@dataclass
class SlurmCluster:
    """Handle on the running cluster: its config and a few client-side helpers."""

    conf: Path
    env: dict[str, str] = field(repr=False)

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (sbatch, scontrol, squeue...) against this cluster."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )

    def submit(self, script: Path, *flags: str) -> int:
        """sbatch without waiting; returns the job id."""
        out = self.run("sbatch", "--parsable", *flags, str(script)).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, BeginTime, ExitCode...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Poll until the job's JobState is in `states`; returns the job record."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info["JobState"] not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}")
            time.sleep(0.2)
            info = self.job(job_id)
        return info

    def start_requeued_now(self, job_id: int) -> None:
        """Lift the BeginTime hold (cred_expire + 1 s) that `scontrol requeue` puts on a job.

        Two traps of Slurm 22.05: an update while the job is still COMPLETING is overwritten when
        the requeue finishes, so wait for PENDING; and slurmd refuses to relaunch a job within the
        second its credential was revoked ("Job N already killed, do not launch batch job"), which
        ends the job FAILED instead of running it, so let that second pass.
        """
        self.wait_for(job_id, {"PENDING"}, timeout=KILL_TIMEOUT_S)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def config_value(self, key: str) -> str:
        """One entry of `scontrol show config`, e.g. KillWait or AuthInfo."""
        out = self.run("scontrol", "show", "config").stdout
        match = re.search(rf"^{re.escape(key)}\s*=\s*(.*)$", out, re.MULTILINE)
        if match is None:
            raise KeyError(f"{key} not in scontrol show config")
        return match.group(1).strip()


def _script(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=START_TIMEOUT_S
    )


def cannot_run_here() -> str | None:
    """Why the cluster cannot start on this machine (as this session runs), or None."""
    check = _script("check")
    reason = check.stdout.strip() or check.stderr.strip()
    if check.returncode == CHECK_IMPOSSIBLE:
        return reason
    if check.returncode == CHECK_INSTALLABLE and os.environ.get(REQUIRE) != "1":
        return reason  # installing system packages is for CI (or `local-cluster.sh start` by hand)
    if check.returncode not in (0, CHECK_INSTALLABLE):
        return f"local-cluster.sh check failed (exit {check.returncode}): {reason}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = cannot_run_here()
    if reason is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"SLURM tests required ({REQUIRE}=1) but cannot run: {reason}", pytrace=False)
        pytest.skip(f"SLURM tests skipped: {reason}; set {REQUIRE}=1 to make this a failure (.ci/run does)")
    was_up = _script("status").returncode == 0
    started = _script("start")
    if started.returncode != 0:
        if not was_up:
            _script("stop")  # whatever did start
        pytest.fail(
            f"local-cluster.sh start failed (exit {started.returncode}):\n"
            f"{started.stdout}\n{started.stderr}",
            pytrace=False,
        )
    conf = STATE_DIR / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        yield SlurmCluster(conf=conf, env=env)
    finally:
        if not was_up:
            stopped = _script("stop")
            assert stopped.returncode == 0, f"local-cluster.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}"
