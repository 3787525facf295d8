"""Pictures of a run: the towers' conv1 kernels (the paper's Figure 3), learning curves, 10-crop examples.

    python -m distalex.report RUN_OR_CHECKPOINT [--out DIR] [--tracking-uri URI]
                              [--images FILE_OR_DIR ...] [--val-shards SPEC] [--num-images N]

RUN_OR_CHECKPOINT is one of

    a checkpoint folder (step-N), a checkpoint   kernels and 10-crop examples from its weights (images
    directory (its latest complete checkpoint)   from the config's data.val_shards); curves from the
    or a run folder holding checkpoints/         MLflow run its meta.json names, in the store training
                                                 used (--tracking-uri, else the config's tracking.uri,
                                                 else $MLFLOW_TRACKING_URI, else runs/mlflow.db beside
                                                 the run folder)
    an exported model file (distalex.export)     kernels; 10-crop with --images or --val-shards; no curves
    an MLflow run id (32 hex digits; with        curves; kernels and 10-crop as well if the run logged a
    --tracking-uri or $MLFLOW_TRACKING_URI)      model file (*.pt) as an artifact

and DIR (default ``report``) gets those of ``kernels.png``, ``curves.png`` and ``ten_crop.png``
that the source allows; each one left out is printed with the reason. Relative paths in a run's
config (shards, a sqlite store) are looked up from where training ran, so the report works from
any directory. A missing run, an unreadable file, a checkpoint without conv1 and the like are one
line on stderr and exit status 2.

The kernel picture (``kernels.png``, also ``kernel_summary`` for the training loop)
-----------------------------------------------------------------------------------
One block per tower: tower t's kernels are conv1's output channels [t*n, (t+1)*n), n = kernels
per tower (model.py), shown left to right, top to bottom, 16 per row, each magnified 4x with
nearest-neighbour pixels (an 11x11 kernel is 44x44 px) and 2 px of white between kernels.

Display normalisation: each kernel on its own, min-max over all of its 3 x k x k values together,
v = (w - min w) / (max w - min w) (a constant kernel is mid-grey). One scale for the three channels
keeps the kernel's colour: a kernel with R = G = B stays grey. Per kernel rather than per layer,
so a weak kernel is as visible as a strong one (as in the paper's Figure 3).

Colour statistic, per kernel, on the raw weights (not the display values):

    colour energy = ||w - g||^2 / ||w||^2,   g[:, y, x] = mean over R, G, B of w[:, y, x]

the fraction of the kernel's energy off the grey axis R = G = B. 0 for a grey kernel, growing with
colour, at most 1; it does not depend on the kernel's scale. A random kernel (the N(0, 0.01) init)
has about 2/3 (two of the three colour directions are off the grey axis), so both towers start
near 2/3; in the paper's result one tower's kernels fall well below (colour-agnostic) and the other
tower's stay colour-specific. Per tower the mean over its kernels is logged as
``kernels/tower{t}_colour_energy``, and ``kernels/colour_energy_gap`` = largest minus smallest tower
mean (which tower becomes the colour-agnostic one is chance, so the gap is the number to watch).
Below the blocks a strip chart draws every kernel's value per tower with the tower mean as a bar.

Sizes in pixels (width x height), dpi 100: with c = min(n, 16) columns and r = ceil(n / c) rows of
cells of side 4k, a block is (c * 4k + 2(c - 1)) x (r * 4k + 2(r - 1)); the picture is
max(24 + block width, 480) wide and 34 + towers * (28 + block height + 12) + 60 + 24 * towers
high. The paper's net (2 towers of 48 kernels of 11x11): 758 x 494. ``kernel_layout`` gives the
exact box of every kernel.

The other pictures
------------------
``curves.png`` (1500 x 800): from the MLflow run's metric histories, against the step they were
logged at: loss (train, per-epoch train, val), val top-1 and top-5 error, learning rate (log
scale), the towers' colour energy (when the loop logged it) and training images/s.

``ten_crop.png`` (1600 x (40 + 190 * images)): per validation image the ten image_size patches
the paper averages over (four corners and centre, then their mirrors: ``distalex.data.augment.ten_crop``
on the central ``data.resize`` square), each with its own top-1 class, and the top-5 classes of the
softmax averaged over the ten, the true class in green. Pixels are normalised as in evaluation
(``augment.normalize``, statistics from the ``_info.json`` beside ``data.train_shards``; ImageNet's
with a warning when that file is not found from where the report runs).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# A Figure on the Agg canvas directly, never pyplot: no screen needed, no global backend or figure
# state changed in the process that imports this (the training loop).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distalex.tracking import (
    METRIC_EPOCH_LOSS, METRIC_IMAGES_PER_S, METRIC_LOSS, METRIC_LR, METRIC_TOP1, METRIC_TOP5, METRIC_VAL_LOSS,
)

DPI = 100

# Kernel picture geometry, in pixels (see the module docstring).
ZOOM, GAP, MAX_COLS = 4, 2, 16
MARGIN, TITLE_H, HEADER_H, BLOCK_PAD, MIN_W = 12, 34, 28, 12, 480
CHART_BASE_H, CHART_ROW_H, CHART_LEFT = 60, 24, 96
RANDOM_COLOUR_ENERGY = 2 / 3  # expected colour energy of an isotropic random kernel

# ten_crop.png geometry.
TEN_W, TEN_HEAD_H, TEN_ROW_H, THUMB, THUMB_GAP, THUMB_TOP = 1600, 40, 190, 112, 6, 36
# curves.png size in inches at DPI.
CURVES_SIZE = (15, 8)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# The colour metrics this module defines (the loop logs them; the curves read them back).
KERNEL_METRIC = "kernels/tower{t}_colour_energy"
KERNEL_GAP_METRIC = "kernels/colour_energy_gap"


class ReportError(ValueError):
    """A source the report cannot use; the message names it and what is wrong."""


# ================================================================== conv1 kernels


def colour_energy(kernels: torch.Tensor) -> torch.Tensor:
    """(N, 3, k, k) -> (N,) float64: ||w - grey(w)||^2 / ||w||^2 per kernel (0 for an all-zero kernel).

    grey(w) repeats the mean over the colour channels at every pixel, so the ratio is the share of
    the kernel's energy off the grey axis R = G = B: 0 for grey, up to 1.
    """
    w = kernels.detach().to(device="cpu", dtype=torch.float64)
    off_grey = (w - w.mean(dim=1, keepdim=True)).square().sum(dim=(1, 2, 3))
    total = w.square().sum(dim=(1, 2, 3))
    return torch.where(total > 0, off_grey / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def display_kernels(kernels: torch.Tensor) -> np.ndarray:
    """(N, 3, k, k) -> (N, k, k, 3) uint8: each kernel min-max normalised over all its values."""
    w = kernels.detach().to(device="cpu", dtype=torch.float64)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    span = w.amax(dim=(1, 2, 3), keepdim=True) - lo
    v = torch.where(span > 0, (w - lo) / span.clamp_min(torch.finfo(torch.float64).tiny), 0.5)
    return (v * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class KernelLayout:
    """Where everything sits in the kernel picture, in pixels from the top-left corner."""

    width: int
    height: int
    towers: int
    per_tower: int
    kernel_size: int
    cols: int
    rows: int
    block_tops: tuple[int, ...]
    """Top edge of each tower's block of kernels."""
    chart_top: int

    @property
    def cell(self) -> int:
        return self.kernel_size * ZOOM

    def box(self, kernel: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of conv1 output channel ``kernel`` (right/bottom exclusive)."""
        t, i = divmod(kernel, self.per_tower)
        r, c = divmod(i, self.cols)
        left = MARGIN + c * (self.cell + GAP)
        top = self.block_tops[t] + r * (self.cell + GAP)
        return left, top, left + self.cell, top + self.cell


def kernel_layout(conv1_shape: tuple[int, ...] | torch.Size, towers: int) -> KernelLayout:
    out, cin, kh, kw = _check_conv1_shape(tuple(conv1_shape), towers)
    n = out // towers
    cols = min(n, MAX_COLS)
    rows = math.ceil(n / cols)
    cell = kh * ZOOM
    block_w = cols * cell + GAP * (cols - 1)
    block_h = rows * cell + GAP * (rows - 1)
    width = max(2 * MARGIN + block_w, MIN_W)
    tops, y = [], TITLE_H
    for _ in range(towers):
        tops.append(y + HEADER_H)
        y += HEADER_H + block_h + BLOCK_PAD
    height = y + CHART_BASE_H + CHART_ROW_H * towers
    return KernelLayout(width, height, towers, n, kh, cols, rows, tuple(tops), y)


def _check_conv1_shape(shape: tuple[int, ...], towers: int) -> tuple[int, int, int, int]:
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise ReportError(f"conv1 weight must be (kernels, 3, k, k), got {shape}")
    if towers < 1 or shape[0] % towers:
        raise ReportError(f"conv1 has {shape[0]} kernels, not divisible into towers={towers}")
    return shape  # type: ignore[return-value]


def tower_colour_energy(conv1_weight: torch.Tensor, towers: int) -> torch.Tensor:
    """(towers, n): every kernel's colour energy, row t = tower t's kernels in order."""
    _check_conv1_shape(tuple(conv1_weight.shape), towers)
    return colour_energy(conv1_weight).view(towers, -1)


def kernel_metrics(per_kernel: torch.Tensor) -> dict[str, float]:
    """(towers, n) colour energies -> the metrics logged to MLflow (names in the module docstring)."""
    means = per_kernel.mean(dim=1)
    out = {KERNEL_METRIC.format(t=t): float(m) for t, m in enumerate(means)}
    if len(means) > 1:
        out[KERNEL_GAP_METRIC] = float(means.max() - means.min())
    return out


def kernel_summary(conv1_weight: torch.Tensor, towers: int, png_path: str | Path, title: str | None = None) -> dict[str, float]:
    """Write the kernel picture of a full (serial-layout) conv1 weight; return the colour metrics.

    ``conv1_weight`` is (towers * n, 3, k, k), on any device and dtype; tower t's kernels are the
    t-th block of n output channels. About 0.2 s for the paper's 96 kernels (Agg, no pyplot state,
    so it is safe to call from the training loop on rank 0).
    """
    w = conv1_weight.detach().to(device="cpu", dtype=torch.float32)
    layout = kernel_layout(w.shape, towers)
    per_kernel = tower_colour_energy(w, towers)
    metrics = kernel_metrics(per_kernel)
    pixels = display_kernels(w)

    fig = _figure(layout.width, layout.height)
    H = layout.height
    fig.text(MARGIN / layout.width, 1 - 8 / H, title or "conv1 kernels", va="top", fontsize=12, weight="bold")
    for t in range(towers):
        block = np.full(
            (layout.rows * (layout.cell + GAP) - GAP, layout.cols * (layout.cell + GAP) - GAP, 3), 255, np.uint8
        )
        for i in range(layout.per_tower):
            k = t * layout.per_tower + i
            left, top, right, bottom = layout.box(k)
            zoomed = pixels[k].repeat(ZOOM, axis=0).repeat(ZOOM, axis=1)
            block[top - layout.block_tops[t] : bottom - layout.block_tops[t], left - MARGIN : right - MARGIN] = zoomed
        # figimage puts the array's pixels into the PNG unresampled; yo is the bottom edge, from below.
        fig.figimage(block, xo=MARGIN, yo=H - layout.block_tops[t] - block.shape[0], origin="upper")
        fig.text(
            MARGIN / layout.width, 1 - (layout.block_tops[t] - HEADER_H + 6) / H,
            f"tower {t}: kernels {t * layout.per_tower}-{(t + 1) * layout.per_tower - 1}    "
            f"colour energy {metrics[KERNEL_METRIC.format(t=t)]:.3f}",
            va="top", fontsize=10,
        )
    _colour_chart(fig, layout, per_kernel)
    _save(fig, png_path)
    return metrics


def _colour_chart(fig: Figure, layout: KernelLayout, per_kernel: torch.Tensor) -> None:
    """Per tower: each kernel's colour energy as a dot, the tower's mean as a bar."""
    W, H = layout.width, layout.height
    rows_h = CHART_ROW_H * layout.towers
    bottom = 40  # room for the x label
    ax = fig.add_axes((CHART_LEFT / W, bottom / H, (W - CHART_LEFT - 2 * MARGIN) / W, rows_h / H))
    means = per_kernel.mean(dim=1).numpy()
    ys = np.arange(layout.towers)
    ax.barh(ys, means, height=0.6, color="#9ab7d3", zorder=1)
    n = per_kernel.shape[1]
    jitter = ((np.arange(n) % 5) / 4 - 0.5) * 0.4  # fixed offsets, so the picture is reproducible
    for t in range(layout.towers):
        ax.scatter(per_kernel[t].numpy(), t + jitter, s=6, color="#1f3b5a", zorder=2)
    ax.axvline(RANDOM_COLOUR_ENERGY, color="0.35", linestyle="--", linewidth=1, zorder=1.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(layout.towers - 0.5, -0.5)
    ax.set_yticks(ys, [f"tower {t}" for t in range(layout.towers)], fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("colour energy ||w - grey(w)||² / ||w||²  (dashed: random kernel, 2/3)", fontsize=8)


def _figure(width: int, height: int) -> Figure:
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=DPI, format="png")  # no bbox_inches: the size stays the documented one
    tmp.replace(path)
    return path


# ================================================================== learning curves


CURVE_PANELS = (
    ("loss", (METRIC_LOSS, METRIC_EPOCH_LOSS, METRIC_VAL_LOSS), False),
    ("top-1 error", (METRIC_TOP1,), False),
    ("top-5 error", (METRIC_TOP5,), False),
    ("learning rate", (METRIC_LR,), True),
    ("conv1 colour energy", ("kernels/",), False),
    ("images/s", (METRIC_IMAGES_PER_S,), False),
)


def _panel_metrics(patterns: tuple[str, ...], available) -> list[str]:
    """The metrics of one panel that a run has; a pattern ending in / stands for every metric under it."""
    out = []
    for pattern in patterns:
        if pattern.endswith("/"):
            out += sorted(m for m in available if m.startswith(pattern))
        elif pattern in available:
            out.append(pattern)
    return out


def curve_metric_names(available) -> list[str]:
    """Every metric curves.png draws, of those a run has."""
    return [m for _, patterns, _ in CURVE_PANELS for m in _panel_metrics(patterns, available)]


def plot_curves(histories: dict[str, list[tuple[int, float]]], png_path: str | Path, title: str = "") -> Path:
    """curves.png from {metric name: [(step, value), ...]}; a panel whose metrics are absent says so."""
    w, h = CURVES_SIZE
    fig = _figure(w * DPI, h * DPI)
    axes = fig.subplots(2, 3).ravel()
    fig.subplots_adjust(left=0.05, right=0.98, top=0.92, bottom=0.07, wspace=0.22, hspace=0.3)
    if title:
        fig.suptitle(title, fontsize=12)
    for ax, (label, names, log) in zip(axes, CURVE_PANELS):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        drawn = 0
        for name in _panel_metrics(names, histories):
            points = sorted(histories[name])
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.2, label=name,
                    drawstyle="steps-post" if log else "default")  # the LR is a step function
            drawn += 1
        if drawn:
            ax.legend(fontsize=7)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"not logged ({', '.join(names)})", ha="center", va="center", fontsize=8,
                    color="0.4", transform=ax.transAxes)
    return _save(fig, png_path)


def _open_tracking(tracking_uri: str | None):
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ReportError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():  # MLflow would silently create an empty store there
            raise ReportError(f"{uri}: no MLflow database at {db}")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri), uri


def _get_run(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"MLflow run {run_id} not found at {uri} ({e.message})") from None
    except Exception as e:  # noqa: BLE001 - a dead server, a refused connection: one clear line
        raise ReportError(f"cannot reach MLflow at {uri} ({type(e).__name__}: {e})") from None


def read_histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...] by step} for the metrics curves.png draws.

    A resumed job logs the steps after its checkpoint again; per step the value logged last wins,
    so the curve is the one the finished run followed.
    """
    run = client.get_run(run_id)
    out = {}
    for name in curve_metric_names(list(run.data.metrics)):
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, name):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        out[name] = [(step, value) for step, (_, value) in sorted(latest.items())]
    return out


# ================================================================== 10-crop examples


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
def ten_crop_predict(model: torch.nn.Module, examples: list[Example], resize: int, data_cfg) -> TenCropResult:
    """The paper's test-time averaging: softmax over the ten patches of each image, then the mean."""
    from distalex.data.augment import CorruptImage, centre_square, hwc_to_chw, normalize, ten_crop

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
    x = normalize(hwc_to_chw(crops_np), train=False, data_cfg=data_cfg)  # (B, 10, 3, S, S) float
    model.eval()
    b = x.shape[0]
    crop_probs = torch.softmax(model(x.flatten(0, 1)).float(), dim=-1).view(b, 10, -1)
    return TenCropResult(crops_np, crop_probs.mean(dim=1), crop_probs)


CROP_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


def plot_ten_crop(result: TenCropResult, examples: list[Example], classes: list[str], png_path: str | Path, top: int = 5) -> Path:
    n = len(examples)
    W, H = TEN_W, TEN_HEAD_H + TEN_ROW_H * n
    fig = _figure(W, H)
    fig.text(12 / W, 1 - 10 / H, "10-crop test (the paper, section 4.1): each patch's top-1 under it; bars: top-5 of the softmax "
             "averaged over the ten patches (green: the true class)",
             va="top", fontsize=12, weight="bold")

    def name(c: int) -> str:
        return classes[c] if c < len(classes) else f"class {c}"

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
            ax.set_xlabel(f"{name(int(c))[-12:]} {float(p):.2f}", fontsize=7, labelpad=2)
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
    return _save(fig, png_path)


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


def examples_from_shards(spec: str, num: int) -> list[Example]:
    """The first ``num`` readable samples of a validation shard list (shards are shuffled when written)."""
    from distalex.data.augment import CorruptImage
    from distalex.data.info import DataError, resolve_shards
    from distalex.data.loader import parse_sample, plan_segments, read_segment

    try:
        shards = resolve_shards(spec, "val", "data.val_shards")
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


# ================================================================== sources


@dataclass
class Source:
    """What one RUN_OR_CHECKPOINT gives; None where it gives nothing, with the reason in ``why``."""

    label: str
    state: dict[str, torch.Tensor] | None = None
    model_config: dict | None = None
    cfg: object | None = None  # distalex.config.Config of a checkpoint (or an MLflow run's config)
    classes: list[str] = field(default_factory=list)
    run_id: str | None = None
    tracking_uri: str | None = None
    workdir: Path | None = None
    """Where training ran: relative data paths in ``cfg`` are taken from there if not found here."""
    why: dict[str, str] = field(default_factory=dict)


def load_source(arg: str, tracking_uri: str | None = None) -> Source:
    """Read RUN_OR_CHECKPOINT (see the module docstring). Raises ReportError naming what is wrong."""
    path = Path(arg)
    if path.is_file():
        return _from_export(path)
    if path.is_dir():
        return _from_checkpoint(path, tracking_uri)
    if RUN_ID.match(arg):
        return _from_run(arg, tracking_uri)
    raise ReportError(f"{arg}: no such file or folder, and not an MLflow run id (32 hex digits)")


def _from_export(path: Path) -> Source:
    from distalex.export import ExportError, load_serial_model

    try:
        model, blob = load_serial_model(path)
    except ExportError as e:
        raise ReportError(str(e)) from None
    src = Source(f"model file {path}", state=model.state_dict(), model_config=blob["model_config"],
                 classes=list(blob.get("classes", [])))
    src.why["curves"] = "an exported model file has no metric history (give the checkpoint or the MLflow run id)"
    return src


def _from_checkpoint(path: Path, tracking_uri: str | None) -> Source:
    from distalex.checkpoint import CheckpointError, load_serial_state, read_meta, resolve_checkpoint

    if not (path / "meta.json").is_file() and (path / "checkpoints").is_dir() and not path.name.startswith("step-"):
        path = path / "checkpoints"  # a run folder
    try:
        folder = resolve_checkpoint(path)
        state, cfg, classes = load_serial_state(folder)
        meta = read_meta(folder)
    except CheckpointError as e:
        raise ReportError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:  # a meta.json or shard that lacks what it should
        raise ReportError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    src = Source(f"checkpoint {folder}", state=state, model_config=cfg.model.model_dump(), cfg=cfg, classes=list(classes))
    src.workdir = _training_workdir(folder, cfg)
    src.run_id = meta.get("mlflow_run_id") or (meta.get("train_state") or {}).get("mlflow_run_id")
    src.tracking_uri = tracking_uri or meta.get("tracking_uri") or _run_tracking_uri(cfg, src.workdir)
    if not src.run_id:
        src.why["curves"] = f"{folder / 'meta.json'} names no MLflow run (tracking was off?)"
    return src


def _training_workdir(folder: Path, cfg) -> Path | None:
    """The directory training ran in: relative paths in the config (shards, sqlite store) are relative to it.

    Found by taking ``checkpoint.dir`` (e.g. ``runs/demo/checkpoints``) off the end of where the
    checkpoint is; None when the checkpoint was moved or the directory was absolute.
    """
    rel = cfg.checkpoint_dir
    root = folder.resolve().parent
    if rel.is_absolute():
        return None
    n = len(rel.parts)
    if root.parts[-n:] != rel.parts:
        return None
    return root.parents[n - 1]


def _run_tracking_uri(cfg, workdir: Path | None) -> str:
    """The tracking URI training used (``tracking.resolve_tracking_uri``), seen from the training directory."""
    from distalex.tracking import resolve_tracking_uri

    base = workdir or Path.cwd()
    uri = cfg.tracking.uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to training's directory
        return "sqlite:///" + str(base / uri[len("sqlite:///") :])
    return resolve_tracking_uri(cfg, base / cfg.run_dir)


def _from_run(run_id: str, tracking_uri: str | None) -> Source:
    client, uri = _open_tracking(tracking_uri)
    run = _get_run(client, uri, run_id)
    src = Source(f"MLflow run {run_id}", run_id=run_id, tracking_uri=uri)
    run_dir = run.data.tags.get("distalex.run_dir")  # absolute: <training directory>/runs/<name>
    if run_dir:
        src.workdir = Path(run_dir).parent.parent
    artifact = _find_model_artifact(client, run_id)
    if artifact is None:
        src.why["kernels"] = src.why["ten_crop"] = f"MLflow run {run_id} has no model file (*.pt) among its artifacts"
        return src
    with tempfile.TemporaryDirectory() as tmp:
        exported = _from_export(Path(client.download_artifacts(run_id, artifact, tmp)))
        src.cfg = _run_config(client, run_id, tmp)
    src.state, src.model_config, src.classes = exported.state, exported.model_config, exported.classes
    src.label += f" (model artifact {artifact})"
    return src


def _run_config(client, run_id: str, tmp: str):
    """The resolved config the loop stores with the run (``config.yaml``), or None."""
    import yaml

    from distalex.config import Config

    try:
        text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        return Config.model_validate(yaml.safe_load(text))
    except Exception:  # noqa: BLE001 - absent (MLflow's own error), unreadable or invalid: no config
        return None


def _find_model_artifact(client, run_id: str, folder: str | None = None) -> str | None:
    """The first ``model.pt`` among a run's artifacts, else the first ``*.pt`` (breadth first)."""
    found, todo = [], [folder]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop(0)):
            if info.is_dir:
                todo.append(info.path)
            elif info.path.endswith(".pt"):
                found.append(info.path)
    found.sort(key=lambda p: (Path(p).name != "model.pt", p.count("/"), p))
    return found[0] if found else None


# ================================================================== the report


def build_report(
    source: Source, out: str | Path, images: list[str] | None = None, val_shards: str | None = None,
    num_images: int = 4, resize: int | None = None,
) -> dict[str, Path | str]:
    """Write what the source allows into ``out``; returns {picture: path, or the reason it is missing}."""
    out = Path(out)
    results: dict[str, Path | str] = {}

    # Kernels (and the model, for the 10-crop examples).
    model = None
    if source.state is not None:
        if "conv1.weight" not in source.state:
            raise ReportError(f"{source.label}: no conv1.weight in its state dict (has {sorted(source.state)[:8]} ...)")
        towers = int((source.model_config or {}).get("towers", 2))
        metrics = kernel_summary(source.state["conv1.weight"], towers, out / "kernels.png", title=f"conv1 kernels: {source.label}")
        results["kernels"] = out / "kernels.png"
        results["kernel_metrics"] = ", ".join(f"{k.removeprefix('kernels/')} {v:.3f}" for k, v in metrics.items())
        model = _build_model(source)
    else:
        results["kernels"] = source.why.get("kernels", "no weights")

    # Curves.
    if source.run_id:
        try:
            client, uri = _open_tracking(source.tracking_uri)
            run = _get_run(client, uri, source.run_id)
            histories = read_histories(client, source.run_id)
            if histories:
                name = run.info.run_name or source.run_id
                results["curves"] = plot_curves(histories, out / "curves.png", title=f"run {name} ({source.run_id})")
            else:
                results["curves"] = f"MLflow run {source.run_id} has none of the curve metrics"
        except ReportError as e:
            if model is None:  # the run is all there is: nothing to show
                raise
            results["curves"] = f"{e} (pass --tracking-uri)"
    else:
        results["curves"] = source.why.get("curves", "no MLflow run")

    # 10-crop examples. Images the user named must work; the run's own shards may have moved.
    if model is None:
        results["ten_crop"] = source.why.get("ten_crop", "no weights")
    elif not (images or val_shards or source.cfg is not None):
        results["ten_crop"] = "no validation images: pass --images or --val-shards"
    else:
        data_cfg = _data_config(source, val_shards, resize)
        try:
            if images:
                examples = examples_from_files(images, num_images, source.classes)
            else:
                examples = examples_from_shards(data_cfg.val_shards, num_images)
            result = ten_crop_predict(model, examples, data_cfg.resize, data_cfg)
            results["ten_crop"] = plot_ten_crop(result, examples, source.classes, out / "ten_crop.png")
        except ReportError as e:
            if images or val_shards:
                raise
            results["ten_crop"] = f"{e} (pass --images or --val-shards)"
    return results


def _build_model(source: Source):
    from distalex.config import ModelConfig
    from distalex.model import build_model

    model = build_model(ModelConfig(**source.model_config))
    try:
        model.load_state_dict(source.state)
    except RuntimeError as e:
        raise ReportError(f"{source.label}: weights do not fit its model config ({e})") from None
    return model.eval()


def _data_config(source: Source, val_shards: str | None, resize: int | None):
    """The checkpoint's data section, else defaults; --val-shards also supplies the statistics' _info.json."""
    from distalex.config import DataConfig

    data = source.cfg.data.model_copy() if source.cfg is not None else DataConfig()
    if source.workdir is not None:
        data.train_shards = _rebase(data.train_shards, source.workdir)
        data.val_shards = _rebase(data.val_shards, source.workdir)
    if val_shards:
        data.val_shards = val_shards
        if source.cfg is None:
            data.train_shards = val_shards  # the same _info.json holds the training statistics
    if resize:
        data.resize = resize
    elif source.cfg is None:
        data.resize = round(source.model_config["image_size"] * 256 / 224)  # the paper's 256 for 224
    return data


def _rebase(spec: str, workdir: Path) -> str:
    """A relative shard spec that does not exist from here, taken relative to the training directory."""
    import braceexpand

    def found(first: Path) -> bool:  # a path, or a glob whose folder exists
        return first.exists() or (any(c in str(first) for c in "*?[") and first.parent.is_dir())

    items = []
    for item in (s.strip() for s in spec.split(",")):
        if item and "://" not in item and not Path(item).is_absolute():
            first = Path(next(iter(braceexpand.braceexpand(item)), item))
            if not found(first) and found(workdir / first):
                item = str(workdir / item)
        items.append(item)
    return ",".join(items)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m distalex.report", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2].split("\nThe kernel picture")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="checkpoint folder or directory, run folder, exported model .pt, or MLflow run id")
    p.add_argument("--out", default="report", help="folder for the PNGs (default: report)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, or the checkpoint's)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE_OR_DIR", help="validation images for the 10-crop picture")
    p.add_argument("--val-shards", default=None, help="validation shards for the 10-crop picture (default: the run's data.val_shards)")
    p.add_argument("--num-images", type=int, default=4, help="images in the 10-crop picture (default: 4)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before cropping (default: the run's data.resize)")
    a = p.parse_args(argv)
    if a.num_images < 1:
        p.error("--num-images must be at least 1")
    # A dead tracking server should fail in seconds, not after MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    from distalex.config import ConfigError
    from distalex.data.info import DataError

    try:
        source = load_source(a.source, a.tracking_uri)
        results = build_report(source, a.out, a.images, a.val_shards, a.num_images, a.resize)
    except (ReportError, DataError, ConfigError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report of {source.label}")
    for key in ("kernels", "curves", "ten_crop"):
        value = results[key]
        if isinstance(value, Path):
            extra = f"  ({results['kernel_metrics']})" if key == "kernels" else ""
            print(f"  {key}: {value}{extra}")
        else:
            print(f"  {key}: skipped: {value}")


if __name__ == "__main__":
    main()
