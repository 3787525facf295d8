"""Separate hosts on one machine for fault tests: network namespaces joined by a switch.

Each host is a network namespace with one veth interface (192.0.2.10 + i, TEST-NET-1: no traffic
leaves the namespaces the test makes). The other ends of the veths are ports of a bridge in a
namespace of its own, the switch. ``cut(i)`` takes host i's switch port down: both sides lose the
carrier and packets vanish without a reset, as when a cable, a switch port or a NIC dies.
``kill(i)`` SIGKILLs every process in host i's namespace (the torchrun agent included), as a host
that crashes; ``freeze(i)`` and ``thaw(i)`` stop and continue them (SIGSTOP, SIGCONT), as a host
that hangs and comes back. Hosts share this machine's file system: one working directory for all
stands for a shared file system, one each for none.

Needs root and iproute2 (``ip netns``): without them the tests (marker ``hosts``) skip with the
reason, and ``require_hosts`` turns that skip into a failure where ``DISTALEX_REQUIRE_HOSTS=1``
(``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runs import DEMO_CONFIG, REPO

SUBNET = "192.0.2"


def require_hosts() -> None:
    """Skip (loudly) where namespaces cannot be made; fail instead under DISTALEX_REQUIRE_HOSTS=1."""
    reason = None
    if shutil.which("ip") is None:
        reason = "iproute2's ip is not installed (Debian: apt-get install iproute2)"
    elif os.geteuid() != 0:
        reason = "making network namespaces needs root"
    if reason is None:
        return
    if os.environ.get("DISTALEX_REQUIRE_HOSTS") == "1":
        pytest.fail(f"multi-host fault tests cannot run: {reason} (DISTALEX_REQUIRE_HOSTS=1)")
    pytest.skip(f"multi-host fault tests skipped: {reason}; set DISTALEX_REQUIRE_HOSTS=1 to make this a failure (.ci/run does)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """``count`` hosts, numbered from 1, and the switch that joins them; ``close`` removes them all."""

    def __init__(self, count: int):
        self.count = count
        self.tag = f"dx{os.getpid() % 100000}{int(time.monotonic() * 10) % 100}"
        self.switch = f"{self.tag}sw"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        """Every log a command started here writes to."""
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i in range(1, count + 1):
                ns, host_if, port = self.ns(i), self.ifname(i), f"{self.tag}p{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", host_if, "type", "veth", "peer", "name", port)
                _ip("link", "set", host_if, "netns", ns)
                _ip("link", "set", port, "netns", self.switch)
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", host_if)
                _ip("-n", ns, "link", "set", host_if, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def ns(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def ifname(self, i: int) -> str:
        return f"{self.tag}v{i}"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def start(self, i: int, cmd: list[str], cwd: Path, log: Path, env: dict) -> subprocess.Popen:
        """Run ``cmd`` on host i, its stdout and stderr into ``log``."""
        cwd.mkdir(parents=True, exist_ok=True)
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *cmd], cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self, i: int) -> list[int]:
        """Processes still running on host i (zombies excluded)."""
        out = subprocess.run(["ip", "netns", "pids", self.ns(i)], capture_output=True, text=True).stdout
        alive = []
        for pid in map(int, out.split()):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                alive.append(pid)
        return alive

    def cut(self, i: int) -> None:
        """Host i's link goes silent (no reset): its switch port is taken down."""
        _ip("-n", self.switch, "link", "set", f"{self.tag}p{i}", "down")

    def kill(self, i: int) -> None:
        """Every process of host i dies at once (SIGKILL), its agent included."""
        self._signal(i, signal.SIGKILL)

    def freeze(self, i: int) -> None:
        """Every process of host i stops (SIGSTOP): its sockets stay open and silent."""
        self._signal(i, signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        self._signal(i, signal.SIGCONT)

    def _signal(self, i: int, signum: int) -> None:
        for pid in self.pids(i):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait_gone(self, i: int, timeout: float) -> float | None:
        """Seconds until no process is left on host i, or None if some still run after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.pids(i):
                return time.monotonic() - start
            time.sleep(0.2)
        return None

    def close(self) -> None:
        for i in range(1, self.count + 1):
            self.kill(i)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in [self.ns(i) for i in range(1, self.count + 1)] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


LAUNCH = REPO / "launch" / "torchrun-hosts.sh"


def agent(hosts: Hosts, i: int, nnodes: str, overrides: list[str], port: int, max_restarts: int = 0,
          script: Path | None = None, rdzv_conf: str = "") -> tuple[list[str], dict[str, str]]:
    """(command, environment) of host i's torchrun agent, started as a user would: with
    launch/torchrun-hosts.sh, one process, the rendezvous on host 1. ``is_host`` says which agent
    holds the store: the hosts share one hostname, so torchrun cannot tell by name."""
    env = dict(RDZV_HOST=hosts.addr(1), RDZV_PORT=str(port), NODES=nnodes, NPROC_PER_NODE="1",
               MAX_RESTARTS=str(max_restarts), JOB_ID="faults", LOCAL_ADDR=hosts.addr(i), PYTHON=sys.executable,
               RDZV_CONF=f"is_host={int(i == 1)}" + (f",{rdzv_conf}" if rdzv_conf else ""))
    if script is not None:
        env["TRAIN_SCRIPT"] = str(script)
    return ["bash", str(LAUNCH), str(DEMO_CONFIG), *overrides], env


def host_env(hosts: Hosts, i: int, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(GLOO_SOCKET_IFNAME=hosts.ifname(i), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env
