"""Every step's time accounted for, per rank, in real torchrun runs (distalex/steptime.py): the data
wait and compute metrics read back from the MLflow run, plain progress lines when stderr is a file,
and a rank made slow from outside named at the epoch's end."""

from __future__ import annotations

import re
import sys

import mlflow
import pytest

from tests.runs import launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

# Loaded into every process of the run from PYTHONPATH (sitecustomize): rank 0 keeps CPU 1, rank 1
# shares CPU 0 with two busy loops of its own, as a rank on a host that something else keeps busy.
SLOW_RANK_1 = '''
import os, subprocess, sys
rank = os.environ.get("RANK")
if rank is not None and not os.environ.get("SLOW_RANK_HOOKED"):
    os.environ["SLOW_RANK_HOOKED"] = "1"  # the loader's workers inherit the CPU, not another loop
    if rank == "0":
        os.sched_setaffinity(0, {1})
    elif rank == "1":
        os.sched_setaffinity(0, {0})
        for _ in range(2):
            subprocess.Popen([sys.executable, "-c", "import os, time\\nparent = os.getppid()\\n"
                              "while os.getppid() == parent:\\n    t = time.monotonic()\\n"
                              "    while time.monotonic() - t < 0.2: pass\\n"], env={"SLOW_RANK_HOOKED": "1"})
'''


def mlflow_run(workdir):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("distalex").experiment_id])
    return client, run


def test_a_run_logs_its_data_wait_and_writes_plain_progress_lines_to_a_file(tiny_shards, tmp_path):
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="t", **{"train.progress_interval_s": 2}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "\r" not in proc.stderr  # no bar frames in a file
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: ")]
    assert lines and re.search(r"train: \d+/14 steps \(\d+\.\d%\), .* elapsed.*, loss \d\.\d{4}, .*data \d+%", lines[-1]), lines
    assert lines[-1].startswith("train: 14/14 steps (100.0%)")
    client, run = mlflow_run(tmp_path)
    wait = client.get_metric_history(run.info.run_id, "perf/data_wait_percent")
    compute = client.get_metric_history(run.info.run_id, "perf/compute_ms")
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(m.step for m in wait) == sorted(m.step for m in compute) == sorted(loss_steps)
    assert all(0 <= m.value <= 100 for m in wait) and all(m.value > 0 for m in compute)
    per_host = [k for k in run.data.metrics if re.fullmatch(r"perf/.+/(data_wait_percent|compute_ms)", k)]
    assert len(per_host) == 2, run.data.metrics.keys()  # one host, logged at each of the 2 epoch ends
    assert len(client.get_metric_history(run.info.run_id, per_host[0])) == 2


def test_the_log_has_a_few_progress_lines_a_minute(tiny_shards, tmp_path):
    """The default interval: a run of about a minute or less writes one or two lines, not frames."""
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="t"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: ")]
    assert 1 <= len(lines) <= 4, lines
    assert len(proc.stderr) < 20_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity (sched_setaffinity) is Linux's")
def test_a_rank_slowed_from_outside_is_named_at_the_epoch_end(tiny_shards, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RANK_1)
    # checkpoints only at the epochs' ends, outside the timed steps: the steps' own time is what differs
    overrides = {"parallel.tp": 1, "train.epochs": 3, "checkpoint.every_steps": 0, "train.log_every": 7}
    proc = launch(tmp_path / "job", tiny_overrides(tiny_shards, run_name="t", **overrides), PYTHONPATH=f"{hook}:{tests_root()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    named = re.findall(r"warning: epoch \d: rank (\d) \([^)]+\) is slower than the median rank: (compute|data wait)",
                       proc.stderr)
    assert named and {rank for rank, _ in named} == {"1"}, proc.stderr[-4000:]


def tests_root() -> str:
    from tests.runs import REPO

    return str(REPO)
