"""Export a checkpoint as one serial (tp=1) model file, loadable with plain torch.

    python -m distalex.export runs/demo/checkpoints/step-00000120 model.pt

The file is a dict of plain types and tensors, so ``torch.load(path, weights_only=True)`` reads it:

    {"state_dict": {name: tensor}, "model_config": {...}, "classes": [wnid, ...],
     "class_names": [readable name, ...], "preprocessing": {resize, image_size, mean_rgb, std_rgb, mean_image}}

``preprocessing`` is what evaluation does to an image (``distalex.serving.Preprocessing``); it and
the class names come from the training shards' ``_info.json``, found from where this runs (the
directory training ran in, for relative shard paths); without that file they are left out (None
and the class ids) with a warning. With distalex:

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
from distalex.model import AlexNet, build_model

if TYPE_CHECKING:
    from distalex.serving import Preprocessing


class ExportError(ValueError):
    pass


def save_serial_model(
    path: str | Path, state_dict: dict, model_cfg: ModelConfig, classes: list[str] | None = None,
    class_names: list[str] | None = None, preprocessing: Preprocessing | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "model_config": model_cfg.model_dump(),
        "classes": list(classes or []),
        "class_names": list(class_names or classes or []),
        "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # never a half-written model file under the final name
    return path


def load_serial_model(path: str | Path) -> tuple[AlexNet, dict]:
    """The serial AlexNet of an exported file, and the file's dict (model_config, classes)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ExportError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "model_config" not in blob:
        raise ExportError(f"{path}: not a distalex model export (no state_dict/model_config)")
    model = build_model(ModelConfig(**blob["model_config"]))
    missing = set(model.state_dict()) - set(blob["state_dict"])
    if missing:
        raise ExportError(f"{path}: the state dict lacks {sorted(missing)}")
    model.load_state_dict(blob["state_dict"])
    return model, blob


def main(argv: list[str] | None = None) -> None:
    from distalex.checkpoint import CheckpointError, load_serial_state
    from distalex.data.info import DataError
    from distalex.serving import training_settings

    parser = argparse.ArgumentParser(prog="python -m distalex.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run's checkpoint directory (latest)")
    parser.add_argument("out", help="output .pt file")
    args = parser.parse_args(argv)
    try:
        state, cfg, classes = load_serial_state(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        prep, names = training_settings(cfg)
    except DataError as e:
        print(f"warning: {e}; the model file gets no preprocessing settings (distalex.predict needs "
              "them) and no class names: export from the directory training ran in", file=sys.stderr)
        prep, names = None, None
    out = save_serial_model(args.out, state, cfg.model, classes, names, prep)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} parameters, tp=1)")


if __name__ == "__main__":
    main()
