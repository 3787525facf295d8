"""Count the samples of existing WebDataset shards and write the ``_info.json`` the loader needs.

    python -m distalex.data.index SPEC [--split train] [--out FILE] [--classes FILE] [--stats N]
    distalex-index SPEC ...

SPEC is a shard list as ``data.train_shards`` takes it: braces, globs, comma-separated items, and
URLs (``pipe:``, ``http(s)://``, ``s3://``, ...; see ``read.py``). Every shard is read once,
to its end (headers only for local files; streams are read through), and the file gets, as
make_shards writes it: per split the samples of each shard and their total, and the class list.
``--out`` (default: ``_info.json`` beside local shards; required for remote ones) may already
hold other splits: they are kept. Point ``data.info`` at the file when it does not sit beside
the shards.

Classes: ``--classes FILE`` takes lines ``ID [readable name]`` (ImageNet's
LOC_synset_mapping.txt: ``n01440764 tench, Tinca tinca``), label i being line i; the names become
``class_names``. Without it the classes of an existing ``--out`` are kept, else they are
"0" .. "max label". Labels come from ``cls`` members, or the ``--label-key`` entry of ``json``.
``--stats N`` also measures the training mean and std over the first N images (and writes the
mean image beside ``--out``), as make_shards does.

A shard that cannot be read to its end is listed with the samples before the break (a warning
names it); a shard with no readable sample, a label outside the class list, or no shard at all
is an error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distalex.data.augment import open_rgb
from distalex.data.info import FORMAT, INFO_NAME, DataError, expand_spec
from distalex.data.imagenet_folders import read_synset_mapping
from distalex.data.make_shards import STATS_SIZE, _stats_pixels, train_stats
from distalex.data.read import (
    IMAGE_EXTS, CorruptImage, ReadPolicy, Segment, check_readable, is_remote, open_url, parse_sample,
    read_segment, sample_label, shard_name, tar_samples,
)
from distalex.progress import progress as progress_bar

LABEL_FIELDS = frozenset({"cls", "json"})


@dataclass
class ShardScan:
    url: str
    count: int = 0
    """Samples (keys) read before the end of the shard or the first error."""
    max_label: int = -1
    min_label: int = 0
    incomplete: int = 0
    """Samples without an image or without a label (the loader skips them)."""
    stray: int = 0
    """Members without an extension (in no sample)."""
    error: str | None = None


def scan_shard(url: str, label_key: str, policy: ReadPolicy) -> ShardScan:
    """Count the samples and labels of one shard; a remote one is read again after a failure."""
    for attempt in range(policy.retries + 1):
        scan = ShardScan(url)

        def stray(n: int, reason: str) -> None:
            scan.stray += n

        try:
            with open_url(url, policy.stall_s) as (stream, seekable):
                for _, key, members in tar_samples(url, stream, seekable, 0, 1 << 62, LABEL_FIELDS, stray):
                    scan.count += 1
                    try:
                        label = sample_label(key, members, label_key)
                    except CorruptImage:
                        label = None
                    if label is None or not any(e in members for e in IMAGE_EXTS):
                        scan.incomplete += 1
                        continue
                    scan.max_label, scan.min_label = max(scan.max_label, label), min(scan.min_label, label)
            return scan
        except (OSError, EOFError, tarfile.TarError) as e:
            scan.error = f"{type(e).__name__}: {e}"
        if not is_remote(url) or attempt == policy.retries:
            return scan
        time.sleep(policy.wait_s * 2**attempt)
    return scan


def read_classes(path: str) -> tuple[list[str], list[str]]:
    """(ids, readable names) from lines ``ID [name ...]``, label i being line i."""
    try:
        pairs = read_synset_mapping(Path(path))
    except OSError as e:
        raise DataError(f"--classes {path}: {e.strerror}") from None
    ids = [i for i, _ in pairs]
    if not ids:
        raise DataError(f"--classes {path}: no class lines")
    if len(set(ids)) != len(ids):
        raise DataError(f"--classes {path}: class ids repeat")
    return ids, [n for _, n in pairs]


def measure_stats(shards: list[tuple[str, int]], n: int, label_key: str, policy: ReadPolicy, out_dir: Path) -> dict:
    """Training mean/std and mean image over the first n decodable images of the shards, in order."""
    total, sq, used = np.zeros((STATS_SIZE, STATS_SIZE, 3)), np.zeros(3), 0
    for url, count in shards:
        for key, members in read_segment(Segment(url, 0, count), lambda k, why: None, policy):
            try:
                data, _ = parse_sample(key, members, label_key)
                px = _stats_pixels(open_rgb(data, STATS_SIZE))
            except CorruptImage:
                continue
            total += px
            sq += (px * px).sum(axis=(0, 1))
            used += 1
            if used == n:
                return train_stats(used, total, sq, out_dir)
    if used == 0:
        raise DataError("--stats: no decodable image in the shards")
    return train_stats(used, total, sq, out_dir)


def default_out(urls: list[str]) -> Path:
    if is_remote(urls[0]):
        raise DataError("remote shards: pass --out FILE (then set data.info to it)")
    return Path(os.path.dirname(urls[0]) or ".") / INFO_NAME


def index(spec: str, *, split: str = "train", out: str | None = None, classes_file: str | None = None,
          stats: int = 0, label_key: str = "label", workers: int = 4, policy: ReadPolicy = ReadPolicy(),
          progress: bool = True) -> tuple[dict, Path]:
    """Scan the shards of ``spec`` and write (or update) the ``_info.json``: (its content, its path)."""
    urls = expand_spec(spec, split)
    if not urls:
        raise DataError(f"{spec!r}: matches no shards")
    try:
        check_readable(urls, "index")
    except ValueError as e:
        raise DataError(str(e)) from None
    out_path = Path(out) if out else default_out(urls)
    if out_path.is_dir():
        out_path = out_path / INFO_NAME
    info = json.loads(out_path.read_text()) if out_path.is_file() else {}

    bar = progress_bar(len(urls), "index", "shard", disable=not progress)
    scans: list[ShardScan] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # shards are read concurrently: mostly waiting on I/O
        for scan in pool.map(lambda u: scan_shard(u, label_key, policy), urls):
            scans.append(scan)
            bar.update(1)
            bar.set_postfix(samples=sum(s.count for s in scans), refresh=False)
    bar.close()
    for s in scans:
        if s.error:
            print(f"index: warning: {s.url}: {s.error}; listed with the {s.count} samples before the break",
                  file=sys.stderr)
    if sum(s.count for s in scans) == 0:
        raise DataError(f"{spec!r}: no readable sample in {len(urls)} shards")
    bad = [s for s in scans if s.min_label < 0]
    if bad:
        raise DataError(f"{bad[0].url}: negative label {bad[0].min_label}")

    names = None
    if classes_file:
        classes, names = read_classes(classes_file)
    elif info.get("classes"):
        classes = list(info["classes"])
    else:
        classes = [str(i) for i in range(max(s.max_label for s in scans) + 1)]
    over = [s for s in scans if s.max_label >= len(classes)]
    if over:
        raise DataError(f"{over[0].url}: label {over[0].max_label}, but the class list has {len(classes)} classes")

    info.update(format=FORMAT, classes=classes, num_classes=len(classes))
    if names is not None:
        info["class_names"] = names
    info.setdefault("splits", {})[split] = {
        "count": sum(s.count for s in scans),
        "skipped": 0,
        "incomplete_samples": sum(s.incomplete for s in scans),
        "stray_members": sum(s.stray for s in scans),
        "source": spec,
        "shards": [{"name": shard_name(s.url), "url": s.url, "count": s.count} for s in scans],
        "unreadable": [{"url": s.url, "error": s.error} for s in scans if s.error],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if stats:
        info["stats"] = measure_stats([(s.url, s.count) for s in scans], stats, label_key, policy, out_path.parent)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out_path)
    return info, out_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distalex-index", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="shards: braces, globs, comma list, pipe:CMD, http(s)://, s3://, ...")
    p.add_argument("--split", default="train", help="the split these shards are (default: train)")
    p.add_argument("--out", default=None, help=f"the {INFO_NAME} to write (default: beside local shards)")
    p.add_argument("--classes", default=None, metavar="FILE", help="lines 'ID [name]'; label i = line i")
    p.add_argument("--stats", type=int, default=0, metavar="N", help="mean/std over the first N images (0: none)")
    p.add_argument("--label-key", default="label", help="label entry of json members (default: label)")
    p.add_argument("--workers", type=int, default=4, help="shards read at the same time (default: 4)")
    p.add_argument("--retries", type=int, default=3, help="re-reads of a remote shard after a failure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.stats < 0 or a.workers < 1 or a.retries < 0:
        p.error("--stats and --retries must be >= 0, --workers >= 1")
    try:
        info, path = index(a.spec, split=a.split, out=a.out, classes_file=a.classes, stats=a.stats, label_key=a.label_key,
                     workers=a.workers, policy=ReadPolicy(retries=a.retries), progress=not a.no_progress)
    except DataError as e:
        print(f"index: error: {e}", file=sys.stderr)
        sys.exit(2)
    s = info["splits"][a.split]
    if s["incomplete_samples"]:
        print(f"index: warning: {s['incomplete_samples']} samples lack an image or a label and will be skipped "
              "(a sample's members must be adjacent in the tar: create it with GNU tar --sort=name)", file=sys.stderr)
    print(f"{a.split}: {s['count']} samples in {len(s['shards'])} shards ({s['incomplete_samples']} without "
          f"image or label, {len(s['unreadable'])} shards cut short); {len(info['classes'])} classes; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
