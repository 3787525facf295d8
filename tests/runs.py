"""Short real training runs for end-to-end tests: the bundled dataset, shortened configs, torchrun.

``tiny_shards`` builds a small copy of the demo dataset once per session (real JPEGs in real tar
shards, deliberately uneven); ``launch`` starts ``torchrun ... -m distalex.train`` in a run folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-data")
    subprocess.run(
        [sys.executable, "-m", "distalex.data.demo", str(root / "src"), "--train-per-class", "24", "--val-per-class", "8"],
        check=True, capture_output=True,
    )
    subprocess.run(
        [sys.executable, "-m", "distalex.data.make_shards", str(root / "src"), str(root / "shards"),
         "--max-count", "70", "--no-progress"],
        check=True, capture_output=True,
    )
    return root / "shards"


def tiny_overrides(shards: Path, **extra) -> list[str]:
    """The demo config, shortened: a narrower net, 2 epochs of 7 steps."""
    values = {
        "model.width": 0.125, "train.batch_size": 32, "train.epochs": 2, "train.log_every": 2,
        "data.train_shards": str(shards), "data.val_shards": str(shards), "data.workers": 1,
        "checkpoint.every_steps": 3, "checkpoint.keep": 10, "train.deterministic": True,
    }
    values.update(extra)
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def torchrun_cmd(nproc: int, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "distalex.train", "--config", str(DEMO_CONFIG)]


def run_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def launch(workdir: Path, overrides: list[str], nproc: int = 2, max_restarts: int = 0, timeout: float = 300,
           **env) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        torchrun_cmd(nproc, max_restarts) + overrides, cwd=workdir, env=run_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )
