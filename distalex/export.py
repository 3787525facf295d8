"""Export a checkpoint as one serial (tp=1) model file, loadable with plain torch.

    python -m distalex.export runs/demo/checkpoints/step-00000120 model.pt

The file is a dict of plain types, so ``torch.load(path, weights_only=True)`` reads it:
``{"state_dict": {name: tensor}, "model_config": {...}, "classes": [wnid, ...]}`` and

    from distalex.model import AlexNet
    blob = torch.load("model.pt", weights_only=True)
    model = AlexNet(**blob["model_config"]); model.load_state_dict(blob["state_dict"])
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from distalex.config import ModelConfig
from distalex.model import AlexNet, build_model


class ExportError(ValueError):
    pass


def save_serial_model(path: str | Path, state_dict: dict, model_cfg: ModelConfig, classes: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "model_config": model_cfg.model_dump(),
        "classes": list(classes or []),
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

    parser = argparse.ArgumentParser(prog="python -m distalex.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run's checkpoint directory (latest)")
    parser.add_argument("out", help="output .pt file")
    args = parser.parse_args(argv)
    try:
        state, cfg, classes = load_serial_state(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = save_serial_model(args.out, state, cfg.model, classes)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} parameters, tp=1)")


if __name__ == "__main__":
    main()
