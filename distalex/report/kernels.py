"""The kernel picture (``kernels.png``, also ``kernel_summary`` for the training loop).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from distalex.report import ReportError
from distalex.report.canvas import figure, save

# Kernel picture geometry, in pixels (see the module docstring).
ZOOM, GAP, MAX_COLS = 4, 2, 16
MARGIN, TITLE_H, HEADER_H, BLOCK_PAD, MIN_W = 12, 34, 28, 12, 480
CHART_BASE_H, CHART_ROW_H, CHART_LEFT = 60, 24, 96
RANDOM_COLOUR_ENERGY = 2 / 3  # expected colour energy of an isotropic random kernel

# The colour metrics this module defines (the loop logs them; the curves read them back).
KERNEL_METRIC = "kernels/tower{t}_colour_energy"
KERNEL_GAP_METRIC = "kernels/colour_energy_gap"


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

    fig = figure(layout.width, layout.height)
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
    save(fig, png_path)
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

