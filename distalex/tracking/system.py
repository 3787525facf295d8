"""System metrics per host: MLflow's own sampler (CPU, memory, disk, network; GPU where nvidia-ml-py
is installed), started by one process per host into the job's run, as ``system/<host>/<metric>``.

The process with local rank 0 on each host samples (torchrun's LOCAL_RANK: one per node), so every
host's load, memory and GPU use shows up once in the run, under its own node id: the Slurm node
name, else the host name. ``tracking.system_metrics: false`` turns it off;
``tracking.system_metrics_interval_s`` is the sampling interval.

Who writes to the store depends on what it is:

- **A server** (``http(s)://`` and other database URIs): every host's sampler logs to it directly.
- **A file** (``sqlite:///``, ``file:`` or a plain path; the default ``runs/mlflow.db``): only rank
  0's process writes. SQLite's locking is not safe on a network file system, and on a cluster the
  working directory that holds the file is usually one that every host mounts; a file on a local
  disk would not even be the same file on another host. So on rank 0's host MLflow's sampler runs
  in rank 0's process (``HostMetrics``), and every other host's sampler (``RelayedHostMetrics``)
  puts its aggregated samples into the job's TCP store (torchrun's ``MASTER_ADDR:MASTER_PORT``,
  which every rank reaches); rank 0 reads them there and logs them through its own tracker
  (``HostMetricsRelay``). Those hosts never open the store's file.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import threading
import warnings
from typing import TYPE_CHECKING, Callable

from distalex.tracking.store import TrackingWarning

if TYPE_CHECKING:
    from distalex.config import Config
    from distalex.parallel.dims import ParallelDims

_STOP_TIMEOUT_S = 5.0
"""Longest wait for the sampler's last send: a dead server must not hold the end of a job."""


SAMPLER_RANKS_KEY = "samplers"
"""In the relay's key space: the ranks whose hosts relay their samples, appended as "rank,"."""


def node_id() -> str:
    """This host's name in the run's system metrics."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def is_file_store(uri: str) -> bool:
    """Whether ``uri`` is a tracking store in a file (sqlite, ``file:``, a plain path) rather than
    a server or a database server, which take writes from many processes at once."""
    if uri == "databricks":  # MLflow's name for the Databricks workspace of the default profile
        return False
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)  # none, or a drive letter: a path
    return scheme is None or len(scheme.group(1)) == 1 or scheme.group(1).lower() in ("sqlite", "file")


def relays_through_rank0(dims: ParallelDims, uri: str | None) -> bool:
    """Whether this host's samples go through rank 0 (a file store, and a host other than rank 0's:
    under torchrun ranks are numbered node by node, so local rank 0 with rank > 0 is another node)."""
    return uri is not None and is_file_store(uri) and dims.local_rank == 0 and dims.rank != 0


def _job_store(timeout_s: float):
    """A client of the job's TCP store (torchrun's MASTER_ADDR:MASTER_PORT), or None without one."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    import torch.distributed as dist

    return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def _relay_prefix(run_id: str) -> str:
    """The relay's keys for this run and this attempt (a restarted world may reuse the store)."""
    return f"distalex/system/{run_id}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _monitors() -> list:
    """MLflow's samplers of this host: CPU and memory, disk, network, and the GPUs where it can."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:  # noqa: BLE001 - no nvidia-ml-py, or no GPU: MLflow's own sampler skips them too
        pass
    return monitors


class HostMetrics:
    """MLflow's ``SystemMetricsMonitor`` for this host, bound to the job's run."""

    def __init__(self, monitor):
        self._monitor = monitor

    @classmethod
    def start(cls, cfg: Config, dims: ParallelDims, run_id: str | None, uri: str | None):
        """Start sampling on the host's local rank 0 when the run is tracked; None elsewhere or when
        off. Another host than rank 0's with a file store gets a ``RelayedHostMetrics``."""
        if dims.local_rank != 0 or run_id is None or uri is None or not cfg.tracking.system_metrics:
            return None
        if relays_through_rank0(dims, uri):
            return RelayedHostMetrics.start(cfg, dims, run_id)
        # Its "started monitoring" and "skip logging GPU metrics" notes are INFO lines on stderr, per host.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                                           resume_logging=True, node_id=node_id(), tracking_uri=uri)
            monitor.start()
        except Exception as e:  # noqa: BLE001 - psutil missing, a store that refuses: training goes on
            warnings.warn(f"MLflow system metrics of {node_id()} not logged: {type(e).__name__}: {e}",
                          TrackingWarning, stacklevel=2)
            return None
        return cls(monitor)

    def stop(self) -> None:
        """Stop sampling and send the last samples, waiting at most ``_STOP_TIMEOUT_S``."""
        done = threading.Thread(target=self._monitor.finish, name="distalex-system-metrics-stop", daemon=True)
        done.start()
        done.join(_STOP_TIMEOUT_S)


class RelayedHostMetrics:
    """This host's samples, aggregated every interval, put into the job's store for rank 0 to log:
    key ``<prefix>rank/<rank>`` holds ``{"node": ..., "seq": n, "metrics": {...}}``."""

    def __init__(self, store, prefix: str, rank: int, interval_s: float):
        self._store, self._prefix, self._rank, self._interval_s = store, prefix, rank, interval_s
        self._node = node_id()
        self._monitors = _monitors()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="distalex-system-metrics-relay", daemon=True)

    @classmethod
    def start(cls, cfg: Config, dims: ParallelDims, run_id: str) -> RelayedHostMetrics | None:
        interval = _sampling_interval(cfg)
        try:
            store = _job_store(timeout_s=max(30.0, 3 * interval))
            if store is None:
                raise RuntimeError("no job store to relay through (MASTER_ADDR/MASTER_PORT unset)")
            self = cls(store, _relay_prefix(run_id), dims.rank, interval)
            store.append(self._prefix + SAMPLER_RANKS_KEY, f"{dims.rank},")
        except Exception as e:  # noqa: BLE001 - psutil missing, no store: training goes on
            warnings.warn(f"MLflow system metrics of {node_id()} not logged: {type(e).__name__}: {e}",
                          TrackingWarning, stacklevel=2)
            return None
        self._thread.start()
        return self

    def _loop(self) -> None:
        seq, node, stopping = 0, self._node, False
        while not stopping:  # one sample per interval, and a last one when stopped
            for monitor in self._monitors:
                monitor.collect_metrics()
            stopping = self._stop.wait(self._interval_s)
            metrics = {}
            for monitor in self._monitors:
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            try:
                self._store.set(f"{self._prefix}rank/{self._rank}", json.dumps({"node": node, "seq": seq, "metrics": metrics}))
            except Exception:  # noqa: BLE001 - the store's host is gone; liveness ends this rank
                return
            seq += 1

    def stop(self) -> None:
        """Stop sampling after one last sample (at most ``_STOP_TIMEOUT_S``)."""
        self._stop.set()
        self._thread.join(_STOP_TIMEOUT_S)


class HostMetricsRelay:
    """On rank 0: the samples other hosts put into the job's store, logged into the run through
    ``log(metrics, step)`` (the tracker's queue) as ``system/<node>/<metric>``. A node's steps
    continue from what the run holds of it (``next_step``), so a resumed run's curves go on."""

    def __init__(self, store, prefix: str, interval_s: float, log: Callable[[dict, int], None],
                 next_step: Callable[[str], int]):
        self._store, self._prefix, self._interval_s = store, prefix, interval_s
        self._log, self._next_step = log, next_step
        self._seen: dict[int, int] = {}  # rank -> last seq logged
        self._base: dict[str, int] = {}  # node -> step of its seq 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="distalex-system-metrics-relay-in", daemon=True)

    @classmethod
    def start(cls, cfg: Config, dims: ParallelDims, run_id: str | None, uri: str | None,
              log: Callable[[dict, int], None], next_step: Callable[[str], int]) -> HostMetricsRelay | None:
        """On rank 0 of a job over several hosts with a file store; None elsewhere."""
        if not (dims.is_main and dims.distributed and run_id and uri and is_file_store(uri) and cfg.tracking.system_metrics):
            return None
        interval = _sampling_interval(cfg)
        try:
            store = _job_store(timeout_s=max(30.0, 3 * interval))
        except Exception as e:  # noqa: BLE001 - the other hosts' metrics are lost, training goes on
            warnings.warn(f"MLflow system metrics of other hosts not logged: {type(e).__name__}: {e}",
                          TrackingWarning, stacklevel=2)
            return None
        if store is None:
            return None
        self = cls(store, _relay_prefix(run_id), interval, log, next_step)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s / 2):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending (liveness says why)
                return

    def poll(self) -> None:
        """Log every sample that arrived since the last poll."""
        key = self._prefix + SAMPLER_RANKS_KEY
        if not self._store.check([key]):
            return
        ranks = sorted({int(r) for r in self._store.get(key).decode().split(",") if r})
        for rank in ranks:
            sample_key = f"{self._prefix}rank/{rank}"
            if not self._store.check([sample_key]):
                continue
            sample = json.loads(self._store.get(sample_key))
            if self._seen.get(rank) == sample["seq"]:
                continue
            self._seen[rank] = sample["seq"]
            node = sample["node"]
            if node not in self._base:
                self._base[node] = self._next_step(node) - sample["seq"]
            self._log({f"system/{node}/{k}": v for k, v in sample["metrics"].items()}, self._base[node] + sample["seq"])

    def stop(self) -> None:
        """Log what has arrived and stop."""
        self._stop.set()
        self._thread.join(_STOP_TIMEOUT_S)
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - the store is gone
            pass


def _sampling_interval(cfg: Config) -> float:
    """``tracking.system_metrics_interval_s``, unless $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise
    (as MLflow's own sampler reads it)."""
    env = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    try:
        return float(env) if env else cfg.tracking.system_metrics_interval_s
    except ValueError:
        return cfg.tracking.system_metrics_interval_s
