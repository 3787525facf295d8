"""The paper's 10-crop test on a few validation images, drawn.

``ten_crop.png`` (1600 x (40 + 190 * images)): per validation image the ten image_size patches
the paper averages over (four corners and centre, then their mirrors: ``distalex.data.augment.ten_crop``
on the central ``data.resize`` square), each with its own top-1 class, and the top-5 classes of the
softmax averaged over the ten, the true class in green; classes by their names (``digit 3``), as
predict names them. Pixels are normalised as in evaluation, with the training statistics the model
source carries (``ModelSource.normalizer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from distalex.report import ReportError
from distalex.report.canvas import figure, save

# ten_crop.png geometry.
TEN_W, TEN_HEAD_H, TEN_ROW_H, THUMB, THUMB_GAP, THUMB_TOP = 1600, 40, 190, 112, 6, 36
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class Example:
    """One validation image: its bytes, its label (None when unknown), and where it came from."""

    data: bytes
    label: int | None
    name: str


@dataclass
class TenCropResult:
    crops: np.ndarray
    """uint8 (B, 10, S, S, 3): the patches as the model saw them, before normalisation."""
    probs: torch.Tensor
    """(B, classes): softmax averaged over the ten patches."""
    crop_probs: torch.Tensor
    """(B, 10, classes): each patch's own softmax."""


@torch.no_grad()
def ten_crop_predict(model: torch.nn.Module, examples: list[Example], resize: int,
                     prepare: Callable[[torch.Tensor], torch.Tensor]) -> TenCropResult:
    """The paper's test-time averaging: softmax over the ten patches of each image, then the mean.
    ``prepare``: uint8 (B, 10, 3, S, S) -> the net's input (``ModelSource.normalizer(data_cfg, ten=True)``)."""
    from distalex.data.augment import CorruptImage, centre_square, hwc_to_chw, ten_crop

    size = model.image_size
    if resize < size:
        raise ReportError(f"resize={resize} is smaller than the model's image_size={size}")
    crops = []
    for ex in examples:
        try:
            crops.append(ten_crop(centre_square(ex.data, resize), size))  # (10, S, S, 3)
        except CorruptImage as e:
            raise ReportError(f"{ex.name}: not a readable image ({e})") from None
    crops_np = np.stack(crops)  # (B, 10, S, S, 3)
    x = prepare(hwc_to_chw(crops_np))  # (B, 10, 3, S, S) float
    model.eval()
    b = x.shape[0]
    crop_probs = torch.softmax(model(x.flatten(0, 1)).float(), dim=-1).view(b, 10, -1)
    return TenCropResult(crops_np, crop_probs.mean(dim=1), crop_probs)


CROP_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


def plot_ten_crop(result: TenCropResult, examples: list[Example], class_names: list[str], png_path: str | Path,
                  top: int = 5) -> Path:
    """ten_crop.png; ``class_names[c]`` is how class c is named in it."""
    return save(ten_crop_figure(result, examples, class_names, top), png_path)


def ten_crop_figure(result: TenCropResult, examples: list[Example], class_names: list[str], top: int = 5) -> Figure:
    n = len(examples)
    W, H = TEN_W, TEN_HEAD_H + TEN_ROW_H * n
    fig = figure(W, H)
    fig.text(12 / W, 1 - 10 / H, "10-crop test (the paper, section 4.1): each patch's top-1 under it; bars: top-5 of the softmax "
             "averaged over the ten patches (green: the true class)",
             va="top", fontsize=12, weight="bold")

    def name(c: int) -> str:
        return class_names[c] if c < len(class_names) else f"class {c}"

    bars_left = 12 + 10 * (THUMB + THUMB_GAP) + 150
    for row, ex in enumerate(examples):
        top_px = TEN_HEAD_H + row * TEN_ROW_H
        truth = f"true: {name(ex.label)}" if ex.label is not None else "true: unknown"
        fig.text(12 / W, 1 - (top_px + 2) / H, f"{ex.name}    {truth}", va="top", fontsize=9)
        for i in range(10):
            left = 12 + i * (THUMB + THUMB_GAP)
            ax = fig.add_axes((left / W, 1 - (top_px + THUMB_TOP + THUMB) / H, THUMB / W, THUMB / H))
            ax.imshow(result.crops[row, i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            p, c = result.crop_probs[row, i].max(dim=0)
            ax.set_title(CROP_NAMES[i % 5] + (" m" if i >= 5 else ""), fontsize=7, pad=2)
            ax.set_xlabel(f"{name(int(c))[:14]} {float(p):.2f}", fontsize=7, labelpad=2)
        probs, idx = result.probs[row].topk(min(top, result.probs.shape[1]))
        ax = fig.add_axes((bars_left / W, 1 - (top_px + THUMB_TOP + THUMB) / H, (W - bars_left - 20) / W, THUMB / H))
        colours = ["#3a9a4a" if ex.label is not None and int(c) == ex.label else "#9ab7d3" for c in idx]
        ax.barh(np.arange(len(idx)), probs.numpy(), color=colours)
        ax.set_yticks(np.arange(len(idx)), [name(int(c))[:28] for c in idx], fontsize=8)
        ax.set_ylim(len(idx) - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        for j, p in enumerate(probs.tolist()):
            ax.text(min(p, 0.85) + 0.01, j, f"{p:.3f}", va="center", fontsize=7)
    return fig


def examples_from_files(paths: list[str], num: int, classes: list[str]) -> list[Example]:
    """Image files, or folders of them (sorted); the label is the parent folder's name if it is a class."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ReportError(f"--images {p}: no such file or folder")
    if not files:
        raise ReportError(f"--images {' '.join(paths)}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for f in files[:num]:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ReportError(f"{f}: unreadable ({e})") from None
        out.append(Example(data, index.get(f.parent.name), f.name))
    return out


def examples_from_shards(spec: str, num: int, info: str | None = None) -> list[Example]:
    """The first ``num`` readable samples of a validation shard list (shards are shuffled when written);
    ``info`` is the run's data.info (where the shards' _info.json is, if not beside them)."""
    from distalex.data.augment import CorruptImage
    from distalex.data.info import DataError, resolve_shards
    from distalex.data.loader import parse_sample, plan_segments, read_segment

    try:
        shards = resolve_shards(spec, "val", "data.val_shards", info)
    except DataError as e:
        raise ReportError(str(e)) from None
    out: list[Example] = []
    total = sum(s.count for s in shards)
    for seg in plan_segments(shards, 0, min(total, num * 2)):  # a few spare for corrupt samples
        for key, members in read_segment(seg, on_skip=lambda n, why: None):
            try:
                data, label = parse_sample(key, members)
            except CorruptImage:
                continue
            out.append(Example(data, label, f"{Path(seg.url).name}:{key}"))
            if len(out) == num:
                return out
    if not out:
        raise ReportError(f"data.val_shards={spec!r}: no readable samples")
    return out
