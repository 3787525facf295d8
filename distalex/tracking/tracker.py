"""The trackers: ``Tracker`` writes one MLflow run from rank 0 through a background sender thread;
``NullTracker`` is what every other rank (or a run with tracking off) gets.

Why a background thread: one synchronous MLflow call costs 6-15 ms against a local sqlite store
(more against a server), so ``log_metrics`` only appends to a queue; a sender thread coalesces what
has piled up into ``log_batch`` calls of up to 1000 points. ``flush`` waits until everything queued
so far has been sent; ``close`` flushes and ends the run. A tracking error never stops training: the
first one is reported as a ``TrackingWarning``, later ones are only counted (``Tracker.errors``).
"""

from __future__ import annotations

import atexit
import getpass
import os
import queue
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from distalex.tracking.datasets import shard_datasets
from distalex.tracking.images import png_bytes
from distalex.tracking.params import run_params
from distalex.tracking.store import (
    TrackingWarning, check_server, default_artifact_location, resolve_tracking_uri, sqlite_path, view_command,
)
from distalex.tracking.system import HostMetrics, HostMetricsRelay

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from distalex.config import Config, DataConfig
    from distalex.parallel.dims import ParallelDims

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_DIR_TAG = "distalex.run_dir"
UNCLEAN_EXITS_TAG = "distalex.unclean_exits"
"""How often a job of this run died without ending it (kill -9, out of memory, a lost node) and the run was resumed."""
END_TAG = "distalex.end"
"""Why a run that a dead job left RUNNING was ended by the next start of its run directory."""

# MLflow's limits per log_batch call (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100

_LINGER_S = 1.0
"""The sender waits this long after the first queued item so that a few logging windows go out in
one call (flush and close cut the wait short). At most this much is lost on a hard kill."""
_FLUSH_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 30.0
"""Longest flush/close waits. A dead server must not hold a checkpoint or a SIGTERM exit for the
minutes that MLflow's own HTTP retries take (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, with
exponential backoff); a healthy store takes well under a second for thousands of points."""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class NullTracker:
    """What a rank that does not log gets: every method does nothing.

    ``run_id`` is the id it was given, so a job resumed with tracking off (or unreachable) still
    carries its MLflow run id into the next checkpoint. ``reason`` says why rank 0 is not logging.
    """

    def __init__(self, run_id: str | None = None, reason: str | None = None):
        self._run_id = run_id
        self.reason = reason
        self._host: HostMetrics | None = None

    def watch_host(self, cfg: Config, dims: ParallelDims, run_id: str | None, uri: str | None) -> None:
        """System metrics of this host into run ``run_id`` at ``uri``, on the host's local rank 0
        (``tracking.system``); every rank calls it, with the run id and store rank 0 opened."""
        self._host = HostMetrics.start(cfg, dims, run_id, uri)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        return None

    @property
    def errors(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, file_name: str) -> None:
        pass

    def log_image(self, image: Any, file_name: str) -> None:
        pass

    def log_datasets(self, data: DataConfig) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: float = _CLOSE_TIMEOUT_S) -> None:
        if self._host is not None:
            self._host.stop()
            self._host = None

    def describe(self) -> str:
        return f"MLflow: off ({self.reason})" if self.reason else ""

    def print_location(self) -> None:
        if self.reason:
            print(self.describe(), flush=True)


_STOP = object()


class Tracker:
    """One MLflow run, written from rank 0 through a background sender thread.

    Use ``Tracker.start``; the constructor takes an already open run.
    """

    def __init__(self, client: MlflowClient, run_id: str, uri: str, experiment_id: str, experiment: str):
        self._client = client
        self._run_id = run_id
        self._uri = uri
        self._experiment_id = experiment_id
        self._experiment = experiment
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._hurry = threading.Event()  # set by flush/close: send now, don't linger
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._enqueued = 0  # items put on the queue
        self._done = 0  # items the sender has handled (sent, or failed and counted)
        self._errors = 0
        self._failing = False  # the last MLflow call failed
        self._reported = False
        self._closed = False
        self._host: HostMetrics | None = None
        self._relay: HostMetricsRelay | None = None
        self._sender = threading.Thread(target=self._send_loop, name="distalex-mlflow", daemon=True)
        self._sender.start()
        atexit.register(self._at_exit)

    # -------------------------------------------------------------- opening a run

    @classmethod
    def start(
        cls, cfg: Config, dims: ParallelDims, run_dir: Path, run_id: str | None = None
    ) -> Tracker | NullTracker:
        """Open (or, with ``run_id``, continue) this job's run on rank 0; a ``NullTracker`` elsewhere.

        A store that cannot be opened or a server that does not answer is reported once as a
        ``TrackingWarning`` and training goes on untracked (the returned NullTracker keeps run_id).
        """
        if not dims.is_main:
            return NullTracker(run_id)
        if not cfg.tracking.enabled:
            return NullTracker(run_id, reason="tracking.enabled is false")
        uri = resolve_tracking_uri(cfg, Path(run_dir))
        try:
            return cls._open(cfg, dims, Path(run_dir), uri, run_id)
        except Exception as e:  # noqa: BLE001 - no tracking problem may stop a training job
            warnings.warn(
                f"MLflow tracking at {uri} failed to start, training goes on without it: "
                f"{type(e).__name__}: {e}",
                TrackingWarning, stacklevel=2,
            )
            return NullTracker(run_id, reason=f"could not start at {uri}")

    @classmethod
    def _open(cls, cfg: Config, dims: ParallelDims, run_dir: Path, uri: str, run_id: str | None) -> Tracker:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        check_server(uri)
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        params = run_params(cfg, dims)
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(
                    f"MLflow run {run_id} is not in {uri}; starting a new run (the curves restart there)",
                    TrackingWarning, stacklevel=3,
                )
                run = None
            if run is not None:
                _end_runs_left_running(client, run.info.experiment_id, run_dir, resumed=run)
                _continue_run(client, run, params)
                exp = client.get_experiment(run.info.experiment_id)
                return cls(client, run_id, uri, run.info.experiment_id, exp.name)
        experiment_id = _experiment_id(client, cfg.tracking.experiment, default_artifact_location(uri))
        _end_runs_left_running(client, experiment_id, run_dir, resumed=None)
        commit = params["git_commit"]
        tags = {
            "mlflow.source.name": "distalex.train",
            "mlflow.source.type": "JOB",
            RUN_DIR_TAG: str(run_dir.resolve()),
            "distalex.layout": dims.describe(),
        }
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit
        try:
            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            pass
        run = client.create_run(experiment_id, tags=tags, run_name=cfg.tracking.run_name or cfg.run_name)
        _log_params(client, run.info.run_id, params)
        return cls(client, run.info.run_id, uri, experiment_id, cfg.tracking.experiment)

    # -------------------------------------------------------------- what the loop calls

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def errors(self) -> int:
        """Failed MLflow calls so far (only the first one is reported)."""
        return self._errors

    def watch_host(self, cfg: Config, dims: ParallelDims, run_id: str | None, uri: str | None) -> None:
        """System metrics of this host into the run (``tracking.system``), as on every other rank;
        with a file store, also those the other hosts relay (rank 0 is the file's one writer)."""
        self._host = HostMetrics.start(cfg, dims, run_id, uri)
        self._relay = HostMetricsRelay.start(cfg, dims, run_id, uri, self.log_metrics, self._next_system_step)

    def _next_system_step(self, node: str) -> int:
        """The step after the last system metric of ``node`` in this run (0 for a new node)."""
        try:
            history = self._client.get_metric_history(self._run_id, f"system/{node}/cpu_utilization_percentage")
        except Exception:  # noqa: BLE001 - a store that does not answer: start the node's curve at 0
            return 0
        return max((m.step for m in history), default=-1) + 1

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``{name: value}`` at ``step``; returns at once. Values must be Python numbers
        (``float()`` of a CUDA tensor here would be a device sync)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._put([Metric(key, float(value), ts, int(step)) for key, value in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file (or a directory) for upload under ``artifact_path``.

        The file is read when the sender reaches it (within about a second, or at the next
        flush), so don't rewrite or delete it before then.
        """
        path = Path(path)
        if path.is_dir():
            self._put(lambda c: c.log_artifacts(self._run_id, str(path), artifact_path), f"upload {path}")
        else:
            self._put(lambda c: c.log_artifact(self._run_id, str(path), artifact_path), f"upload {path}")

    def log_text(self, text: str, file_name: str) -> None:
        """Store ``text`` as the artifact ``file_name`` (e.g. the resolved config YAML)."""
        self._put(lambda c: c.log_text(self._run_id, text, file_name), f"write {file_name}")

    def log_image(self, image: Any, file_name: str) -> None:
        """Store a picture as the PNG artifact ``file_name`` (e.g. ``kernels/conv1-step00001000.png``).

        ``image``: a PNG file path, PNG bytes, a matplotlib figure, a PIL image, or an (H, W[, C])
        array (uint8, or floats in [0, 1]). It is encoded now, so the caller may reuse it at once.
        """
        data = png_bytes(image)
        self._put(lambda c: _log_bytes(c, self._run_id, data, file_name), f"write {file_name}")

    def log_datasets(self, data: DataConfig) -> None:
        """The training and validation shards as the run's dataset inputs (``tracking.datasets``)."""
        try:
            inputs = shard_datasets(data)
        except Exception as e:  # noqa: BLE001 - the run goes on without its dataset inputs
            self._report(f"MLflow run {self._run_id}: the shards are not logged as its datasets: {type(e).__name__}: {e}")
            return
        self._put(lambda c: c.log_inputs(self._run_id, datasets=inputs), "log the shards as datasets")

    def set_tag(self, key: str, value: str) -> None:
        """Queue the run tag ``key`` = ``value`` (e.g. ``distalex.plateau``); returns at once."""
        self._put(lambda c: c.set_tag(self._run_id, key, value), f"set the tag {key}")

    def flush(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        """Wait until everything queued so far has been handled (sent, or failed and counted).

        Returns False without waiting further when the store is failing (the last call failed:
        a checkpoint should not wait for a dead server) or when ``timeout`` runs out.
        """
        with self._lock:
            target = self._enqueued
        return self._wait(target, timeout, give_up_on_failure=True)

    def close(self, status: str = "FINISHED", timeout: float = _CLOSE_TIMEOUT_S) -> None:
        """Send what is queued, end the run with ``status`` (FINISHED, FAILED or KILLED), stop the sender.

        Waits up to ``timeout`` even while the store is failing: this is its last chance to answer.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        if self._closed:
            return
        for watcher in (self._relay, self._host):  # their last samples go in while the run still says RUNNING
            if watcher is not None:
                watcher.stop()
        self._relay = self._host = None
        self._put(lambda c: c.set_terminated(self._run_id, status), f"end the run as {status}")
        self._put(_STOP, "stop")
        self._closed = True
        atexit.unregister(self._at_exit)
        with self._lock:
            target = self._enqueued
        if not self._wait(target, timeout, give_up_on_failure=False):
            with self._lock:
                left = self._enqueued - self._done
            self._report(f"MLflow at {self._uri} did not take the last {left} items within {timeout:.0f} s; "
                         f"run {self._run_id} may be incomplete and stay RUNNING")

    def describe(self) -> str:
        """Where this run is and how to look at it."""
        lines = [f"MLflow run {self._run_id} in experiment '{self._experiment}' ({self._experiment_id})",
                 f"  tracking URI: {self._uri}"]
        if self._uri.startswith(("http://", "https://")):
            lines.append(f"  view: {self._uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}")
        else:
            lines.append(f"  view: {view_command(self._uri)}   "
                         f"(then http://127.0.0.1:5000/#/experiments/{self._experiment_id}/runs/{self._run_id})")
        return "\n".join(lines)

    def print_location(self) -> None:
        print(self.describe(), flush=True)

    # -------------------------------------------------------------- the sender thread

    def _put(self, item: Any, what: str | None = None) -> None:
        if self._closed:
            raise RuntimeError(f"tracker of run {self._run_id} is closed")
        with self._lock:
            self._enqueued += 1
            self._queue.put((item, what))

    def _send_loop(self) -> None:
        while True:
            items = [self._queue.get()]  # blocks until there is something to send
            self._hurry.wait(_LINGER_S)  # let a few logging windows pile up into one call
            self._hurry.clear()
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = self._send(items)
            with self._sent:
                self._done += len(items)
                self._sent.notify_all()
            if stop:
                return

    def _send(self, items: list[tuple[Any, str | None]]) -> bool:
        """Send in order: consecutive metric lists as log_batch calls of up to 1000 points, every
        other item (an upload, the end of the run) by itself. True when the stop item was reached."""
        points: list = []

        def send_points() -> None:
            for chunk in _chunks(points, _MAX_METRICS_PER_BATCH):
                self._call(lambda c: c.log_batch(self._run_id, metrics=chunk), f"log {len(chunk)} metric points")
            points.clear()

        for item, what in items:
            if isinstance(item, list):
                points.extend(item)
                continue
            send_points()
            if item is _STOP:
                return True
            self._call(item, what)
        send_points()
        return False

    def _wait(self, target: int, timeout: float, give_up_on_failure: bool) -> bool:
        def ready() -> bool:
            return self._done >= target or (give_up_on_failure and self._failing)

        self._hurry.set()
        with self._sent:
            self._sent.wait_for(ready, timeout=timeout)
            return self._done >= target

    def _call(self, fn: Callable[[MlflowClient], Any], what: str) -> None:
        try:
            fn(self._client)
            self._failing = False
        except Exception as e:  # noqa: BLE001 - counted and reported once; training goes on
            self._errors += 1
            self._failing = True
            self._report(f"MLflow at {self._uri} failed to {what} for run {self._run_id}: "
                         f"{type(e).__name__}: {e}. Training goes on; further tracking errors are "
                         "only counted")

    def _report(self, message: str) -> None:
        """Warn about the first problem only: a dead server must not flood the training log."""
        with self._lock:
            first, self._reported = not self._reported, True
        if first:
            warnings.warn(message, TrackingWarning, stacklevel=2)

    def _at_exit(self) -> None:
        """A process that never called close() still sends what it logged (the run stays RUNNING)."""
        self.flush(timeout=10.0)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as e:  # another job created it between the two calls
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":  # a run cannot be created in a deleted experiment
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def _continue_run(client: MlflowClient, run, params: dict[str, str]) -> None:
    """Mark a resumed run RUNNING again. Params are write-once in MLflow: new keys are logged, and a
    value that differs from the first attempt's (a changed config, another commit or world size)
    is recorded as the tag ``resumed.<key>`` rather than logged twice."""
    from mlflow.entities import RunTag

    client.update_run(run.info.run_id, status="RUNNING")
    old = run.data.params
    _log_params(client, run.info.run_id, {k: v for k, v in params.items() if k not in old})
    changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in old and old[k] != v]
    for chunk in _chunks(changed, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, tags=chunk)


def _end_runs_left_running(client: MlflowClient, experiment_id: str, run_dir: Path, resumed) -> None:
    """Runs of this run directory that MLflow still shows RUNNING: a job died without a word (kill -9,
    out of memory, a lost node) before it could end them. The run this job resumes counts it in a
    tag and goes on; any other is ended as KILLED, with a tag that says so."""
    now, where = time.strftime("%Y-%m-%d %H:%M:%S"), str(run_dir.resolve())
    if resumed is not None and resumed.info.status == "RUNNING":
        count = int(resumed.data.tags.get(UNCLEAN_EXITS_TAG, "0")) + 1
        client.set_tag(resumed.info.run_id, UNCLEAN_EXITS_TAG, str(count))
    if "'" in where:  # not expressible in a filter string; such a run stays as it is
        return
    left = client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{where}' and attributes.status = 'RUNNING'")
    for run in left:
        if resumed is not None and run.info.run_id == resumed.info.run_id:
            continue
        client.set_tag(run.info.run_id, END_TAG, f"its job died without ending it (kill -9, out of memory, a lost "
                                                 f"node); ended as KILLED by the next start of {where} at {now}")
        client.set_terminated(run.info.run_id, "KILLED")


def _log_bytes(client: MlflowClient, run_id: str, data: bytes, file_name: str) -> None:
    directory, name = os.path.split(file_name)
    tmp = tempfile.mkdtemp(prefix="distalex-artifact-")
    try:
        local = Path(tmp) / name
        local.write_bytes(data)
        client.log_artifact(run_id, str(local), directory or None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

