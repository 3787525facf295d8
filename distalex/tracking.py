"""The MLflow side of a training run: one run per job, continued across restarts, logged from rank 0.

``Tracker.start`` is called on every rank. Rank 0 gets a ``Tracker`` bound to an MLflow run; every
other rank (and rank 0 when tracking is off or cannot start) gets a ``NullTracker`` whose methods
do nothing, so the loop calls them unconditionally and the choice is made in one visible place.

Where the run goes: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<run_dir>/../mlflow.db``, with a new experiment's artifacts in ``<run_dir>/../mlartifacts``
(MLflow 3 would otherwise use ``./mlruns`` relative to the working directory).

Why a background thread: one synchronous MLflow call costs 6-15 ms against a local sqlite store
(more against a server), so ``log_metrics`` only appends to a queue; a sender thread coalesces what
has piled up into ``log_batch`` calls of up to 1000 points. ``flush`` waits until everything queued
so far has been sent; ``close`` flushes and ends the run. A tracking error never stops training: the
first one is reported as a ``TrackingWarning``, later ones are only counted (``Tracker.errors``).
"""

from __future__ import annotations

import atexit
import getpass
import io
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

# MLflow 3 sends usage telemetry from a background thread unless told not to; the clusters this
# runs on are often offline. Must be set before mlflow is first imported (it decides at import).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# With a server URI, MlflowClient.set_terminated prints "View run ... at" links to stdout, here from
# the sender thread into the progress bar; print_location says the same once, when asked.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import distalex

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from distalex.config import Config
    from distalex.parallel.dims import ParallelDims

# ------------------------------------------------------------------ metric names (read by the report)

METRIC_LOSS = "train/loss"
"""Training loss, mean over the last ``train.log_every`` steps and over the dp groups."""
METRIC_LR = "train/lr"
METRIC_IMAGES_PER_S = "train/images_per_s"
"""Global training throughput over the last logging window."""
METRIC_SKIPPED = "train/skipped_samples"
"""Samples the loader dropped (unreadable images) so far."""
METRIC_EPOCH_LOSS = "train/epoch_loss"
METRIC_TOP1 = "val/top1_error"
METRIC_TOP5 = "val/top5_error"
METRIC_VAL_LOSS = "val/loss"
METRIC_EPOCH = "epoch"
"""Epochs completed, logged at the step where validation ran (maps steps to epochs in plots)."""

STEP_METRICS = (METRIC_LOSS, METRIC_LR, METRIC_IMAGES_PER_S, METRIC_SKIPPED)
EPOCH_METRICS = (METRIC_EPOCH_LOSS, METRIC_TOP1, METRIC_TOP5, METRIC_VAL_LOSS, METRIC_EPOCH)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation): per log_batch call, and per param value.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000

_LINGER_S = 1.0
"""The sender waits this long after the first queued item so that a few logging windows go out in
one call (flush and close cut the wait short). At most this much is lost on a hard kill."""
_HEALTH_TIMEOUT_S = 5.0
_FLUSH_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 30.0
"""Longest flush/close waits. A dead server must not hold a checkpoint or a SIGTERM exit for the
minutes that MLflow's own HTTP retries take (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, with
exponential backoff); a healthy store takes well under a second for thousands of points."""


class TrackingWarning(RuntimeWarning):
    """MLflow could not be reached or refused something; training goes on without it."""


class TrackingError(RuntimeError):
    """Tracking cannot start (the server does not answer, the store cannot be opened)."""


# ------------------------------------------------------------------ where the run goes


def resolve_tracking_uri(cfg: Config, run_dir: Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the sqlite file next to the run directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((Path(run_dir).parent / "mlflow.db").resolve())


def sqlite_path(uri: str, base: Path | None = None) -> Path | None:
    """The database file of a ``sqlite:///`` URI; a relative path is taken from ``base`` (default:
    the working directory). None for any other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return (Path(base or ".") / path).resolve()


def default_artifact_location(uri: str) -> str | None:
    """For a sqlite store, ``mlartifacts/`` next to the database file; a server decides for itself."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def view_command(uri: str) -> str:
    """How to look at runs stored at ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def git_commit(repo_dir: Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git working tree that holds the distalex package; ("unknown", None) if none.

    Only a tree whose ``distalex/`` is this package counts (an installed copy inside some other
    repository does not). ``--no-optional-locks``: never take index.lock beside other git users.
    """
    pkg = Path(distalex.__file__).resolve().parent
    where = Path(repo_dir) if repo_dir is not None else pkg.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", str(where), *args],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if repo_dir is None and top / "distalex" != pkg:
            return "unknown", None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def run_params(cfg: Config, dims: ParallelDims) -> dict[str, str]:
    """Everything a run is started with: the resolved config as dotted keys, the world layout, the code."""
    from distalex.config import flatten
    from distalex.parallel.dims import backend_for

    commit, dirty = git_commit()
    params: dict[str, Any] = dict(flatten(cfg))
    params.update(
        world_size=dims.world_size, dp=dims.dp, tp=dims.tp,
        backend=backend_for(dims.device), device=dims.device.type,
        distalex_version=distalex.__version__,
        git_commit=commit, git_dirty="unknown" if dirty is None else dirty,
    )
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > _MAX_PARAM_LENGTH:  # MLflow rejects the whole batch otherwise
        text = text[: _MAX_PARAM_LENGTH - 15] + "...(truncated)"
    return text


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_server(uri: str) -> None:
    """Fail in seconds when an HTTP tracking server does not answer (MLflow's own retries take minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as r:
            r.read()
    except (OSError, urllib.error.URLError) as e:
        raise TrackingError(f"no MLflow server answers at {url} ({e})") from None


def _png_bytes(image: Any) -> bytes:
    """A PNG file path, PNG bytes, a matplotlib figure, a PIL image or an (H, W[, C]) array, as PNG bytes."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buf = io.BytesIO()
    if hasattr(image, "savefig"):  # matplotlib Figure
        image.savefig(buf, format="png")
        return buf.getvalue()
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:  # floats in [0, 1]
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ the trackers


class NullTracker:
    """What a rank that does not log gets: every method does nothing.

    ``run_id`` is the id it was given, so a job resumed with tracking off (or unreachable) still
    carries its MLflow run id into the next checkpoint. ``reason`` says why rank 0 is not logging.
    """

    def __init__(self, run_id: str | None = None, reason: str | None = None):
        self._run_id = run_id
        self.reason = reason

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

    def flush(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: float = _CLOSE_TIMEOUT_S) -> None:
        pass

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

        _check_server(uri)
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
                _continue_run(client, run, params)
                exp = client.get_experiment(run.info.experiment_id)
                return cls(client, run_id, uri, run.info.experiment_id, exp.name)
        experiment_id = _experiment_id(client, cfg.tracking.experiment, default_artifact_location(uri))
        commit = params["git_commit"]
        tags = {
            "mlflow.source.name": "distalex.train",
            "mlflow.source.type": "JOB",
            "distalex.run_dir": str(run_dir.resolve()),
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
        data = _png_bytes(image)
        self._put(lambda c: _log_bytes(c, self._run_id, data, file_name), f"write {file_name}")

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


def _log_bytes(client: MlflowClient, run_id: str, data: bytes, file_name: str) -> None:
    directory, name = os.path.split(file_name)
    tmp = tempfile.mkdtemp(prefix="distalex-artifact-")
    try:
        local = Path(tmp) / name
        local.write_bytes(data)
        client.log_artifact(run_id, str(local), directory or None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
