"""The plateau warning (``distalex.plateau``): a training loss that stays at ln(num_classes).

Fast: the rule on loss curves of the shapes runs produce (the first steps' overshoot, the plateau,
the descent). e2e: a run that cannot learn (a learning rate of 1e-6, from Caffe's init, whose
narrow net starts with nearly the same, nearly uniform prediction for every image) prints the
warning once and tags its MLflow run; the demo config's own run (launch/demo.sh, in
tests/test_demo.py) does not.
"""

from __future__ import annotations

import math
import re

import mlflow
import pytest

from distalex.plateau import PLATEAU_TAG, PlateauWatch, left_plateau_at, on_plateau
from tests.runs import launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture

LN10 = math.log(10)


def feed(watch: PlateauWatch, losses: list[float], every: int = 2) -> list[tuple[int, str]]:
    """The windows' mean losses at log points every ``every`` steps; the warnings, with their steps."""
    out = []
    for i in range(0, len(losses), every):
        window = losses[i : i + every]
        message = watch.update(i + len(window), len(window), sum(window) / len(window))
        if message is not None:
            out.append((i + len(window), message))
    return out


def test_a_loss_that_stays_at_chance_warns_once_after_the_stated_steps():
    overshoot = [8.4, 6.0, 4.0, 3.0]  # the first updates kick the loss above chance
    curve = overshoot + [LN10 + 0.01 * (-1) ** i for i in range(40)]
    warnings = feed(PlateauWatch(10, steps=20, margin=0.02), curve)
    assert len(warnings) == 1, warnings
    step, message = warnings[0]
    # the plateau starts after the overshoot (step 5), and the warning comes when it has lasted 20 steps
    assert step == 24 and "for 20 steps (steps 5-24" in message
    for key in ("model.init", "data.input_scale", "optim.lr"):
        assert key in message
    assert "\n" not in message


def test_a_loss_that_leaves_the_plateau_in_time_does_not_warn():
    at_chance = [LN10] * 16
    learning = [LN10 * (1 - 0.01 * i) for i in range(1, 40)]
    assert feed(PlateauWatch(10, steps=20, margin=0.02), at_chance + learning) == []
    # the same watch with a shorter patience does warn on the same curve
    assert len(feed(PlateauWatch(10, steps=12, margin=0.02), at_chance + learning)) == 1
    # a loss far from chance (a net that starts confident and stays so) is not this plateau
    assert feed(PlateauWatch(10, steps=4, margin=0.02), [3.0] * 40) == []
    assert feed(PlateauWatch(10, steps=0, margin=0.02), [LN10] * 40) == []  # 0: off


def test_leaving_the_plateau_is_the_first_window_below_the_margin():
    curve = [8.0] * 5 + [LN10] * 30 + [LN10 * 0.85] * 30
    assert left_plateau_at(curve, 10, 0.02, window=10) == 35 + 2  # 2 of 10 at 0.85 ln 10: mean 0.97 ln 10
    assert left_plateau_at([LN10] * 100, 10, 0.02, window=10) is None
    assert on_plateau(LN10 * 1.019, 10, 0.02) and not on_plateau(LN10 * 0.979, 10, 0.02)


@pytest.mark.e2e
def test_a_run_that_cannot_learn_warns_and_tags_its_mlflow_run(tiny_shards, tmp_path):
    proc = launch(tmp_path, tiny_overrides(tiny_shards, run_name="stuck", **{
        "model.init": "caffe", "optim.lr": 1e-6, "train.plateau_steps": 8}))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if "warning: the training loss has stayed" in ln]
    assert len(lines) == 1, proc.stderr[-5000:]  # once, from rank 0
    assert re.search(r"within 2% of ln\(10\) = 2\.303 for (8|9|10) steps \(steps 1-", lines[0]), lines[0]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("distalex").experiment_id])[0]
    assert run.info.status == "FINISHED", "a warning, not an error"
    assert re.fullmatch(r"loss 2\.3\d+ within 2% of ln\(10\) from step 1 to (8|9|10)", run.data.tags[PLATEAU_TAG])
