"""Progress output: a bar on a terminal, a few plain lines a minute in a file (distalex/progress.py),
and the per-rank step times behind the progress line's ``data N%`` (distalex/steptime.py)."""

from __future__ import annotations

import io
import os
import time

import pytest
import torch
from torch import nn

from distalex.progress import LineProgress, progress
from distalex.steptime import StepTimes, Times, stragglers


def test_a_file_gets_a_plain_line_per_interval_and_one_at_the_end():
    out = io.StringIO()
    bar = progress(total=10_000, desc="train", unit="step", interval_s=0.2, stream=out)
    assert isinstance(bar, LineProgress)
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        bar.update(1)
        bar.set_postfix(loss="2.3026", data="3%")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 3 <= len(lines) <= 7, lines  # 1 s at one line per 0.2 s, plus the last
    assert all(line.startswith("train: ") and "steps (" in line and "loss 2.3026, data 3%" in line for line in lines)
    assert lines[-1].startswith(f"train: {bar.n}/10000 steps")


def test_a_terminal_gets_tqdm():
    leader, follower = os.openpty()
    with open(follower, "w") as tty:
        bar = progress(total=3, desc="train", unit="step", stream=tty)
        assert type(bar).__name__ == "tqdm"
        bar.close()
    os.close(leader)


def test_a_closed_or_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = progress(total=5, desc="index", unit="shard", stream=out, disable=True)
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""
    untouched = LineProgress(5, "index", "shard", stream=out)
    untouched.close()  # nothing done: no line
    assert out.getvalue() == ""


def test_step_times_split_data_wait_from_compute():
    """A loader that sleeps 50 ms and a step of known work: data and compute are told apart, and the
    compute ends at the last gradient of the backward (the first layer's)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    times = StepTimes(net, torch.device("cpu"))

    def slow_batches():
        for _ in range(3):
            time.sleep(0.05)
            yield torch.randn(32, 64)

    batches = slow_batches()
    for _ in range(3):
        x = times.fetch(batches)
        net(x).square().mean().backward()
        time.sleep(0.03)  # after the backward: counted in the wall time, not in the compute
    window = times.window()
    assert window.steps == 3
    assert 0.14 <= window.data <= 0.5, window
    # the clock stops at the end of each backward: the 30 ms after it are wall time only
    assert 0 < window.compute <= window.wall - window.data - 3 * 0.03, window
    with pytest.raises(StopIteration):
        times.fetch(batches)
    assert times.window().steps == 0 and times.end_epoch().steps == 3
    times.close()


def test_a_rank_clearly_slower_than_the_median_is_named():
    even = Times(data=1.0, compute=10.0, wall=20.0, steps=100)
    slow_compute = Times(data=1.0, compute=14.0, wall=20.0, steps=100)
    starved = Times(data=5.0, compute=10.0, wall=20.0, steps=100)
    assert stragglers([even, even, even, even]) == []
    assert stragglers([even, slow_compute, even, even]) == [(1, "compute", 0.14, 0.10)]
    assert stragglers([even, even, starved]) == [(2, "data wait", 0.05, 0.01)]
    # a few percent above the median is noise, not a straggler
    assert stragglers([even, Times(1.0, 10.5, 20.0, 100), even]) == []
    assert stragglers([even]) == []
