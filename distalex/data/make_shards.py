"""ImageNet-layout folder -> WebDataset tar shards plus ``_info.json``.

    python -m distalex.data.make_shards SRC OUT [--max-size 1e9] [--max-count N] [--workers 8]

SRC holds ``train/<wnid>/*.JPEG`` and ``val/``: either ``val/<wnid>/*.JPEG`` or the flat
``val/ILSVRC2012_val_00000001.JPEG ...`` with the devkit (``--devkit DIR``: its
``ILSVRC2012_validation_ground_truth.txt`` and ``meta.mat``; found by itself under
SRC/ILSVRC2012_devkit_t12 or SRC/devkit). OUT gets ``imagenet-train-000000.tar ...``,
``imagenet-val-000000.tar ...`` and ``_info.json``.

``_info.json`` also lists a readable name per class (``class_names``, aligned with ``classes``):
from ``--class-names FILE`` or SRC/LOC_synset_mapping.txt (lines ``<wnid> <name>``), else from the
devkit's ``meta.mat`` (its ``words``), else the folder names themselves.

Each sample is ``<key>.cls`` (label, ASCII) and ``<key>.jpg``: by default the source file's bytes,
untouched; only a source that is not a baseline-decodable RGB/grey JPEG (PNG, CMYK, ...) is
re-encoded, as an RGB JPEG. ``--square N`` stores every image as the paper did (section 2): shorter
side N, the central N x N square (the pixels ``augment.centre_square`` gives the loader), re-encoded
at ``--quality``; the loader then crops it without resampling when ``data.resize`` is N.
``--resize N`` re-encodes everything with the shorter side N, keeping the aspect. The label is the index
of the wnid in the sorted list of train folders; the devkit's 1-based ids are mapped through
meta.mat (docs/paper.md, "Labels"). Samples are shuffled over the whole split with ``--seed`` before
they are cut into shards, so every shard is a random sample of the split.

Every image is decoded once (at 1/8 scale where possible) to find unreadable ones: they are
reported (path, reason), left out and counted in ``_info.json``. The first ``--stats-samples`` of
the shuffled train split also give the training mean and std per channel and the mean image
(256 x 256, ``_mean_image.npy``) used by ``augment.normalize``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from distalex.data.augment import open_rgb, square_image
from distalex.data.imagenet_folders import SYNSET_MAPPING, class_names, list_classes, list_train, list_val
from distalex.data.info import FORMAT, INFO_NAME, DataError
from distalex.progress import progress as progress_bar

MEAN_IMAGE = "_mean_image.npy"
STATS_SIZE = 256  # the mean image is kept at the paper's 256 x 256; normalize() resizes it
TAR_OVERHEAD = 2 * 1024  # two 512-byte headers plus padding per sample, for --max-size planning


@dataclass
class Item:
    path: str
    label: int
    key: str


@dataclass
class ShardJob:
    split: str
    index: int
    out: str
    items: list[Item]
    stats_upto: int  # items[:stats_upto] feed the training statistics
    resize: int | None
    quality: int
    square: int | None = None


@dataclass
class ShardResult:
    name: str
    count: int
    bytes: int
    converted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats_n: int = 0
    stats_sum: np.ndarray | None = None  # (S, S, 3) float64 sum of images in [0, 1]
    stats_sq: np.ndarray | None = None  # (3,) sum of squares per channel


# ------------------------------------------------------------------ the source folder


def make_keys(paths: list[str]) -> list[str]:
    """Keys without dots (WebDataset splits the extension at the first dot), unique in the split."""
    seen: dict[str, int] = {}
    keys = []
    for p in paths:
        key = re.sub(r"[^A-Za-z0-9_-]", "_", Path(p).stem)
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys.append(key if n == 0 else f"{key}_{n}")
    return keys


def plan_shards(items: list[Item], max_count: int, max_size: float) -> list[list[Item]]:
    """Cut the (shuffled) items into shards by sample count and estimated bytes."""
    shards, cur, size = [], [], 0
    for it in items:
        b = os.path.getsize(it.path) + TAR_OVERHEAD
        if cur and (len(cur) >= max_count or size + b > max_size):
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += b
    if cur:
        shards.append(cur)
    return shards


# ------------------------------------------------------------------ one image, one shard


def prepare(data: bytes, resize: int | None, quality: int, want_pixels: bool, square: int | None = None):
    """(bytes to store, re-encoded?, RGB image or None). Raises on an unreadable image."""
    if square is not None:
        return paper_form(data, square, quality)
    img = Image.open(io.BytesIO(data))
    keep = img.format == "JPEG" and img.mode in ("RGB", "L") and (resize is None or min(img.size) == resize)
    if keep and not want_pixels:
        # Full entropy decoding at 1/8 scale: finds truncated or broken files at a fraction of the cost.
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return data, False, None
    img.load()
    rgb = img.convert("RGB")
    if keep:
        return data, False, rgb
    if resize is not None and min(rgb.size) != resize:
        w, h = rgb.size
        s = resize / min(w, h)
        rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), True, rgb


def paper_form(data: bytes, side: int, quality: int) -> tuple[bytes, bool, Image.Image]:
    """The paper's storage of an image: shorter side ``side``, the central square, as a JPEG.

    (bytes, re-encoded?, RGB square). The square is the loader's own ``centre_square`` of the
    source; a source that already is a side x side RGB or grey JPEG is kept as it is.
    """
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and img.mode in ("RGB", "L") and img.size == (side, side):
        img.load()
        return data, False, img.convert("RGB")
    rgb = square_image(open_rgb(data, side), side)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), True, rgb


def _stats_pixels(rgb: Image.Image) -> np.ndarray:
    """Shorter side to 256 and the central square, as float64 in [0, 1]."""
    return np.asarray(square_image(rgb, STATS_SIZE), dtype=np.float64) / 255.0


def train_stats(n: int, total: np.ndarray, sq: np.ndarray, out: Path) -> dict:
    """The ``stats`` entry of ``_info.json`` from the sums over n images of ``_stats_pixels``;
    writes the mean image (256 x 256 x 3) into the folder ``out``."""
    mean_img = total / n
    mean_rgb = mean_img.mean(axis=(0, 1))
    var_rgb = sq / (n * STATS_SIZE * STATS_SIZE) - mean_rgb**2
    np.save(out / MEAN_IMAGE, mean_img.astype(np.float32))
    return {
        "samples": n, "mean_rgb": mean_rgb.tolist(), "std_rgb": np.sqrt(np.maximum(var_rgb, 1e-12)).tolist(),
        "mean_image": MEAN_IMAGE, "mean_image_size": STATS_SIZE,
    }


_progress = None  # multiprocessing.Value shared with the pool workers


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def write_shard(job: ShardJob) -> ShardResult:
    import webdataset as wds

    name = os.path.basename(job.out)
    res = ShardResult(name=name, count=0, bytes=0, converted=0)
    tmp = job.out + ".tmp"
    pending = 0
    with wds.TarWriter(tmp, mtime=0) as sink:
        for i, it in enumerate(job.items):
            want = i < job.stats_upto
            try:
                with open(it.path, "rb") as f:
                    raw = f.read()
                data, converted, rgb = prepare(raw, job.resize, job.quality, want, job.square)
            except Exception as e:  # any reason PIL gives; the file is reported, not fatal
                res.skipped.append((it.path, f"{type(e).__name__}: {e}"))
            else:
                sink.write({"__key__": it.key, "jpg": data, "cls": str(it.label).encode("ascii")})
                res.count += 1
                res.bytes += len(data)
                res.converted += converted
                if want:
                    px = _stats_pixels(rgb)
                    res.stats_sum = px if res.stats_sum is None else res.stats_sum + px
                    sq = (px * px).sum(axis=(0, 1))
                    res.stats_sq = sq if res.stats_sq is None else res.stats_sq + sq
                    res.stats_n += 1
            pending += 1
            if _progress is not None and pending >= 16:
                with _progress.get_lock():
                    _progress.value += pending
                pending = 0
    if _progress is not None and pending:
        with _progress.get_lock():
            _progress.value += pending
    os.replace(tmp, job.out)
    return res


# ------------------------------------------------------------------ the whole run


def _check_out(out: Path, overwrite: bool, prefix: str) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: exists and is not empty (pass --overwrite to replace its shards)")
        for p in out.iterdir():
            if p.name in (INFO_NAME, MEAN_IMAGE) or re.fullmatch(rf"{re.escape(prefix)}-\w+-\d+\.tar(\.tmp)?", p.name):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _run_jobs(jobs: list[ShardJob], workers: int, total: int, progress: bool) -> list[ShardResult]:
    counter = mp.Value("q", 0)
    bar = progress_bar(total, "make_shards", "img", disable=not progress, unit_scale=True, smoothing=0.1)
    done = threading.Event()

    def poll() -> None:  # images/s from the workers' shared counter
        while not done.wait(0.25):
            bar.update(counter.value - bar.n)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        if workers <= 1:
            _init_worker(counter)
            try:
                results = [write_shard(j) for j in jobs]
            finally:
                _init_worker(None)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
                results = pool.map(write_shard, jobs, chunksize=1)
    finally:
        done.set()
        poller.join()
        bar.update(counter.value - bar.n)
        bar.close()
    return results


def make_shards(
    src: str | Path,
    out: str | Path,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    max_count: int = 100_000,
    max_size: float = 1e9,
    workers: int = 1,
    seed: int = 0,
    resize: int | None = None,
    square: int | None = None,
    quality: int = 95,
    devkit: str | None = None,
    class_names_file: str | None = None,
    stats_samples: int = 10_000,
    overwrite: bool = False,
    prefix: str = "imagenet",
    progress: bool = False,
) -> dict:
    """Write the shards and ``_info.json``; returns the info dict. Raises DataError on a bad source."""
    src, out = Path(src), Path(out)
    if resize is not None and square is not None:
        raise DataError(f"resize={resize} and square={square}: choose one (square also sets the shorter side)")
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    classes = list_classes(src)
    names = class_names(src, classes, devkit, class_names_file)
    listed = {}
    for split in splits:
        if split == "train":
            listed[split] = list_train(src, classes)
        elif split == "val":
            listed[split] = list_val(src, classes, devkit)
        else:
            raise DataError(f"unknown split {split!r} (train or val)")
    _check_out(out, overwrite, prefix)

    info = {
        "format": FORMAT, "seed": seed, "resize": resize, "square": square, "quality": quality, "classes": classes, "num_classes": len(classes),
        "class_names": names,
        "source": str(src.resolve()), "splits": {},
    }
    t0 = time.perf_counter()
    for split in splits:
        pairs = sorted(listed[split])
        random.Random(f"{seed}-{split}").shuffle(pairs)  # global shuffle, before cutting shards
        items = [Item(p, lab, k) for (p, lab), k in zip(pairs, make_keys([p for p, _ in pairs]))]
        planned = plan_shards(items, max_count, max_size)
        jobs, first = [], 0
        for i, shard_items in enumerate(planned):
            upto = max(0, min(len(shard_items), stats_samples - first)) if split == "train" else 0
            jobs.append(ShardJob(split, i, str(out / f"{prefix}-{split}-{i:06d}.tar"), shard_items, upto,
                                 resize, quality, square))
            first += len(shard_items)
        results = _run_jobs(jobs, workers, len(items), progress)
        skipped = [s for r in results for s in r.skipped]
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        info["splits"][split] = {
            "count": sum(r.count for r in results),
            "skipped": len(skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
            "converted": sum(r.converted for r in results),
            "bytes": sum(r.bytes for r in results),
            "samples_per_shard": max_count,
            "shards": [{"name": r.name, "count": r.count, "bytes": r.bytes} for r in results],
        }
        if split == "train":
            n = sum(r.stats_n for r in results)
            if n:
                total = sum(r.stats_sum for r in results if r.stats_n)
                sq = sum(r.stats_sq for r in results if r.stats_n)
                info["stats"] = train_stats(n, total, sq, out)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    tmp = out / (INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / INFO_NAME)  # written last: shards without it are an unfinished run
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distalex-make-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ImageNet-layout folder (train/<wnid>/, val/)")
    p.add_argument("out", help="output folder for the shards and _info.json")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write (default: train,val)")
    p.add_argument("--max-count", type=int, default=100_000, help="samples per shard at most")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--resize", type=int, default=None, help="re-encode with the shorter side this long (e.g. 256)")
    p.add_argument("--square", type=int, default=None, metavar="N",
                   help="store each image as the paper did: shorter side N, the central N x N square (e.g. 256)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    p.add_argument("--devkit", default=None, help="ILSVRC2012 devkit folder, for a flat val/")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help=f"'<wnid> <name>' lines (default: SRC/{SYNSET_MAPPING}, else the devkit's meta.mat)")
    p.add_argument("--stats-samples", type=int, default=10_000, help="train images for mean/std (0: none)")
    p.add_argument("--prefix", default="imagenet", help="shard names: PREFIX-SPLIT-000000.tar")
    p.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.max_count < 1 or a.max_size <= 0 or a.workers < 0 or a.stats_samples < 0:
        p.error("--max-count and --max-size must be positive; --workers and --stats-samples >= 0")
    if a.resize is not None and a.square is not None:
        p.error("--resize and --square: choose one (--square N also sets the shorter side to N)")
    try:
        info = make_shards(
            a.src, a.out, splits=tuple(s for s in a.splits.split(",") if s), max_count=a.max_count,
            max_size=a.max_size, workers=a.workers, seed=a.seed, resize=a.resize, square=a.square, quality=a.quality,
            devkit=a.devkit, class_names_file=a.class_names, stats_samples=a.stats_samples,
            overwrite=a.overwrite, prefix=a.prefix, progress=not a.no_progress,
        )
    except DataError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        sys.exit(2)
    for split, s in info["splits"].items():
        print(f"{split}: {s['count']} samples in {len(s['shards'])} shards, {s['skipped']} skipped, "
              f"{s['converted']} re-encoded")
    print(f"classes: {len(info['classes'])}; wrote {Path(a.out) / INFO_NAME} in {info['seconds']} s")


if __name__ == "__main__":
    main()
