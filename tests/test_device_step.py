"""The training step as a GPU would run it, checked on CPU ranks: nothing in a step hands Python
data to a tensor or reads one back on the host (each would make the host wait for the device), and
the prefetching device feed serves the plain iteration's batches, in its order, bit for bit.
"""

from __future__ import annotations

import os

import pytest

from tests.distributed import run_workers
from tests.runs import DEMO_CONFIG, tiny_overrides, tiny_shards  # noqa: F401 - fixture


def overrides(shards, **extra) -> list[str]:
    pairs = tiny_overrides(shards, **{"tracking.enabled": False, "train.log_every": 4, "checkpoint.every_steps": 0,
                                      "train.epochs": 1, **extra})
    return pairs[1::2]  # the values of ["--set", "k=v", ...]


# ----------------------------------------------------------------------------- tensors from Python data


def made_worker(workdir: str, values: list[str]) -> dict:
    """One epoch of train_epoch under PythonDataSpy, what it records split by step: a step runs from
    asking for its batch (the feed, the loader and the tp exchange of the batch included) to asking
    for the next one (normalisation with the lighting, forward, backward, SGD, the log point)."""
    from distalex.config import load_config
    from distalex.parallel.dims import init_parallel
    from distalex.parallel.trace import PythonDataSpy
    from distalex.stopping import StopRequested
    import distalex
    import distalex.train as train

    os.chdir(workdir)
    cfg = load_config(DEMO_CONFIG, values)
    dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu", layout=cfg.parallel.layout)
    run = train.setup(cfg, dims, StopRequested())
    made, marks = PythonDataSpy(), []
    real_fetch = run.times.fetch

    def fetch(batches):
        marks.append((f"step {run.state.step + 1}", len(made.calls)))
        return real_fetch(batches)

    run.times.fetch = fetch
    with made:
        train.train_epoch(run, None)
    mine = made.calls_from(distalex.__path__[0])
    ends = [n for _, n in marks[1:]] + [len(made.calls)]
    return {
        "rank": dims.rank,
        "made": {step: [f"{c.kind}: {c.op} {c.shape} at {c.where}" for c in made.calls[begin:end] if c in mine]
                 for (step, begin), end in zip(marks, ends)},
    }


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["towers", "hybrid"])
def test_no_tensor_from_python_data_and_no_host_read_in_a_step(tiny_shards, tmp_path, layout):
    """log_every=4: of the epoch's 7 steps, 4 and 7 log (the loss and the step times are read there)
    and 2, 3, 5 and 6 are plain steps (step 1 may make the per-device constants once), and asking for an eighth batch ends the epoch. In the plain
    steps no distalex code makes a tensor from Python data, reads one on the host, or copies from
    pageable memory to a device (trace.PythonDataSpy), on either tp rank: the batch from the
    loader and its tp exchange, normalisation and lighting, forward, backward and SGD included."""
    values = overrides(tiny_shards, **{"parallel.layout": layout})
    for result in run_workers(made_worker, 2, str(tmp_path), values, timeout=240):
        # "step 8": asking for a batch after the epoch's last one
        assert sorted(result["made"]) == [f"step {k}" for k in range(1, 9)], result["made"]
        for step in ("step 2", "step 3", "step 5", "step 6", "step 8"):
            assert result["made"][step] == [], (result["rank"], step, result["made"][step])
        # the spy does see the log points' reads
        for step in ("step 4", "step 7"):
            assert any(m.startswith("host read") for m in result["made"][step]), result["made"]
