"""launch/mlflow-server.sh runs a tracking server that the MLflow client logs runs to."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # each test starts a real MLflow server: about 10 s

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "mlflow-server.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    # PYTHON: the server runs on the interpreter (and mlflow) of the tests.
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=240,
    )


@contextmanager
def _server(*args: str) -> Iterator[subprocess.CompletedProcess[str]]:
    started = _script("start", *args)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield started
    finally:
        stopped = _script("stop", *args)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _status(url: str, host_header: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host_header})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_client_logs_a_run_and_reads_it_back(tmp_path: Path) -> None:
    port, server_dir = _free_port(), tmp_path / "server"
    args = ("--port", str(port), "--dir", str(server_dir))
    uri = f"http://127.0.0.1:{port}"
    with _server(*args) as started:
        assert f"export MLFLOW_TRACKING_URI={uri}" in started.stdout
        pid = int((server_dir / f"server-{port}.pid").read_text())
        again = _script("start", *args)
        assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout

        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("distalex-server-test")).info.run_id
        client.log_param(run_id, "optim.lr", "0.01")
        client.log_param(run_id, "parallel.tp", "2")
        for step, loss in enumerate([2.5, 1.75, 1.25]):
            client.log_metric(run_id, "loss", loss, step=step)
        client.log_text(run_id, "parallel:\n  tp: 2\n", "config.yaml")
        client.set_terminated(run_id)

        # A second client, as another process would: everything comes from the server.
        reader = MlflowClient(tracking_uri=uri)
        run = reader.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"optim.lr": "0.01", "parallel.tp": "2"}
        history = reader.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(0, 2.5), (1, 1.75), (2, 1.25)]
        local = reader.download_artifacts(run_id, "config.yaml", str(tmp_path))
        assert Path(local).read_text() == "parallel:\n  tp: 2\n"

        # The defaults: runs in <dir>/mlflow.db, artifacts uploaded into <dir>/artifacts.
        assert (server_dir / "mlflow.db").stat().st_size > 0
        assert [p.name for p in (server_dir / "artifacts").rglob("config.yaml")] == ["config.yaml"]
        # MLflow 3's host check is on: a foreign Host header is refused on a localhost server.
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search, f"127.0.0.1:{port}") == 200
        assert _status(search, f"evil.example.com:{port}") == 403

    assert not (server_dir / f"server-{port}.pid").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the server and its uvicorn worker are gone
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{uri}/health", timeout=5)


def test_wildcard_bind_accepts_this_machines_name(tmp_path: Path) -> None:
    """Serving other nodes (--host 0.0.0.0): requests that name this machine must pass MLflow's
    Host-header check, or every rank on another node would get 403."""
    port = _free_port()
    name = socket.gethostname()
    with _server("--host", "0.0.0.0", "--port", str(port), "--dir", str(tmp_path / "server")) as started:
        assert "--allowed-hosts" in started.stdout
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search, f"{name}:{port}") == 200
        assert _status(search, f"evil.example.com:{port}") == 403
