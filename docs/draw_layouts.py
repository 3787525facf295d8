"""Draws docs/layouts.png: which rank of a tp pair holds what, and where the ranks exchange data.

    python docs/draw_layouts.py [--out docs/layouts.png]      (make layouts)

The exchanges come from the two tables of docs/parallelism.md ("## Towers", "## Hybrid"), the
tables tests/test_tensor_parallel.py checks against the collectives a real training step makes.
The picture records a digest of those tables (PNG text "tables-sha256"); tests/test_docs.py fails
when the tables changed and the picture was not redrawn.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

DOCS = Path(__file__).resolve().parent
PAGE = DOCS / "parallelism.md"
PICTURE = DOCS / "layouts.png"
SECTIONS = {"towers": "Towers", "hybrid": "Hybrid"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
KERNELS = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128}  # per tower, the paper's
RANK_COLOURS = ("#9ab8dc", "#f2b98c")  # tower / rank 0, tower / rank 1
TAKES_DATA = {"towers": "broadcast\n(the whole batch)", "hybrid": "scatter\n(each rank its samples)"}


def section_text(section: str, page: Path = PAGE) -> str:
    """The body of ``## section`` in the page, up to the next ``## `` heading."""
    text = page.read_text()
    if f"\n## {section}\n" not in text:
        raise ValueError(f"{page}: no section '## {section}'")
    return text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]


def layer_table(section: str, page: Path = PAGE) -> list[tuple[list[str], list[str], list[str]]]:
    """The per-layer table of ``## section``: (layers, forward collectives, backward collectives) per
    row, the collectives in the order the cell names them; "conv2..conv5" names four layers."""
    rows = []
    for line in section_text(section, page).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 4 or cells[0] == "layer":
            continue
        layers = []
        for kind, a, b in re.findall(r"(conv|fc)(\d)(?:\.\.(?:conv|fc)(\d))?", cells[0]):
            layers += [f"{kind}{i}" for i in range(int(a), int(b or a) + 1)]
        words = [re.findall("|".join(COLLECTIVES), cell) for cell in cells[2:]]
        rows.append((layers, *words))
    return rows


def tables_digest(page: Path = PAGE) -> str:
    """sha256 of the two tables' rows as parsed: what the picture is drawn from."""
    parsed = repr([layer_table(SECTIONS[layout], page) for layout in SECTIONS])
    return hashlib.sha256(parsed.encode()).hexdigest()


def holds(layout: str, layer: str, rank: int) -> str:
    """What tp rank ``rank`` of a pair holds at ``layer`` (the paper's widths, batch B)."""
    if layout == "towers":
        if layer in KERNELS:
            seen = {"conv2": ", own channels", "conv3": ", ALL channels"}.get(layer, "")
            return f"tower {rank}: {KERNELS[layer]} kernels{seen}"
    elif layer in KERNELS:
        return f"all {2 * KERNELS[layer]} kernels, its B/2 samples"
    return {
        "fc6": f"rows: tower {rank}'s features" if layout == "towers" else f"rows: feature block {rank}, all B",
        "fc7": f"columns: outputs {2048 * rank}-{2048 * rank + 2047}",
        "fc8": f"rows: fc7 outputs {2048 * rank}-{2048 * rank + 2047}",
    }[layer]


def exchange_label(fwd: list[str], bwd: list[str]) -> str:
    lines = [f"fwd: {' + '.join(fwd)}"] if fwd else []
    return "\n".join(lines + ([f"bwd: {' + '.join(bwd)}"] if bwd else []))


def draw_panel(ax, layout: str, page: Path) -> None:
    exchanges = {layer: (fwd, bwd) for layers, fwd, bwd in layer_table(SECTIONS[layout], page) for layer in layers}
    rows = ["data", *LAYERS]
    left, right, width = 0.09, 0.68, 0.31
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(rows) + 0.5)
    ax.axis("off")
    for x, rank in ((left, 0), (right, 1)):
        ax.text(x + width / 2, len(rows) + 0.15, f"tp rank {rank}", ha="center", fontsize=10, weight="bold")
    for i, layer in enumerate(rows):
        y = len(rows) - 1 - i  # box from y + 0.1 to y + 0.8
        ax.text(0.0, y + 0.45, layer, ha="left", va="center", fontsize=9, weight="bold", color="#333333")
        for x, rank in ((left, 0), (right, 1)):
            if layer == "data":
                text = "reads the batch" if rank == 0 else ("the same batch" if layout == "towers" else "its B/2 samples")
                colours = ["#e6e6e6"]
            else:
                text = holds(layout, layer, rank)
                both = layout == "hybrid" and layer in KERNELS  # every kernel of both towers
                colours = list(RANK_COLOURS) if both else [RANK_COLOURS[rank]]
            for j, colour in enumerate(colours):
                part = width / len(colours)
                ax.add_patch(Rectangle((x + j * part, y + 0.1), part, 0.7, facecolor=colour, edgecolor="none"))
            ax.add_patch(Rectangle((x, y + 0.1), width, 0.7, facecolor="none", edgecolor="#555555"))
            ax.text(x + width / 2, y + 0.45, text, ha="center", va="center", fontsize=7.4)
        if layer == "data":
            label, style = TAKES_DATA[layout], "->"
        else:
            fwd, bwd = exchanges.get(layer, ([], []))
            label, style = exchange_label(fwd, bwd), "<->"
        if label:
            ax.annotate("", xy=(right - 0.005, y + 0.22), xytext=(left + width + 0.005, y + 0.22),
                        arrowprops=dict(arrowstyle=style, color="#b03030", lw=1.6))
            ax.text((left + width + right) / 2, y + 0.33, label, ha="center", va="bottom", fontsize=6.8,
                    color="#b03030", linespacing=1.0)


def draw(out: Path = PICTURE, page: Path = PAGE) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 7.4))
    titles = {"towers": "parallel.layout: towers (the paper, 2012)\nrank r holds tower r and sees every image",
              "hybrid": "parallel.layout: hybrid (Krizhevsky 2014)\nconvs data-parallel, fully connected layers model-parallel"}
    for ax, layout in zip(axes, SECTIONS):
        draw_panel(ax, layout, page)
        ax.set_title(titles[layout], fontsize=11)
    fig.text(0.5, 0.012, "One tp pair (tp=2) at the paper's widths, batch B. Blue: tower 0 or rank 0's slice; orange: tower 1 or "
             "rank 1's slice; both colours: both towers' kernels.\nRed: what the two ranks exchange (fwd: forward, bwd: "
             "backward). x dp: each pair is one data-parallel replica (rank = dp_rank * tp + tp_rank);\nafter the backward "
             "pass the gradients are all-reduced over the dp group only (DDP or ZeRO).", ha="center", fontsize=9,
             linespacing=1.4)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, metadata={"Software": None, "Source": "docs/draw_layouts.py",
                                       "tables-sha256": tables_digest(page)})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=PICTURE, help=f"the PNG to write (default {PICTURE.relative_to(DOCS.parent)})")
    a = p.parse_args(argv)
    print(draw(a.out))


if __name__ == "__main__":
    main()
