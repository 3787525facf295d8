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
from distalex.data.info import FORMAT, INFO_NAME, DataError
from distalex.progress import progress as progress_bar

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
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


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def list_classes(src: Path) -> list[str]:
    train = src / "train"
    if not train.is_dir():
        raise DataError(f"{train}: missing (expected train/<wnid>/*.JPEG)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train}: no class folders")
    return classes


def list_train(src: Path, classes: list[str]) -> list[tuple[str, int]]:
    items, empty = [], []
    for label, wnid in enumerate(classes):
        files = _images(src / "train" / wnid)
        if not files:
            empty.append(wnid)
        items += [(str(f), label) for f in files]
    if empty:
        raise DataError(f"{src / 'train'}: empty class folder(s): {empty[:10]}")
    return items


def _devkit_file(devkit: Path, name: str) -> Path | None:
    return next((d / name for d in (devkit, devkit / "data") if (d / name).is_file()), None)


def _leaf_synsets(meta: Path) -> list:
    """meta.mat's synsets of the 1000 classes (the rest are their WordNet ancestors)."""
    import scipy.io

    synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    return [s for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0]


def read_devkit(devkit: Path) -> list[str]:
    """wnid of each validation image, in the devkit's order (line i <-> ILSVRC2012_val_{i:08d})."""
    gt, meta = _devkit_file(devkit, GROUND_TRUTH), _devkit_file(devkit, META)
    if gt is None or meta is None:
        raise DataError(f"{devkit}: needs {GROUND_TRUTH} and {META} (in it or in its data/ folder)")
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in _leaf_synsets(meta)}
    wnids = []
    for n, line in enumerate(gt.read_text().split(), 1):
        if int(line) not in id_to_wnid:
            raise DataError(f"{gt}:{n}: class id {line} not among the leaf synsets of {meta}")
        wnids.append(id_to_wnid[int(line)])
    return wnids


def _find_devkit(src: Path, devkit: str | None) -> Path | None:
    if devkit:
        return Path(devkit)
    for d in (src / "ILSVRC2012_devkit_t12", src / "devkit", src / "val"):
        if (d / GROUND_TRUTH).is_file() or (d / "data" / GROUND_TRUTH).is_file():
            return d
    return None


def read_synset_mapping(path: Path) -> list[tuple[str, str]]:
    """(id, readable name) of each line ``<id> <name>`` (ImageNet's LOC_synset_mapping.txt), in file
    order; the id stands for the name where none follows it."""
    pairs = []
    for line in path.read_text().splitlines():
        parts = line.split(maxsplit=1)
        if parts:
            pairs.append((parts[0], parts[1].strip() if len(parts) > 1 else parts[0]))
    return pairs


def class_names(src: Path, classes: list[str], devkit: str | None, mapping: str | None = None) -> list[str]:
    """A readable name per class: ``mapping`` or SRC/LOC_synset_mapping.txt (``<wnid> <name>`` lines),
    else the devkit's meta.mat words, else the class ids. A class the source does not name keeps its id."""
    path = Path(mapping) if mapping else src / SYNSET_MAPPING
    if mapping and not path.is_file():
        raise DataError(f"--class-names {path}: no such file")
    names: dict[str, str] = {}
    if path.is_file():
        names = dict(read_synset_mapping(path))
    else:
        kit = _find_devkit(src, devkit)
        meta = _devkit_file(kit, META) if kit is not None else None
        if meta is not None:
            names = {str(s["WNID"]): str(s["words"]) for s in _leaf_synsets(meta)}
    return [names.get(c, c) for c in classes]


def list_val(src: Path, classes: list[str], devkit: str | None) -> list[tuple[str, int]]:
    val = src / "val"
    if not val.is_dir():
        raise DataError(f"{val}: missing (expected val/<wnid>/ folders, or flat val/ with the devkit)")
    index = {w: i for i, w in enumerate(classes)}
    folders = sorted(p for p in val.iterdir() if p.is_dir())
    if folders:
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise DataError(f"{val}: class folder(s) not in train/: {unknown[:10]}")
        items, empty = [], []
        for p in folders:
            files = _images(p)
            if not files:
                empty.append(p.name)
            items += [(str(f), index[p.name]) for f in files]
        if empty:
            raise DataError(f"{val}: empty class folder(s): {empty[:10]}")
        return items
    files = [f for f in _images(val) if f.name not in (GROUND_TRUTH, META)]
    if not files:
        raise DataError(f"{val}: no images")
    kit = _find_devkit(src, devkit)
    if kit is None:
        raise DataError(f"{val} is flat ({len(files)} files) but no devkit was found: pass --devkit DIR")
    wnids = read_devkit(kit)
    items = []
    for pos, f in enumerate(files):
        m = re.search(r"(\d+)$", f.stem)  # ILSVRC2012_val_00000042 -> line 42 of the ground truth
        n = int(m.group(1)) if m else pos + 1
        if not 1 <= n <= len(wnids):
            raise DataError(f"{f}: number {n} outside the ground truth's 1..{len(wnids)}")
        if wnids[n - 1] not in index:
            raise DataError(f"{f}: ground truth {wnids[n - 1]} is not a train/ class")
        items.append((str(f), index[wnids[n - 1]]))
    return items


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
