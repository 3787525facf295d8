"""MLflow tracking: what a run records, that a restart continues it, that logging never stalls or
stops training, and that it works against a real ``mlflow server``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import distalex
from distalex.config import flatten, load_config
from distalex.parallel.dims import ParallelDims
from distalex.tracking import (
    EPOCH_METRICS, METRIC_EPOCH, METRIC_LOSS, METRIC_TOP1, STEP_METRICS, NullTracker, Tracker,
    TrackingWarning,
)
from distalex.tracking.tracker import END_TAG, UNCLEAN_EXITS_TAG

REPO = Path(__file__).resolve().parents[1]
LAYOUT = ParallelDims(dp=2, tp=2, rank=0)  # rank 0 of a 4-process job; no process group needed


@pytest.fixture(autouse=True)
def _no_ambient_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised MLflow sqlite file: creating the tables takes seconds, copying it does not."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def new_store(empty_store: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def config(*overrides: str):
    return load_config(None, ["run_name=tiny", *overrides])


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def step_metrics(step: int) -> dict[str, float]:
    return {METRIC_LOSS: 7.0 - step / 100, STEP_METRICS[1]: 0.01, STEP_METRICS[2]: 500.0 + step, STEP_METRICS[3]: 0.0,
            STEP_METRICS[4]: 2.5, STEP_METRICS[5]: 40.0}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracking_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]


# ------------------------------------------------------------------ a run's record


def test_new_run_records_config_layout_code_metrics_and_artifacts(tmp_path, empty_store):
    run_dir = tmp_path / "runs" / "tiny"
    uri = new_store(empty_store, run_dir.parent)  # the default place: sqlite next to the run dir
    cfg = config("optim.lr=0.02", "train.epochs=3")
    commit_before = head_commit()
    tracker = Tracker.start(cfg, LAYOUT, run_dir, run_id=None)
    commit_after = head_commit()
    assert isinstance(tracker, Tracker) and tracker.tracking_uri == uri

    for step in range(1, 301):
        tracker.log_metrics(step_metrics(step), step=step)
        if step % 100 == 0:
            epoch = step // 100
            tracker.log_metrics({METRIC_TOP1: 1 - epoch / 10, EPOCH_METRICS[0]: 7.0 - epoch,
                                 EPOCH_METRICS[2]: 0.9, EPOCH_METRICS[3]: 6.0, METRIC_EPOCH: float(epoch)}, step=step)
    tracker.log_text("optim:\n  lr: 0.02\n", "config.yaml")
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt", "extra")
    picture = np.zeros((12, 16, 3), dtype=np.uint8)
    picture[:, :8, 0] = 255
    tracker.log_image(picture, "kernels/conv1.png")
    picture[:] = 0  # encoded at the call: changing it afterwards must not change what is sent
    tracker.close("FINISHED")
    assert tracker.errors == 0

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    expected = {k: str(v) for k, v in flatten(cfg).items()}
    assert {k: params[k] for k in expected} == expected
    assert params["optim.lr"] == "0.02" and params["train.epochs"] == "3"
    assert (params["world_size"], params["dp"], params["tp"]) == ("4", "2", "2")
    assert (params["backend"], params["device"]) == ("gloo", "cpu")
    assert params["distalex_version"] == distalex.__version__
    assert params["git_commit"] in {commit_before, commit_after} and len(params["git_commit"]) == 40
    assert run.data.tags["mlflow.source.git.commit"] == params["git_commit"]

    for key in STEP_METRICS:
        steps = [s for s, _ in history(client, tracker.run_id, key)]
        assert steps == list(range(1, 301)), key
    assert history(client, tracker.run_id, METRIC_LOSS)[-1] == (300, pytest.approx(4.0))
    assert history(client, tracker.run_id, METRIC_TOP1) == [(100, 0.9), (200, 0.8), (300, pytest.approx(0.7))]
    assert history(client, tracker.run_id, METRIC_EPOCH) == [(100, 1.0), (200, 2.0), (300, 3.0)]

    assert run.info.artifact_uri.startswith((run_dir.parent / "mlartifacts").as_uri())
    got = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "download")))
    assert (got / "config.yaml").read_text() == "optim:\n  lr: 0.02\n"
    assert (got / "extra" / "notes.txt").read_text() == "hello"
    from PIL import Image

    image = np.asarray(Image.open(got / "kernels" / "conv1.png"))
    assert image.shape == (12, 16, 3) and image[0, 0, 0] == 255 and image[0, 15, 0] == 0


def test_resumed_job_continues_the_same_run(tmp_path, empty_store):
    run_dir = tmp_path / "runs" / "tiny"
    uri = new_store(empty_store, run_dir.parent)
    first = Tracker.start(config("train.epochs=3"), LAYOUT, run_dir, run_id=None)
    for step in range(50):
        first.log_metrics(step_metrics(step), step=step)
    first.close("KILLED")  # preempted; the checkpoint holds first.run_id
    assert MlflowClient(uri).get_run(first.run_id).info.status == "KILLED"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = Tracker.start(config("train.epochs=5"), LAYOUT, run_dir, run_id=first.run_id)
        assert second.run_id == first.run_id
        assert MlflowClient(uri).get_run(first.run_id).info.status == "RUNNING"
        for step in range(50, 100):
            second.log_metrics(step_metrics(step), step=step)
        second.close("FINISHED")
    assert tracking_warnings(caught) == [] and second.errors == 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("distalex").experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    assert [s for s, _ in history(client, first.run_id, METRIC_LOSS)] == list(range(100))
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    # params are write-once: the first attempt's value stays, the change is a tag
    assert run.data.params["train.epochs"] == "3" and run.data.tags["resumed.train.epochs"] == "5"


def test_resume_of_a_run_missing_from_the_store_starts_a_new_one(tmp_path, empty_store):
    run_dir = tmp_path / "runs" / "tiny"
    uri = new_store(empty_store, run_dir.parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker.start(config(), LAYOUT, run_dir, run_id="0" * 32)
    assert isinstance(tracker, Tracker) and tracker.run_id != "0" * 32
    assert len(tracking_warnings(caught)) == 1 and "0" * 32 in tracking_warnings(caught)[0]
    tracker.close()
    assert MlflowClient(uri).get_run(tracker.run_id).data.params["run_name"] == "tiny"


DEAD_JOB = """
import os, sys
from pathlib import Path
from distalex.config import load_config
from distalex.parallel.dims import ParallelDims
from distalex.tracking import Tracker

run_id = sys.argv[2] if len(sys.argv) > 2 else None
tracker = Tracker.start(load_config(None, ["run_name=tiny"]), ParallelDims(dp=2, tp=2, rank=0), Path(sys.argv[1]), run_id)
tracker.log_metrics({"train/loss": 1.0}, step=1)
assert tracker.flush()
print(tracker.run_id, flush=True)
os.kill(os.getpid(), 9)  # dies without a word: no close, no atexit
"""


def dead_job(run_dir: Path, run_id: str | None = None) -> str:
    """A job that opens (or resumes) its run and is then killed with SIGKILL; the run's id."""
    proc = subprocess.run([sys.executable, "-c", DEAD_JOB, str(run_dir), *([run_id] if run_id else [])],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_run_left_running_by_a_killed_job_is_marked_by_the_next_start(tmp_path, empty_store):
    """kill -9 leaves the MLflow run RUNNING for good. The next job of the same run directory marks
    it: resuming it counts the unclean exit in a tag and goes on; starting anew ends it as KILLED,
    saying why. Runs of other run directories are not touched."""
    run_dir = tmp_path / "runs" / "tiny"
    uri = new_store(empty_store, run_dir.parent)
    client = MlflowClient(uri)
    other = Tracker.start(config(f"tracking.uri={uri}"), LAYOUT, tmp_path / "elsewhere" / "tiny", None)
    first = dead_job(run_dir)
    assert client.get_run(first).info.status == "RUNNING"
    resumed = Tracker.start(config(), LAYOUT, run_dir, run_id=first)  # resumes from first's checkpoint
    assert resumed.run_id == first and client.get_run(first).info.status == "RUNNING"
    assert client.get_run(first).data.tags[UNCLEAN_EXITS_TAG] == "1"
    resumed.close("FINISHED")
    second = dead_job(run_dir)  # a new run, killed before its first checkpoint
    fresh = Tracker.start(config(), LAYOUT, run_dir, run_id=None)  # so the next job starts anew
    ended = client.get_run(second)
    assert ended.info.status == "KILLED" and "its job died without ending it" in ended.data.tags[END_TAG]
    assert str(run_dir) in ended.data.tags[END_TAG]
    assert client.get_run(fresh.run_id).info.status == "RUNNING" and fresh.run_id not in (first, second)
    assert client.get_run(first).info.status == "FINISHED"
    assert client.get_run(other.run_id).info.status == "RUNNING"  # another run directory's live run
    fresh.close()
    other.close()


def test_system_metrics_come_from_one_process_per_host_and_can_be_turned_off(tmp_path, empty_store, monkeypatch):
    """A job of 4 ranks on 2 hosts (local ranks 0, 1 on each): MLflow's sampler runs on each host's
    local rank 0 only, under that host's node id; tracking.system_metrics=false: none. With a server
    each host would log directly; here the store is a sqlite file, so host 1 relays its samples
    through the job's TCP store (a real one) and rank 0 alone writes them."""
    uri = new_store(empty_store, tmp_path)
    job_store = torch_store()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(job_store.port))
    cfg = config(f"tracking.uri={uri}", "tracking.system_metrics_interval_s=0.2")
    ranks = [ParallelDims(dp=2, tp=2, rank=r, local_rank=r % 2) for r in range(4)]
    trackers = [Tracker.start(cfg, dims, tmp_path / "runs" / "tiny") for dims in ranks]
    run_id = trackers[0].run_id
    for dims, tracker in zip(ranks, trackers):
        monkeypatch.setenv("SLURMD_NODENAME", f"node-{dims.rank // 2}")  # the name a Slurm node gives
        tracker.watch_host(cfg, dims, run_id, uri)
    assert type(trackers[2]._host).__name__ == "RelayedHostMetrics" and trackers[1]._host is None
    time.sleep(2.0)
    for tracker in reversed(trackers):
        tracker.close()
    client = MlflowClient(uri)
    logged = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    assert {k.split("/")[1] for k in logged} == {"node-0", "node-1"}
    for node in ("node-0", "node-1"):
        for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            steps = [m.step for m in client.get_metric_history(run_id, f"system/{node}/{metric}")]
            assert len(steps) >= 2 and len(set(steps)) == len(steps), (node, metric, steps)  # one sampler each
    off = Tracker.start(config(f"tracking.uri={uri}", "tracking.system_metrics=false"), ranks[0], tmp_path / "runs" / "off")
    off.watch_host(config("tracking.system_metrics=false"), ranks[0], off.run_id, uri)
    time.sleep(0.5)
    off.close()
    assert not [k for k in client.get_run(off.run_id).data.metrics if k.startswith("system/")]


def test_a_relayed_host_continues_its_curve_in_a_resumed_run(tmp_path, empty_store, monkeypatch):
    """A restarted job's relay starts its samples again at 0: rank 0 logs them after the steps the
    run already holds for that host, not over them."""
    from distalex.tracking.system import HostMetricsRelay

    uri = new_store(empty_store, tmp_path)
    run = Tracker.start(config(f"tracking.uri={uri}"), LAYOUT, tmp_path / "runs" / "tiny")
    run.log_metrics({"system/node-1/cpu_utilization_percentage": 5.0}, step=6)
    run.flush()
    job_store = torch_store()
    relay = HostMetricsRelay(job_store, "p/", 1.0, run.log_metrics, run._next_system_step)
    for seq in (0, 1):
        job_store.set("p/samplers", "2,")
        job_store.set("p/rank/2", f'{{"node": "node-1", "seq": {seq}, "metrics": {{"cpu_utilization_percentage": {seq}}}}}')
        relay.poll()
        relay.poll()  # nothing new: nothing logged twice
    run.close()
    history = MlflowClient(uri).get_metric_history(run.run_id, "system/node-1/cpu_utilization_percentage")
    assert sorted((m.step, m.value) for m in history) == [(6, 5.0), (7, 0.0), (8, 1.0)]


@pytest.mark.parametrize("uri, is_file", [
    ("sqlite:///runs/mlflow.db", True), ("sqlite:////abs/mlflow.db", True), ("file:///tmp/mlruns", True),
    ("./mlruns", True), ("/shared/mlruns", True), ("C:/mlruns", True),
    ("http://host:5000", False), ("https://mlflow.example.org", False), ("postgresql://u@db/mlflow", False),
    ("databricks", False), ("databricks://profile", False),
])
def test_file_stores_are_told_from_servers(uri, is_file):
    from distalex.tracking.system import is_file_store

    assert is_file_store(uri) is is_file


def torch_store():
    """A real TCP store on a free local port, as torchrun runs one for every job."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


# ------------------------------------------------------------------ never in the loop's way


def test_logging_is_queued_and_sent_in_batches(tmp_path, empty_store):
    uri = new_store(empty_store, tmp_path)
    tracker = Tracker.start(config(f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"), LAYOUT, tmp_path / "run", None)
    client = MlflowClient(uri)
    sync = []  # what the loop would pay per logging window without the queue
    for i in range(5):
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        client.log_batch(tracker.run_id, metrics=[Metric(f"sync/{k}", v, ts, i) for k, v in step_metrics(i).items()])
        sync.append(time.perf_counter() - t0)
    points = len(step_metrics(0))

    calls = []
    real = tracker._client.log_batch
    tracker._client.log_batch = lambda *a, **kw: (calls.append(len(kw.get("metrics", ()))), real(*a, **kw))[1]
    t0 = time.perf_counter()
    for step in range(1000):
        tracker.log_metrics(step_metrics(step), step=step)
    enqueue = time.perf_counter() - t0
    assert tracker.flush(timeout=60)
    sent = time.perf_counter() - t0
    print(f"synchronous log_batch of {points} points: median {1e3 * sorted(sync)[2]:.1f} ms; "
          f"1000 queued log_metrics: {1e3 * enqueue:.1f} ms; sent after {sent:.2f} s in {len(calls)} calls")
    assert enqueue < 1.0 and enqueue < 1000 * min(sync) / 20
    assert sum(calls) == 1000 * points and len(calls) <= 20  # coalesced, at most 1000 points per call
    for key in STEP_METRICS:
        assert [s for s, _ in history(client, tracker.run_id, key)] == list(range(1000)), key
    tracker.close()


def test_tracking_errors_do_not_stop_training_and_are_reported_once(tmp_path, empty_store):
    uri = new_store(empty_store, tmp_path)
    tracker = Tracker.start(config(f"tracking.uri={uri}"), LAYOUT, tmp_path / "run", None)
    tracker.log_metrics(step_metrics(0), step=0)
    assert tracker.flush()

    def down(*args, **kwargs):  # a dead server: MLflow retries for a while, then raises
        time.sleep(1.0)
        raise ConnectionError("tracking store went away")

    tracker._client.log_batch = down
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_metrics(step_metrics(1), step=1)
        assert tracker.flush()  # handled: failed and counted, not raised
        assert tracker.errors == 1
        t0 = time.perf_counter()
        for step in range(2, 5):
            tracker.log_metrics(step_metrics(step), step=step)
            assert not tracker.flush()  # the store is failing: a checkpoint does not wait for it
        assert time.perf_counter() - t0 < 0.5
        tracker.close("FINISHED")  # waits for the rest, which fails too
    messages = tracking_warnings(caught)
    assert len(messages) == 1 and "tracking store went away" in messages[0]
    assert tracker.errors >= 2
    client = MlflowClient(uri)
    assert [s for s, _ in history(client, tracker.run_id, METRIC_LOSS)] == [0]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"  # the end of run still got through


def test_unreachable_server_leaves_training_untracked_with_one_warning(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker.start(config(f"tracking.uri={uri}"), LAYOUT, tmp_path / "run", run_id="a" * 32)
        tracker.log_metrics(step_metrics(1), step=1)
        tracker.log_text("x", "config.yaml")
        assert tracker.flush()
        tracker.close("FAILED")
    assert time.perf_counter() - t0 < 15  # a health probe, not MLflow's minutes of retries
    messages = tracking_warnings(caught)
    assert len(messages) == 1 and uri in messages[0]
    assert isinstance(tracker, NullTracker) and tracker.run_id == "a" * 32  # kept for the next checkpoint
    assert uri in tracker.describe()


def test_only_rank_zero_tracks(tmp_path):
    worker = Tracker.start(config(), ParallelDims(dp=2, tp=2, rank=3), tmp_path / "runs" / "tiny", run_id="b" * 32)
    off = Tracker.start(config("tracking.enabled=false"), LAYOUT, tmp_path / "runs" / "tiny", run_id=None)
    assert isinstance(worker, NullTracker) and worker.run_id == "b" * 32 and worker.describe() == ""
    assert isinstance(off, NullTracker) and "tracking.enabled" in off.describe()
    assert list(tmp_path.iterdir()) == []  # no store, no directory
    public = lambda cls: {n for n in dir(cls) if not n.startswith("_")} - {"start"}  # noqa: E731
    assert public(NullTracker) - {"reason"} == public(Tracker)


def test_mlflow_sends_no_telemetry_once_distalex_tracking_is_imported():
    env = {k: v for k, v in os.environ.items()
           if k not in {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS"}}
    probe = "import mlflow.telemetry as t; print(t.get_telemetry_client() is None)"
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    ours = subprocess.run([sys.executable, "-c", "import distalex.tracking; " + probe],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "False", plain.stderr  # mlflow alone would start its telemetry client
    assert ours.stdout.strip() == "True", ours.stderr
    assert ours.stderr == ""


# ------------------------------------------------------------------ a real tracking server


@pytest.mark.slow  # starts a real MLflow server
def test_real_mlflow_server_receives_params_metrics_and_artifacts(tmp_path, empty_store, monkeypatch, capsys):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_db = new_store(empty_store, tmp_path / "server")
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", server_db, "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
                    if r.read() == b"OK":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not come up:\n" + (tmp_path / "server.log").read_text()
            time.sleep(0.2)

        tracker = Tracker.start(config(f"tracking.uri={uri}"), LAYOUT, tmp_path / "runs" / "tiny", run_id=None)
        assert isinstance(tracker, Tracker)
        for step in range(1, 201):
            tracker.log_metrics(step_metrics(step), step=step)
        tracker.log_text("optim:\n  lr: 0.01\n", "config.yaml")
        capsys.readouterr()
        tracker.close("FINISHED")
        assert tracker.errors == 0
        assert capsys.readouterr().out == ""  # no "View run" links from the sender thread
        assert f"{uri}/#/experiments/" in tracker.describe()

        client = MlflowClient(uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.lr"] == "0.01" and run.data.params["world_size"] == "4"
        assert [s for s, _ in history(client, tracker.run_id, METRIC_LOSS)] == list(range(1, 201))
        got = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "download"))
        assert Path(got).read_text() == "optim:\n  lr: 0.01\n"
        # it was this server: the run is in its database and the file under its artifact root
        assert MlflowClient(server_db).get_run(tracker.run_id).data.params["optim.lr"] == "0.01"
        assert list((tmp_path / "server" / "artifacts").rglob("config.yaml"))

        # the server dies while a resumed run is logging: training goes on, one warning
        resumed = Tracker.start(config(f"tracking.uri={uri}"), LAYOUT, tmp_path / "runs" / "tiny", tracker.run_id)
        assert resumed.run_id == tracker.run_id
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(201, 211):
                resumed.log_metrics(step_metrics(step), step=step)
            resumed.flush()
            resumed.close("FINISHED")
        assert len(tracking_warnings(caught)) == 1 and resumed.errors >= 2  # the metrics, the run's end
        assert MlflowClient(server_db).get_run(tracker.run_id).info.status == "RUNNING"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
