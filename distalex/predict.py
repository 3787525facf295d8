"""Classify image files with a trained model: each image's top classes, with names and probabilities.

    python -m distalex.predict MODEL IMAGE... [--ten-crop] [--top 5]

MODEL is one of

    runs/<name>/model.pt     an exported model file (written at the end of training, or by distalex.export)
    a checkpoint folder      step-N, or a run's checkpoint directory (its latest complete one); the
                             statistics and class names come from the training shards' _info.json,
                             so run from the directory training ran in
    runs:/<run_id>/model     the MLflow model a training run logs (also models:/<name>/<version>, or a
                             downloaded MLflow model folder); the store is --tracking-uri, else
                             $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db

Each image is prepared as ``distalex.evaluate`` prepares the validation images (``distalex.serving``):
shorter side to ``data.resize``, the central square, its centre crop (``--ten-crop``: the paper's
ten crops, their softmax averaged), normalised with the training statistics. On the validation
images predict and evaluate give the same probabilities.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from distalex.checkpoint import CheckpointError, load_serial_state
from distalex.data.augment import CorruptImage
from distalex.data.info import DataError
from distalex.export import ExportError, load_serial_model
from distalex.model import build_model
from distalex.serving import Preprocessing, eval_crops, training_settings
from distalex.tracking import sqlite_path  # importing distalex.tracking also sets MLflow's environment

EXIT_BAD_INPUT = 2
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
"""runs:/..., models:/..., s3://...: an MLflow model URI rather than a local path."""
DEFAULT_STORE = Path("runs") / "mlflow.db"
"""Where training keeps its runs unless told otherwise (``distalex.tracking``), from the training directory."""


class PredictError(ValueError):
    """The model cannot be used: one line on stderr, exit status 2."""


@dataclass
class Predictor:
    """A loaded model, ready for images: ``probabilities`` takes uint8 crops from ``crops``."""

    classify: Callable[[torch.Tensor], torch.Tensor]
    """uint8 (B, 3, S, S) or, for --ten-crop, (B, 10, 3, S, S) -> (B, classes) probabilities."""
    resize: int
    image_size: int
    classes: list[str]
    class_names: list[str]

    def crops(self, data: bytes, ten: bool) -> torch.Tensor:
        return eval_crops(data, self.resize, self.image_size, ten)

    @torch.no_grad()
    def probabilities(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classify(crops)

    def label(self, c: int) -> str:
        """'name (id)', or the id alone when the class has no other name."""
        wnid = self.classes[c] if c < len(self.classes) else f"class {c}"
        name = self.class_names[c] if c < len(self.class_names) else wnid
        return wnid if name == wnid else f"{name} ({wnid})"


# ------------------------------------------------------------------ loading MODEL


def load_predictor(model: str, ten_crop: bool = False, tracking_uri: str | None = None) -> Predictor:
    """MODEL (see the module docstring) as a Predictor. Raises PredictError naming what is wrong."""
    if URI.match(model):
        return _from_mlflow(model, ten_crop, _store(tracking_uri))
    path = Path(model)
    if path.is_file():
        return _from_export(path, ten_crop)
    if (path / "MLmodel").is_file():
        return _from_mlflow(str(path.resolve()), ten_crop, None)
    if path.is_dir():
        return _from_checkpoint(path, ten_crop)
    raise PredictError(f"{model}: no such file or folder, and not an MLflow model URI (runs:/<run_id>/model)")


def _predictor(model: torch.nn.Module, prep: Preprocessing, ten: bool, classes: list[str], names: list[str]) -> Predictor:
    return Predictor(prep.classifier(model, ten), prep.resize, prep.image_size, list(classes), list(names or classes))


def _from_export(path: Path, ten: bool) -> Predictor:
    try:
        model, blob = load_serial_model(path)
    except ExportError as e:
        raise PredictError(str(e)) from None
    if not blob.get("preprocessing"):
        raise PredictError(f"{path}: carries no preprocessing settings (it was exported where the training shards' "
                           "_info.json was not found); export it again from the directory training ran in")
    prep = Preprocessing.from_dict(blob["preprocessing"])
    return _predictor(model, prep, ten, blob.get("classes", []), blob.get("class_names", []))


def _from_checkpoint(path: Path, ten: bool) -> Predictor:
    try:
        state, cfg, classes = load_serial_state(path)
        prep, names = training_settings(cfg)
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    except DataError as e:
        raise PredictError(f"{path}: the statistics of its training shards are needed: {e}. Run from the directory "
                           "training ran in, or give the exported model.pt") from None
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return _predictor(model, prep, ten, classes, names)


def _store(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(DEFAULT_STORE.resolve())
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would quietly create an empty store there
        raise PredictError(f"{uri}: no MLflow database there; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return uri


def _from_mlflow(uri: str, ten: bool, store: str | None) -> Predictor:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for the per-image lines
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    if store is not None:
        mlflow.set_tracking_uri(store)
    with tempfile.TemporaryDirectory(prefix="distalex-predict-") as tmp:
        try:
            local = uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            meta = Model.load(local).metadata or {}
            graph = mlflow.pytorch.load_model(local)
        except Exception as e:  # noqa: BLE001 - a missing run, a dead server, a foreign model: one line
            where = f" in {store}" if store else ""
            raise PredictError(f"{uri}: cannot load the MLflow model{where} ({type(e).__name__}: {e})") from None
    prep = meta.get("preprocessing")
    if not prep or "classes" not in meta:
        raise PredictError(f"{uri}: not a distalex MLflow model (its metadata has no preprocessing and classes)")
    classify = graph
    if ten:
        if prep.get("mean") == "pixel":
            raise PredictError(f"{uri}: --ten-crop with a per-pixel mean (data.mean=pixel) needs the exported "
                               "model.pt: the MLflow model subtracts the centre crop's mean")

        def classify(crops: torch.Tensor) -> torch.Tensor:  # the graph takes (B, 3, S, S): average over the ten here
            return graph(crops.flatten(0, 1)).view(crops.shape[0], 10, -1).mean(1)

    return Predictor(classify, int(prep["resize"]), int(prep["image_size"]), list(meta["classes"]),
                     list(meta.get("class_names") or meta["classes"]))


# ------------------------------------------------------------------ classifying files


def classify_files(
    predictor: Predictor, paths: Iterable[str], ten: bool, batch_size: int,
    on_error: Callable[[str, str], None],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, probabilities (classes,)) per readable image, in order; ``on_error(path, reason)`` for the rest."""
    batch: list[tuple[str, torch.Tensor]] = []

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        probs = predictor.probabilities(torch.stack([c for _, c in batch]))
        yield from zip([p for p, _ in batch], probs)
        batch.clear()

    for path in paths:
        try:
            crops = predictor.crops(Path(path).read_bytes(), ten)
        except FileNotFoundError:
            on_error(path, "no such file")
        except IsADirectoryError:
            on_error(path, "is a folder, not an image file")
        except OSError as e:
            on_error(path, f"cannot be read ({e.strerror or e})")
        except CorruptImage as e:  # PIL names the in-memory file: "... <_io.BytesIO object at 0x...>"
            on_error(path, f"not a readable image ({re.sub(r' <_io.BytesIO object at 0x[0-9a-f]+>', '', str(e))})")
        else:
            batch.append((path, crops))
            if len(batch) == batch_size:
                yield from run()
    if batch:
        yield from run()


def format_top(path: str, probs: torch.Tensor, predictor: Predictor, top: int) -> str:
    p, idx = probs.topk(min(top, probs.numel()))
    return "\n".join([path] + [f"  {float(v):.4f}  {predictor.label(int(c))}" for v, c in zip(p, idx)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distalex.predict", description=__doc__.split("\n\n")[0],
        epilog="Output: per image its path, then one line per class: probability, name (class id).\n"
               "Exit status: 0 when every image was classified; 2 when MODEL cannot be loaded, or when an\n"
               "image cannot be read (one line each on stderr; the other images are still classified).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model.pt, a checkpoint folder, or runs:/<run_id>/model")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--top", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--ten-crop", action="store_true", help="average the softmax over the paper's 10 crops")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store for runs:/ and models:/ (default $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    args = parser.parse_args(argv)
    if args.top < 1 or args.batch_size < 1:
        parser.error("--top and --batch-size must be at least 1")
    try:
        predictor = load_predictor(args.model, args.ten_crop, args.tracking_uri)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    failed = []

    def report(path: str, reason: str) -> None:
        failed.append(path)
        print(f"error: {path}: {reason}", file=sys.stderr, flush=True)

    for path, probs in classify_files(predictor, args.images, args.ten_crop, args.batch_size, report):
        print(format_top(path, probs, predictor, args.top), flush=True)
    if failed:
        print(f"{len(failed)} of {len(args.images)} images could not be classified", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
