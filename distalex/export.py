"""Export a model as one serial (tp=1) model file, loadable with plain torch.

    python -m distalex.export runs/demo/checkpoints/step-00000120 model.pt

The source is a checkpoint (or any model source with weights, ``distalex.model_source``). The file
is a dict of plain types and tensors, so ``torch.load(path, weights_only=True)`` reads it:

    {"state_dict": {name: tensor}, "model_config": {...}, "classes": [wnid, ...],
     "class_names": [readable name, ...], "preprocessing": {resize, image_size, mean_rgb, std_rgb, mean_image},
     "data": {the run's data section, absolute paths}, "mlflow_run": {run_id, tracking_uri}}

``preprocessing`` is what evaluation does to an image (``distalex.serving.Preprocessing``); with
the class names it comes from the checkpoint (older checkpoints: from the training shards'
``_info.json``; where that is not found they are left out, with a warning). ``data`` tells
``distalex.evaluate`` and the report where the run's validation shards are; ``mlflow_run`` where
its curves are. With distalex:

    from distalex.model import AlexNet
    blob = torch.load("model.pt", weights_only=True)
    model = AlexNet(**blob["model_config"]); model.load_state_dict(blob["state_dict"])

and without it, see docs/using-a-model.md ("Without distalex").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distalex.config import ModelConfig
from distalex.model_source import SourceError, load_source

if TYPE_CHECKING:
    from distalex.serving import Preprocessing


def save_serial_model(
    path: str | Path, state_dict: dict, model_cfg: ModelConfig, classes: list[str] | None = None,
    class_names: list[str] | None = None, preprocessing: Preprocessing | None = None,
    data: dict | None = None, mlflow_run: dict | None = None,
) -> Path:
    """``data``: the run's data section (``Config.data.model_dump()``, absolute paths); ``mlflow_run``:
    {"run_id", "tracking_uri"} of the run that trained it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "model_config": model_cfg.model_dump(),
        "classes": list(classes or []),
        "class_names": list(class_names or classes or []),
        "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
        "data": data,
        "mlflow_run": mlflow_run,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # never a half-written model file under the final name
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distalex.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run's checkpoint directory (latest), "
                                           "or any other model source with weights")
    parser.add_argument("out", help="output .pt file")
    args = parser.parse_args(argv)
    try:
        source = load_source(args.checkpoint)
        state = source.weights()
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if source.preprocessing is None:
        print(f"warning: {source.label}: {source.why.get('preprocessing')}; the model file gets no preprocessing "
              "settings (distalex.predict needs them)", file=sys.stderr)
    run = {"run_id": source.run_id, "tracking_uri": source.tracking_uri} if source.run_id else None
    out = save_serial_model(args.out, state, ModelConfig(**source.model_config), source.classes, source.class_names,
                            source.preprocessing, source.cfg.data.model_dump() if source.cfg is not None else None, run)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} parameters, tp=1)")


if __name__ == "__main__":
    main()
