"""Learning curves from a run's MLflow metric histories.

``curves.png`` (1500 x 800): from the MLflow run's metric histories, against the step they were
logged at: loss (train, per-epoch train, val), val top-1 and top-5 error, learning rate (log
scale), the towers' colour energy (when the loop logged it) and training images/s.
"""

from __future__ import annotations

from pathlib import Path

from distalex.report.canvas import DPI, figure, save
from distalex.tracking.metrics import (
    METRIC_EPOCH_LOSS, METRIC_IMAGES_PER_S, METRIC_LOSS, METRIC_LR, METRIC_TOP1, METRIC_TOP5, METRIC_VAL_LOSS,
)

# curves.png size in inches at DPI.
CURVES_SIZE = (15, 8)

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
    fig = figure(w * DPI, h * DPI)
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
    return save(fig, png_path)


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
