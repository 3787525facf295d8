"""train.max_steps inside an epoch: the run validates and saves there, but the partial epoch neither
ends the epoch nor counts for the LR plateau rule; a longer run resumed from it finishes the epoch.

One process runs ``distalex.train.train`` twice in-process on the tiny shards (7 steps an epoch):
max_steps=3, then the same run without max_steps. lr_patience=0 makes any validation that is not a
new best drop the LR, so a partial epoch counted by the rule would show in the LR and the counters.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from distalex.checkpoint import complete_checkpoints
from tests.distributed import run_workers
from tests.runs import DEMO_CONFIG, tiny_overrides, tiny_shards  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e  # real training runs (distalex.train.train, in-process)


def two_runs(workdir: str, values: list[str]) -> list[str]:
    from distalex.config import load_config
    from distalex.parallel.dims import init_parallel
    from distalex.stopping import StopRequested
    import distalex.train as train

    os.chdir(workdir)
    outputs = []
    for extra in (["train.max_steps=3"], []):
        cfg = load_config(DEMO_CONFIG, values + extra)
        dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu", layout=cfg.parallel.layout)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert train.train(cfg, dims, StopRequested()) == 0
        outputs.append(out.getvalue())
    return outputs


def test_max_steps_inside_an_epoch_validates_without_ending_it(tiny_shards, tmp_path):
    pairs = tiny_overrides(tiny_shards, run_name="tiny", **{"parallel.tp": 1, "tracking.enabled": False, "train.epochs": 1,
                                           "optim.lr_patience": 0, "checkpoint.every_steps": 0})
    first, second = run_workers(two_runs, 1, str(tmp_path), pairs[1::2], timeout=300)[0]
    assert "step 3 (train.max_steps, in epoch 1): val top-1 error" in first and "epoch 1/1" not in first
    ckpts = complete_checkpoints(tmp_path / "runs" / "tiny" / "checkpoints")
    metas = {int(c.name.split("-")[1]): json.loads((c / "meta.json").read_text())["train_state"] for c in ckpts}
    at3 = metas[3]
    assert (at3["epoch"], at3["step_in_epoch"], at3["validated_step"]) == (0, 3, 3)
    assert (at3["best_top1_error"], at3["epochs_since_best"], at3["lr"]) == (None, 0, 0.01)  # the rule untouched
    assert "resumed from" in second and "epoch 1/1" in second  # the longer run finished the epoch
    assert (metas[7]["epoch"], metas[7]["step"], metas[7]["validated_step"]) == (1, 7, 7)
    assert metas[7]["best_top1_error"] is not None
