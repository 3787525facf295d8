"""The MLflow side of a training run: one run per job, continued across restarts, logged from rank 0.

``Tracker.start`` is called on every rank. Rank 0 gets a ``Tracker`` bound to an MLflow run; every
other rank (and rank 0 when tracking is off or cannot start) gets a ``NullTracker`` whose methods
do nothing, so the loop calls them unconditionally and the choice is made in one visible place.

    metrics.py   the metric names the loop logs and the report reads
    store.py     where the run goes: tracking URI, sqlite file, artifact location, server check
    params.py    what a run is started with: the resolved config, the layout, the git commit
    images.py    pictures as PNG bytes
    tracker.py   Tracker (the background sender) and NullTracker
"""

import os

# MLflow sends usage telemetry from a background thread unless told not to; the clusters this
# runs on are often offline. Set before mlflow is first imported (it decides at import).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# With a server URI, MlflowClient.set_terminated prints "View run ... at" links to stdout, here from
# the sender thread into the progress bar; print_location says the same once, when asked.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from distalex.tracking.metrics import (  # noqa: E402 - after the environment above
    EPOCH_METRICS, METRIC_COMPUTE_MS, METRIC_DATA_WAIT, METRIC_EPOCH, METRIC_EPOCH_LOSS, METRIC_IMAGES_PER_S,
    METRIC_LOSS, METRIC_LR, METRIC_SKIPPED, METRIC_STEPS_SKIPPED, METRIC_TOP1, METRIC_TOP5, METRIC_VAL_LOSS,
    STEP_METRICS, host_metric,
)
from distalex.tracking.store import TrackingError, resolve_tracking_uri, sqlite_path, view_command  # noqa: E402
from distalex.tracking.tracker import NullTracker, Tracker, TrackingWarning  # noqa: E402

__all__ = [
    "EPOCH_METRICS", "METRIC_COMPUTE_MS", "METRIC_DATA_WAIT", "METRIC_EPOCH", "host_metric", "METRIC_EPOCH_LOSS", "METRIC_IMAGES_PER_S", "METRIC_LOSS", "METRIC_LR",
    "METRIC_SKIPPED", "METRIC_STEPS_SKIPPED", "METRIC_TOP1", "METRIC_TOP5", "METRIC_VAL_LOSS", "STEP_METRICS",
    "NullTracker", "Tracker", "TrackingError", "TrackingWarning", "resolve_tracking_uri", "sqlite_path", "view_command",
]
