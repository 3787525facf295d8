"""Shard lists and the dataset's ``_info.json``.

``make_shards`` writes ``_info.json`` beside the shards: the class list (sorted WordNet ids), and
per split the sample count, the shards with their sample counts, and the images it skipped. The
loader needs the per-shard counts to give every dp rank exactly the same number of samples, so
they are read here once, before any worker starts.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

INFO_NAME = "_info.json"
FORMAT = "distalex-shards/1"


class DataError(ValueError):
    """Bad data setup (missing shard, empty list, bad source folder): raised before training starts."""


@dataclass(frozen=True)
class Shard:
    """One tar shard and how many samples it holds."""

    url: str
    count: int


@dataclass(frozen=True)
class SplitInfo:
    count: int
    """Samples written to the shards of this split."""
    skipped: int
    """Source images that could not be read and were left out."""
    shards: dict[str, int]
    """Shard file name -> samples in it, in shard order."""


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    """Folder that holds ``_info.json`` and the shards."""
    classes: list[str]
    """WordNet ids (or folder names); the label is the index in this sorted list."""
    splits: dict[str, SplitInfo]
    class_names: list[str] = field(default_factory=list)
    """Human-readable name of each class, aligned with ``classes`` (the class ids when the source had none)."""
    stats: dict = field(default_factory=dict)
    """Training-set statistics: mean_rgb, std_rgb (pixels in [0, 1]), mean_image (.npy file name)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        if split not in self.splits:
            raise DataError(f"{self.root / INFO_NAME}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split].count


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_spec(spec: str, split: str | None = None) -> list[str]:
    """A shard spec to a list of shard paths, in order.

    The spec is a comma-separated list of items; each item is a brace pattern
    (``imagenet-train-{000000..000146}.tar``), a glob, a directory (its ``split`` shards, in the
    order of its ``_info.json``), or a path.
    """
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if os.path.isdir(item):
            out += _shards_in_dir(Path(item), split)
            continue
        for path in braceexpand.braceexpand(item):
            if any(c in path for c in "*?[") and not _is_remote(path):
                out += sorted(glob.glob(path))
            else:
                out.append(path)
    return out


def _shards_in_dir(root: Path, split: str | None) -> list[str]:
    if split is None:
        raise DataError(f"{root}: a directory as a shard spec needs the split (train or val)")
    info_path = root / INFO_NAME
    if info_path.is_file():
        info = read_info(root)
        if split in info.splits:
            return [str(root / name) for name in info.splits[split].shards]
    return sorted(str(p) for p in root.glob(f"*-{split}-*.tar"))


def info_path_for(spec: str) -> Path | None:
    """Where the ``_info.json`` of a spec lives: the directory itself, or the first shard's folder."""
    spec = spec.split(",")[0].strip()
    if os.path.isdir(spec):
        return Path(spec) / INFO_NAME
    if os.path.basename(spec) == INFO_NAME:
        return Path(spec)
    first = next(iter(braceexpand.braceexpand(spec)), spec)
    if _is_remote(first):
        return None
    return Path(os.path.dirname(first) or ".") / INFO_NAME


def read_info(shard_dir_or_pattern: str | os.PathLike) -> DatasetInfo:
    """Read the ``_info.json`` of a shard folder, a shard spec, or the file itself."""
    path = info_path_for(str(shard_dir_or_pattern))
    if path is None or not path.is_file():
        raise DataError(f"{shard_dir_or_pattern}: no {INFO_NAME} found (expected {path}); run make_shards")
    try:
        raw = json.loads(path.read_text())
        splits = {
            name: SplitInfo(
                count=int(s["count"]),
                skipped=int(s.get("skipped", 0)),
                shards={sh["name"]: int(sh["count"]) for sh in s["shards"]},
            )
            for name, s in raw["splits"].items()
        }
        classes = list(raw["classes"])
        names = raw.get("class_names")  # optional: files written before it existed lack it
        names = [str(n) for n in names] if isinstance(names, list) and len(names) == len(classes) else classes
        return DatasetInfo(
            root=path.parent, classes=classes, class_names=names, splits=splits, stats=raw.get("stats", {})
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a valid {INFO_NAME}: {e!r}") from None


def count_samples(path: str) -> int:
    """Samples in a tar shard, by reading its headers only (members grouped by key)."""
    keys = 0
    last = None
    try:
        with tarfile.open(path, mode="r:") as tf:
            for ti in tf:
                if ti.isreg():
                    key = sample_key(ti.name)
                    if key != last:
                        keys += 1
                        last = key
                tf.members = []
    except tarfile.TarError as e:  # without _info.json a broken shard has no known size
        raise DataError(f"{path}: not a readable tar ({e}); without _info.json its samples cannot be counted") from None
    return keys


def sample_key(name: str) -> str:
    """WebDataset convention: the key is the member name up to the first dot of its base name."""
    head, _, base = name.rpartition("/")
    return (head + "/" if head else "") + base.split(".", 1)[0]


def resolve_shards(spec: str, split: str, what: str = "data.train_shards") -> list[Shard]:
    """Expand a spec and attach each shard's sample count; missing shards are one clear error.

    Counts come from ``_info.json`` beside the shards; a shard it does not list is counted by
    reading its tar headers (slow for many large shards; run make_shards to get the file).
    """
    urls = expand_spec(spec, split)
    if not urls:
        raise DataError(f"{what}={spec!r}: matches no shards")
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{what}={spec!r}: {len(missing)} of {len(urls)} shards not found: {missing[:5]}{more}")
    counts: dict[str, int] = {}
    info_cache: dict[Path, DatasetInfo | None] = {}
    for url in urls:
        if _is_remote(url):
            raise DataError(f"{what}: {url}: only local shard files are supported")
        folder = Path(os.path.dirname(url) or ".")
        if folder not in info_cache:
            info_cache[folder] = read_info(folder) if (folder / INFO_NAME).is_file() else None
        info = info_cache[folder]
        name = os.path.basename(url)
        known = info.splits.get(split) if info is not None else None
        counts[url] = known.shards[name] if known is not None and name in known.shards else count_samples(url)
    shards = [Shard(u, counts[u]) for u in urls]
    if sum(s.count for s in shards) == 0:
        raise DataError(f"{what}={spec!r}: the {len(shards)} shards hold no samples")
    return shards
