"""The trained net as an image classifier: evaluation's preprocessing, the net and the softmax in one module.

An image file reaches the net exactly as in ``distalex.evaluate``. On the CPU (``Preprocessing``):
decode, shorter side to ``data.resize``, the central square, then its central ``image_size`` crop
or the paper's ten crops, as uint8. Inside ``Classifier``: the pixels in the units the run trained
with (``data.input_scale``: 0-255 for raw, [0, 1] for standardized), minus the training mean,
divided by the training std for standardized (the statistics make_shards measured for the training
shards, as ``augment.normalize`` uses them), the net, the softmax (averaged over the ten crops).

The settings travel with the model: an exported model file holds ``Preprocessing.to_dict()``, and
the MLflow model a training run logs (``log_mlflow_model``) holds the normalisation inside its graph
and the crop sizes and class names in its metadata. That MLflow model is the ``Classifier`` exported
with ``torch.export`` (MLflow's ``pt2`` format): loading it needs torch and MLflow, not distalex,
and it takes uint8 RGB crops (batch, 3, S, S) and returns class probabilities (batch, classes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distalex.data.augment import (
    PIXEL_MAX, centre_crop, centre_square, hwc_to_chw, mean_and_std, ten_crop, to_input_units, training_stats,
)
from distalex.data.info import read_info
from distalex.tracking import TrackingWarning

if TYPE_CHECKING:
    from distalex.config import Config
    from distalex.tracking import NullTracker, Tracker

UNRECORDED_INPUT_SCALE = "standardized"
"""The scale of a model or checkpoint that does not say: the only one distalex had before
``data.input_scale`` (whatever the default is now)."""
MLFLOW_MODEL_NAME = "model"
"""A run's MLflow model: ``runs:/<run_id>/model``."""


def class_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalised crops (B, 3, S, S), or the ten crops of each image (B, 10, 3, S, S) -> (B, classes) softmax.

    Ten crops: the softmax of each, averaged (the paper's test, section 4.1).
    """
    if x.dim() == 5:
        b = x.shape[0]
        logits = model(x.flatten(0, 1)).float()  # (B*10, classes)
        return F.softmax(logits, dim=1).view(b, 10, -1).mean(1)
    return F.softmax(model(x).float(), dim=1)


class Classifier(nn.Module):
    """Image crops in, class probabilities out.

    Input: uint8 RGB (B, 3, S, S), or float in [0, 1] (uint8 / 255); or (B, 10, 3, S, S), the ten
    crops of each image, whose softmax is averaged. Output: (B, classes) float32 probabilities.
    ``mean`` and ``std`` are in the units of ``input_scale`` (``augment.mean_and_std``): (3, 1, 1)
    per channel, or per pixel (3, S, S) for centre crops, (10, 3, S, S) for ten.
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, input_scale: str = "standardized"):
        super().__init__()
        self.model = model.eval()
        self.input_scale = input_scale
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            x = to_input_units(images, self.input_scale)
        else:  # [0, 1]; x 255 gives back every uint8 value exactly
            x = images.float().mul(PIXEL_MAX) if self.input_scale == "raw" else images.float()
        return class_probabilities(self.model, (x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale}, mean={tuple(self.mean.shape)}, std={tuple(self.std.shape)}"


def eval_crops(data: bytes, resize: int, size: int, ten: bool) -> torch.Tensor:
    """Image file bytes -> uint8 (3, S, S) centre crop, or (10, 3, S, S) ten crops, as the validation loader cuts them.

    Raises ``augment.CorruptImage`` for bytes that are not a readable image.
    """
    square = centre_square(data, resize)
    return hwc_to_chw(ten_crop(square, size) if ten else centre_crop(square, size))


@dataclass
class Preprocessing:
    """What evaluation does to an image before the net: crop sizes, the training statistics and the
    units the net saw them in."""

    resize: int
    """Shorter side scaled to this, then the central square is kept (``data.resize``)."""
    image_size: int
    """Side of the crops the net takes (``model.image_size``)."""
    mean_rgb: list[float]
    std_rgb: list[float]
    """Training mean and std per channel, pixels in [0, 1]."""
    mean_image: np.ndarray | None = None
    """(H, W, 3) training mean image for ``data.mean: pixel``; None: the per-channel mean."""
    input_scale: str = UNRECORDED_INPUT_SCALE
    """``data.input_scale`` of the run. Models and checkpoints saved before it was recorded trained
    with the only scale there was then, standardized: that is what ``from_dict`` assumes without it."""

    def to_dict(self) -> dict:
        """Plain types and at most one tensor: ``torch.load(weights_only=True)`` reads it."""
        return {
            "resize": self.resize, "image_size": self.image_size, "mean_rgb": list(self.mean_rgb),
            "std_rgb": list(self.std_rgb),
            "mean_image": None if self.mean_image is None else torch.from_numpy(self.mean_image),
            "input_scale": self.input_scale,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        img = d.get("mean_image")
        return cls(int(d["resize"]), int(d["image_size"]), [float(v) for v in d["mean_rgb"]],
                   [float(v) for v in d["std_rgb"]], None if img is None else np.asarray(img, dtype=np.float32),
                   d.get("input_scale", UNRECORDED_INPUT_SCALE))

    def describe(self) -> dict:
        """The settings without the mean image, for metadata."""
        return {"resize": self.resize, "image_size": self.image_size, "mean_rgb": list(self.mean_rgb),
                "std_rgb": list(self.std_rgb), "mean": "channel" if self.mean_image is None else "pixel",
                "input_scale": self.input_scale}

    def crops(self, data: bytes, ten: bool) -> torch.Tensor:
        return eval_crops(data, self.resize, self.image_size, ten)

    def classifier(self, model: nn.Module, ten: bool = False) -> Classifier:
        """``model`` with this normalisation and the softmax, for centre crops or (``ten``) ten crops."""
        mean, std = self.mean_and_std(self.resize, ten)
        return Classifier(model, mean, std, self.input_scale)

    def mean_and_std(self, resize: int, ten: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """What to subtract and divide by (``augment.mean_and_std``), for images squared at ``resize``."""
        return mean_and_std(self.mean_rgb, self.std_rgb, self.mean_image, resize, self.image_size, ten, self.input_scale)


def training_settings(cfg: Config) -> tuple[Preprocessing, list[str]]:
    """A run's preprocessing and class names, from its training shards' ``_info.json``.

    Raises ``DataError`` when that file is not found from here (relative shard paths are taken from
    the working directory): without it, ``augment.normalize`` would fall back to ImageNet's statistics.
    """
    info = read_info(cfg.data.train_shards, cfg.data.info)
    mean_rgb, std_rgb, mean_image = training_stats(cfg.data.train_shards, cfg.data.mean == "pixel", cfg.data.info)
    prep = Preprocessing(cfg.data.resize, cfg.model.image_size, mean_rgb, std_rgb, mean_image, cfg.data.input_scale)
    return prep, info.class_names


# ------------------------------------------------------------------ the MLflow model


def model_metadata(prep: Preprocessing, classes: list[str], class_names: list[str],
                   model_config: dict | None = None) -> dict:
    """What a user of the MLflow model needs besides the graph: how to cut the input, what the outputs
    are; and the net's config, with which distalex rebuilds it from the graph's weights."""
    s = prep.image_size
    return {
        "input": f"uint8 RGB (batch, 3, {s}, {s}): the image's shorter side scaled to {prep.resize}, "
                 f"the central square, its central {s} x {s} crop",
        "output": f"float32 (batch, {len(classes)}): class probabilities, in the order of 'classes'",
        "preprocessing": prep.describe(),
        "classes": list(classes),
        "class_names": list(class_names),
        "model_config": model_config,
    }


def log_mlflow_model(
    tracker: Tracker | NullTracker, model: nn.Module, prep: Preprocessing, classes: list[str],
    class_names: list[str], *, step: int, register_as: str | None = None, model_config: dict | None = None,
) -> str | None:
    """Log ``model`` with ``prep`` as the run's MLflow model (PyTorch flavour, ``pt2``); its URI, or None.

    Registered as ``register_as`` when given. Nothing happens when ``tracker`` has no run (tracking
    off, or not rank 0). A failure is a ``TrackingWarning``, never an error: the run has finished.
    """
    if tracker.tracking_uri is None:
        return None
    # The run's last metrics are linked to the model at ``step``. A store that is failing would
    # hold the end of the job for the minutes of MLflow's HTTP retries: skip the model then.
    if not tracker.flush():
        warnings.warn(f"MLflow at {tracker.tracking_uri} is not taking the run's data; the MLflow model of "
                      f"run {tracker.run_id} is not logged (the model file is)", TrackingWarning, stacklevel=2)
        return None
    try:
        return _log_pt2(tracker.tracking_uri, tracker.run_id, prep.classifier(model).cpu(),
                        model_metadata(prep, classes, class_names, model_config), step, register_as)
    except Exception as e:  # noqa: BLE001 - the weights are already saved; report and go on
        warnings.warn(f"MLflow at {tracker.tracking_uri}: could not log the MLflow model of run "
                      f"{tracker.run_id}: {type(e).__name__}: {e}", TrackingWarning, stacklevel=2)
        return None


def _log_pt2(uri: str, run_id: str, classifier: Classifier, metadata: dict, step: int, register_as: str | None) -> str:
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # log_model takes the store and the experiment of the model from MLflow's process-wide settings.
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
    s, classes = metadata["preprocessing"]["image_size"], len(metadata["classes"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, s, s))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    example = np.full((2, 3, s, s), 128, dtype=np.uint8)  # a batch of 2: export keeps the batch size free
    mlflow.pytorch.log_model(
        classifier.eval(), name=MLFLOW_MODEL_NAME, run_id=run_id, step=step, signature=signature,
        input_example=example, serialization_format="pt2", metadata=metadata,
        registered_model_name=register_as,
        # The defaults spend seconds finding packages (a subprocess) and re-running the example;
        # the model needs torch and mlflow only, and the tests run it.
        pip_requirements=mlflow.pytorch.get_default_pip_requirements(), validate_serving_input=False,
    )
    return f"runs:/{run_id}/{MLFLOW_MODEL_NAME}"
