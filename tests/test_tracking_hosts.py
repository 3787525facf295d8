"""A file-based MLflow store in a job over two hosts that share the working directory (the common
case on a cluster, and the one where SQLite's locking fails): only rank 0's process opens the file,
and the other host's system metrics still reach the run, relayed through rank 0.

Each host is a network namespace with a hostname of its own (``unshare --uts``), one torchrun agent
each (``tests/hosts.py``). Every process of each host runs with an audit hook, loaded from outside
distalex through ``sitecustomize`` on PYTHONPATH, that records each ``sqlite3.connect`` with its
process id: host 1's record shows the hook works, host 2's must stay empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.hosts import Hosts, agent, host_env, require_hosts
from tests.runs import tiny_overrides, tiny_shards  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.hosts]

AUDIT_HOOK = '''
import os, sys

def _record_sqlite(event, args):
    if event == "sqlite3.connect":
        with open(os.environ["SQLITE_OPENS"], "a") as f:
            f.write(f"{os.getpid()} {args[0]}\\n")

sys.addaudithook(_record_sqlite)
'''


@pytest.fixture
def hosts():
    require_hosts()
    made = Hosts(2)
    try:
        yield made
    finally:
        made.close()


def test_only_rank_0_writes_a_file_store_and_other_hosts_metrics_reach_it(hosts, tiny_shards, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    workdir = tmp_path / "job"  # one working directory for both hosts: a shared file system
    overrides = tiny_overrides(tiny_shards, **{"run_name": "t", "parallel.tp": 1, "train.epochs": 2,
                                               "tracking.system_metrics_interval_s": 1})
    port = 29400 + int(hosts.tag[2:]) % 500
    procs = {}
    for i in (1, 2):
        cmd, env = agent(hosts, i, "2", overrides, port)
        env = host_env(hosts, i, SQLITE_OPENS=str(tmp_path / f"sqlite-opens-host{i}"), **env)
        env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
        named = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"host{i}", *cmd]
        procs[i] = hosts.start(i, named, workdir, tmp_path / f"host{i}.log", env)
    for i, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"host{i}.log").read_text()[-4000:]

    opened = {i: _read(tmp_path / f"sqlite-opens-host{i}") for i in (1, 2)}
    db = workdir / "runs" / "mlflow.db"
    assert str(db) in opened[1], "the audit hook saw no sqlite3.connect on host 1: it does not work"
    assert opened[2] == "", f"host 2 opened the MLflow store's file:\n{opened[2]}"

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("distalex").experiment_id])
    assert run.info.status == "FINISHED"
    for node in ("host1", "host2"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"system/{node}/cpu_utilization_percentage")]
        assert len(steps) >= 2 and len(set(steps)) == len(steps), (node, steps)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
