"""System metrics per host: MLflow's own sampler (CPU, memory, disk, network; GPU where nvidia-ml-py
is installed), started by one process per host into the job's run, as ``system/<host>/<metric>``.

The process with local rank 0 on each host samples (torchrun's LOCAL_RANK: one per node), so every
host's load, memory and GPU use shows up once in the run, under its own node id: the Slurm node
name, else the host name. A host other than rank 0's needs a store it can reach (an MLflow server;
a sqlite file on a local disk is only seen from its own host). ``tracking.system_metrics: false``
turns it off; ``tracking.system_metrics_interval_s`` is the sampling interval.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from typing import TYPE_CHECKING

from distalex.tracking.store import TrackingWarning

if TYPE_CHECKING:
    from distalex.config import Config
    from distalex.parallel.dims import ParallelDims

_STOP_TIMEOUT_S = 5.0
"""Longest wait for the sampler's last send: a dead server must not hold the end of a job."""


def node_id() -> str:
    """This host's name in the run's system metrics."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class HostMetrics:
    """MLflow's ``SystemMetricsMonitor`` for this host, bound to the job's run."""

    def __init__(self, monitor):
        self._monitor = monitor

    @classmethod
    def start(cls, cfg: Config, dims: ParallelDims, run_id: str | None, uri: str | None) -> HostMetrics | None:
        """Start sampling on the host's local rank 0 when the run is tracked; None elsewhere or when off."""
        if dims.local_rank != 0 or run_id is None or uri is None or not cfg.tracking.system_metrics:
            return None
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
