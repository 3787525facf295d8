"""What a run is started with, logged as its MLflow params: the resolved config, the layout, the code."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import distalex

if TYPE_CHECKING:
    from distalex.config import Config
    from distalex.parallel.dims import ParallelDims

_MAX_PARAM_LENGTH = 6000  # MLflow's limit per param value (mlflow.utils.validation)


def git_commit(repo_dir: Path | None = None) -> tuple[str, list[str] | None]:
    """(commit, tracked files with uncommitted changes) of the git working tree that holds the
    distalex package, or of ``repo_dir``; ("unknown", None) if there is none.

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
        changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return commit, changed
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def run_params(cfg: Config, dims: ParallelDims) -> dict[str, str]:
    """Everything a run is started with: the resolved config as dotted keys, the world layout, the code."""
    from distalex.config import flatten
    from distalex.parallel.dims import backend_for

    commit, changed = git_commit()
    params: dict[str, Any] = dict(flatten(cfg))
    params.update(
        world_size=dims.world_size, dp=dims.dp, tp=dims.tp,
        backend=backend_for(dims.device), device=dims.device.type,
        distalex_version=distalex.__version__,
        git_commit=commit, git_dirty="unknown" if changed is None else bool(changed),
    )
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > _MAX_PARAM_LENGTH:  # MLflow rejects the whole batch otherwise
        text = text[: _MAX_PARAM_LENGTH - 15] + "...(truncated)"
    return text
