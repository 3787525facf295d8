"""A small real dataset in the ImageNet layout, with no download.

    python -m distalex.data.demo OUT [--train-per-class 150] [--val-per-class 30] [--size 96] [--pairs]

The images are scikit-learn's handwritten digits (``load_digits``: 1797 real 8x8 scans of the
digits 0-9, shipped inside the scikit-learn package), drawn as colour JPEGs: each digit is upscaled
to a random size, placed near the centre of a canvas of random size and aspect (shorter side about
``--size``), in a random foreground colour over a random gradient background with noise. Ten
classes ``n00000000`` .. ``n00000009`` (wnid-like names, so the sorted order is the digit order).
Validation images come from scans that no training image uses. The task is learnable by a small
AlexNet in minutes but not trivial: colour carries no information, position and scale vary.

The default (1500 train, 300 val images of about 96 px) takes a few seconds, and so does
``make_shards`` on it; the demo run uses ``data.resize=72`` and ``model.image_size=64``.

``--pairs`` draws two scans side by side instead: 100 classes ``n00000000`` .. ``n00000099``, the
two-digit numbers 00 to 99 (a task with many classes, for bench/learnability.py).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def class_name(digit: int) -> str:
    return f"n{digit:08d}"


def render(digit_img: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit scan (values 0..16), or two side by side (8x16), as an RGB image whose shorter
    side is about ``size``."""
    wide = digit_img.shape[1] > digit_img.shape[0]
    short = int(round(size * rng.uniform(0.9, 1.1)))
    long = int(round(short * rng.uniform(*((1.2, 1.5) if wide else (1.0, 1.33)))))
    w, h = (long, short) if wide or rng.random() < 0.75 else (short, long)
    # background: a random linear gradient between two colours, plus noise
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = ((xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)) / max(w, h) + 0.5
    bg = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    bg += rng.normal(0, 8, bg.shape)
    # foreground: a colour far from the background's mean colour
    while True:
        fg = rng.uniform(0, 255, 3)
        if np.abs(fg - bg.mean(axis=(0, 1))).sum() > 200:
            break
    # the glyph's height; a pair is kept small and near the centre, inside the central square
    d = int(round(short * rng.uniform(*((0.3, 0.4) if wide else (0.5, 0.75)))))
    dw = d * digit_img.shape[1] // digit_img.shape[0]
    glyph = Image.fromarray((digit_img * (255 / 16)).astype(np.uint8)).resize((dw, d), Image.BICUBIC)
    mask = np.zeros((h, w))
    shift = 0.5 if wide else 1.0
    cx = int(round((w - dw) / 2 + shift * rng.uniform(-0.1, 0.1) * w))
    cy = int(round((h - d) / 2 + shift * rng.uniform(-0.1, 0.1) * h))
    cx, cy = min(max(cx, 0), w - dw), min(max(cy, 0), h - d)
    mask[cy : cy + d, cx : cx + dw] = np.asarray(glyph, dtype=np.float64) / 255
    img = bg * (1 - mask[..., None]) + fg * mask[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


PAIR_VAL_SCANS = 30
"""Scans of each digit held out for the validation images of ``--pairs``."""


def _save(img: Image.Image, path: Path, quality: int) -> None:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


def write_demo(
    out: str | Path, train_per_class: int = 150, val_per_class: int = 30, size: int = 96, seed: int = 0,
    quality: int = 90, pairs: bool = False,
) -> dict[str, int]:
    """Write OUT/train/<wnid>/*.JPEG, OUT/val/<wnid>/*.JPEG and the class names; returns image counts per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = Path(out)
    counts = {"train": 0, "val": 0}
    out.mkdir(parents=True, exist_ok=True)
    if pairs:
        return _write_pairs(out, digits, rng, train_per_class, val_per_class, size, quality)
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{class_name(d)} digit {d}\n" for d in range(10)))
    for digit in range(10):
        scans = rng.permutation(np.flatnonzero(digits.target == digit))
        if len(scans) <= val_per_class:
            raise ValueError(f"--val-per-class={val_per_class}: digit {digit} has only {len(scans)} scans")
        val_scans, train_scans = scans[:val_per_class], scans[val_per_class:]
        for split, n, pool in (("train", train_per_class, train_scans), ("val", val_per_class, val_scans)):
            folder = out / split / class_name(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                scan = pool[i % len(pool)]  # more images than scans: the same scan drawn anew
                _save(render(digits.images[scan], size, rng), folder / f"{class_name(digit)}_{split}_{i:05d}.JPEG", quality)
                counts[split] += 1
    return counts


def _write_pairs(out: Path, digits, rng: np.random.Generator, train_per_class: int, val_per_class: int, size: int,
                 quality: int) -> dict[str, int]:
    """``write_demo`` for 100 classes: class 10 a + b shows a scan of digit a left of one of digit b;
    validation images take their scans from ``PAIR_VAL_SCANS`` per digit that training never shows."""
    pools = {}
    for digit in range(10):
        scans = rng.permutation(np.flatnonzero(digits.target == digit))
        pools[digit] = {"val": scans[:PAIR_VAL_SCANS], "train": scans[PAIR_VAL_SCANS:]}
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{class_name(c)} number {c:02d}\n" for c in range(100)))
    counts = {"train": 0, "val": 0}
    for c in range(100):
        a, b = divmod(c, 10)
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            folder = out / split / class_name(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                left, right = (digits.images[rng.choice(pools[d][split])] for d in (a, b))
                gap = np.zeros((8, 1))
                _save(render(np.hstack([left, gap, right]), size, rng), folder / f"{class_name(c)}_{split}_{i:05d}.JPEG",
                      quality)
                counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distalex.data.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write train/ and val/ into")
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--size", type=int, default=96, help="shorter side of the images, about")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", action="store_true", help="100 classes: two scans side by side, the numbers 00-99")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"demo: error: {out} exists and is not empty", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    counts = write_demo(out, a.train_per_class, a.val_per_class, a.size, a.seed, pairs=a.pairs)
    print(f"wrote {counts['train']} train and {counts['val']} val images of {100 if a.pairs else 10} classes to {out} "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
