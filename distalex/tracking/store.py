"""Where a run goes: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<run_dir>/../mlflow.db``, with a new experiment's artifacts in ``<run_dir>/../mlartifacts``
(MLflow's own default, ``./mlruns``, would depend on the working directory).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distalex.config import Config

_HEALTH_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """Tracking cannot start (the server does not answer, the store cannot be opened)."""


class TrackingWarning(RuntimeWarning):
    """MLflow could not be reached or refused something; training goes on without it."""


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


def check_server(uri: str) -> None:
    """Fail in seconds when an HTTP tracking server does not answer (MLflow's own retries take minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as r:
            r.read()
    except (OSError, urllib.error.URLError) as e:
        raise TrackingError(f"no MLflow server answers at {url} ({e})") from None
