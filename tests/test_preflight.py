"""distalex.preflight: what launch/slurm/train.sbatch checks before srun, and the loader workers it
derives from the cores a node's allocation gives."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distalex.preflight import loader_workers, loading_ranks_per_node, starves
from tests.runs import DEMO_CONFIG, tiny_shards  # noqa: F401 - fixture


@pytest.mark.parametrize("cores, procs, tp, expected", [
    (96, 8, 2, (24, 22)),   # a GPU node: 4 tp pairs, each loading rank shares 24 cores with its pair
    (96, 8, 1, (12, 11)),   # every process loads for itself
    (96, 8, 8, (96, 88)),   # one tp group per node: one loading rank
    (96, 4, 8, (96, 92)),   # a group wider than the node: its first node holds the one loading rank
    (2, 2, 2, (2, 1)),      # this machine's test cluster: still one worker
    (1, 2, 1, (0, 1)),      # fewer cores than processes: one worker, and the log says 0 cores each
])
def test_loader_workers_fill_the_cores_of_each_loading_rank(cores, procs, tp, expected):
    assert loader_workers(cores, procs, tp) == expected
    assert loading_ranks_per_node(procs, tp) == max(1, procs // tp)


def test_a_gpu_node_with_a_few_cores_is_warned_and_a_full_one_is_not(tiny_shards):
    def preflight(cores: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "distalex.preflight", "--world", "8", "--cores", str(cores), "--procs", "8", "--gpus", "8",
             "--config", str(DEMO_CONFIG), "--set", f"data.train_shards={tiny_shards}", "--set", f"data.val_shards={tiny_shards}"],
            capture_output=True, text=True, timeout=120)

    starved = preflight(2)  # the script's --cpus-per-task default, on a GPU node
    assert starved.returncode == 0 and starved.stdout.strip() == "1", starved.stderr
    assert "0 core(s) per loading rank -> data.workers=1" in starved.stderr
    assert "will starve the GPUs; submit with --exclusive" in starved.stderr
    full = preflight(96)
    assert full.returncode == 0 and full.stdout.strip() == "22", full.stderr
    assert "96 on each node for 8 process(es), 4 loading rank(s) per node (tp=2): 24 core(s) per loading rank" in full.stderr
    assert "starve" not in full.stderr
    assert starves(5, 2) and not starves(6, 2)


def test_a_world_that_tp_does_not_divide_fails_with_status_2(tiny_shards):
    done = subprocess.run(
        [sys.executable, "-m", "distalex.preflight", "--world", "3", "--config", str(DEMO_CONFIG),
         "--set", f"data.train_shards={tiny_shards}", "--set", f"data.val_shards={tiny_shards}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "world size 3 (nodes x processes per node) is not divisible by parallel.tp=2" in done.stderr
