"""Classify image files with a trained model: each image's top classes, with names and probabilities.

    python -m distalex.predict MODEL IMAGE... [--ten-crop] [--top 5]

MODEL is any model source (``distalex.model_source``): an exported model file (runs/<name>/model.pt),
a checkpoint folder or a run's checkpoint directory, an MLflow model (runs:/<run_id>/model,
models:/<name>/<version>) or an MLflow run id. It carries its class names and the training
statistics, so predict runs from any directory. The store of runs:/ and models:/ is --tracking-uri,
else $MLFLOW_TRACKING_URI, else runs/mlflow.db in the working directory.

Each image is prepared as ``distalex.evaluate`` prepares the validation images (``distalex.serving``):
shorter side to ``data.resize``, the central square, its centre crop (``--ten-crop``: the paper's
ten crops, their softmax averaged), normalised with the training statistics. On the validation
images predict and evaluate give the same probabilities.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from distalex.data.augment import CorruptImage
from distalex.model_source import ModelSource, SourceError, load_source
from distalex.serving import eval_crops

EXIT_BAD_INPUT = 2


@dataclass
class Predictor:
    """A loaded model, ready for images: ``probabilities`` takes uint8 crops from ``crops``."""

    classify: Callable[[torch.Tensor], torch.Tensor]
    """uint8 (B, 3, S, S) or, for --ten-crop, (B, 10, 3, S, S) -> (B, classes) probabilities."""
    resize: int
    image_size: int
    source: ModelSource

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names or self.source.classes

    def crops(self, data: bytes, ten: bool) -> torch.Tensor:
        return eval_crops(data, self.resize, self.image_size, ten)

    @torch.no_grad()
    def probabilities(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classify(crops)

    def label(self, c: int) -> str:
        """'name (id)', or the id alone when the class has no other name."""
        wnid = self.classes[c] if c < len(self.classes) else f"class {c}"
        name = self.source.class_name(c)
        return wnid if name == wnid else f"{name} ({wnid})"


def load_predictor(model: str, ten_crop: bool = False, tracking_uri: str | None = None) -> Predictor:
    """MODEL (see the module docstring) as a Predictor. Raises SourceError naming what is wrong."""
    return predictor_of(load_source(model, tracking_uri), ten_crop)


def predictor_of(source: ModelSource, ten: bool) -> Predictor:
    """An MLflow model classifies with its own graph; any other source with its weights and preprocessing."""
    if source.graph is None:
        prep = source.require_preprocessing()
        return Predictor(prep.classifier(source.model(), ten), prep.resize, prep.image_size, source)
    graph, (resize, size) = source.graph, source.sizes()
    classify = graph
    if ten:
        if source.preprocessing is None:
            raise SourceError(f"{source.label}: --ten-crop: {source.why['preprocessing']}")

        def classify(crops: torch.Tensor) -> torch.Tensor:  # the graph takes (B, 3, S, S): average over the ten here
            return graph(crops.flatten(0, 1)).view(crops.shape[0], 10, -1).mean(1)

    return Predictor(classify, resize, size, source)


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
    parser.add_argument("model", help="model.pt, a checkpoint folder, runs:/<run_id>/model, or an MLflow run id")
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
    except SourceError as e:
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
