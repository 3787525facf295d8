"""A training loss stuck at chance: within a small margin of ln(num_classes), the loss of a net that
gives every image the same prediction.

The paper's net can sit there for thousands of steps, or for good (Caffe's maintainers replaced its
bias 1 for that reason; bench/learnability.py measures the inits and input scales, docs/paper.md). A run that stays there for ``train.plateau_steps`` steps gets one warning line that
names the likely causes and the keys to change, and its MLflow run the tag ``distalex.plateau``.
A warning, not an error: the paper's own runs sat there for a while before they learned.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distalex.tracking import NullTracker, Tracker

PLATEAU_TAG = "distalex.plateau"
"""MLflow tag of a run whose loss stayed at chance: the steps and the loss, in words."""


def chance_loss(num_classes: int) -> float:
    """ln(num_classes): the cross-entropy of a uniform (or any image-independent, balanced) prediction."""
    return math.log(num_classes)


def on_plateau(loss: float, num_classes: int, margin: float) -> bool:
    """Whether ``loss`` is within ``margin`` x ln(num_classes) of ln(num_classes)."""
    chance = chance_loss(num_classes)
    return abs(loss - chance) <= margin * chance


def left_plateau_at(losses: list[float], num_classes: int, margin: float, window: int) -> int | None:
    """The first step (1-based) at which the mean loss of the last ``window`` steps is below
    ln(num_classes) by more than the margin: where a run starts to learn. None if it never does."""
    below = chance_loss(num_classes) * (1 - margin)
    total = 0.0
    for i, loss in enumerate(losses):
        total += loss - (losses[i - window] if i >= window else 0.0)
        if i + 1 >= window and total / window < below:
            return i + 1
    return None


@dataclass
class PlateauWatch:
    """Counts the consecutive steps whose logged loss was on the plateau; warns once.

    Fed the mean loss of each logging window (``update``); a window above the margin (the first
    steps' overshoot) or below it (learning) ends the count.
    """

    num_classes: int
    steps: int
    """``train.plateau_steps``: 0 turns the watch off."""
    margin: float
    """``train.plateau_margin``: a fraction of ln(num_classes)."""
    since: int | None = None
    """The first step of the current run of steps on the plateau."""
    warned: bool = False

    def update(self, step: int, window_steps: int, mean_loss: float) -> str | None:
        """The mean loss of steps ``step - window_steps + 1`` .. ``step``; the warning line the
        first time the plateau has lasted ``steps`` steps, else None."""
        if self.steps == 0 or self.warned:
            return None
        if not on_plateau(mean_loss, self.num_classes, self.margin):
            self.since = None
            return None
        if self.since is None:
            self.since = step - window_steps + 1
        if step - self.since + 1 < self.steps:
            return None
        self.warned = True
        return self.describe(step, mean_loss)

    def describe(self, step: int, mean_loss: float) -> str:
        chance = chance_loss(self.num_classes)
        return (
            f"warning: the training loss has stayed within {100 * self.margin:g}% of ln({self.num_classes}) = "
            f"{chance:.3f} for {step - self.since + 1} steps (steps {self.since}-{step}, now {mean_loss:.4f}): the net "
            "gives every image the same prediction. Likely causes: the init (model.init: paper, caffe or kaiming; the "
            "paper's biases of 1 can hold a net here), the input scale (data.input_scale: raw is the paper's, "
            "standardized inputs are about 60 times smaller), the learning rate (optim.lr). A warning only: training "
            "goes on (docs/training.md, \"A loss stuck at chance\")"
        )

    def tag(self, step: int, mean_loss: float) -> str:
        """The MLflow tag's value."""
        return f"loss {mean_loss:.4f} within {100 * self.margin:g}% of ln({self.num_classes}) from step {self.since} to {step}"


def check_plateau(watch: PlateauWatch, step: int, window_steps: int, mean_loss: float,
                  tracker: Tracker | NullTracker, is_main: bool) -> None:
    """At a log point (every rank: the loss is the same mean over dp): the warning on stderr from
    rank 0, and the MLflow tag, the first time the plateau has lasted ``train.plateau_steps``."""
    message = watch.update(step, window_steps, mean_loss)
    if message is None:
        return
    tracker.set_tag(PLATEAU_TAG, watch.tag(step, mean_loss))
    if is_main:
        print(message, file=sys.stderr, flush=True)
