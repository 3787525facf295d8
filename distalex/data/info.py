"""Shard lists and the dataset's ``_info.json``.

``make_shards`` writes ``_info.json`` beside the shards, and ``python -m distalex.data.index``
writes one for shards from elsewhere: the class list (the label is its index; an optional
``class_names`` list gives readable names), and per split the sample count and the shards with
their sample counts. The loader needs the per-shard counts to give every dp rank exactly the same
number of samples, so they are read here once, before any worker starts. The file sits beside
local shards or anywhere ``data.info`` points (a path or URL); keys this code does not know are
ignored.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from distalex.data.read import ReadPolicy, check_readable, count_samples, is_remote, local_path, read_bytes, shard_name

INFO_NAME = "_info.json"
FORMAT = "distalex-shards/1"
NEEDS_INFO = (
    f"remote shards need data.info, the path or URL of their {INFO_NAME} "
    "(write one with: python -m distalex.data.index SPEC --out FILE)"
)


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
    urls: dict[str, int] = field(default_factory=dict)
    """Shard URL -> samples, for the shards listed with a ``url`` (written by ``distalex.data.index``)."""


@dataclass(frozen=True)
class DatasetInfo:
    root: str
    """Folder (path or URL) that holds ``_info.json``; the mean image's name is relative to it."""
    classes: list[str]
    """WordNet ids (or folder names, or "0", "1", ...); the label is the index in this list."""
    splits: dict[str, SplitInfo]
    class_names: list[str] = field(default_factory=list)
    """Human-readable name of each class, aligned with ``classes`` (the class ids when the source had none)."""
    stats: dict = field(default_factory=dict)
    """Training-set statistics: mean_rgb, std_rgb (pixels in [0, 1]), mean_image (.npy file name)."""
    location: str = ""
    """The ``_info.json`` path or URL itself."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        return self.split(split).count

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"{self.location}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def path_of(self, name: str) -> str:
        """A file named in ``_info.json`` (the mean image), as a path or URL."""
        return f"{self.root.rstrip('/')}/{name}" if is_remote(self.root) else os.path.join(self.root, name)


def expand_spec(spec: str, split: str | None = None) -> list[str]:
    """A shard spec to a list of shard paths or URLs, in order.

    The spec is a comma-separated list of items; each item is a brace pattern
    (``imagenet-train-{000000..000146}.tar``), a glob (local only), a directory (its ``split``
    shards, in the order of its ``_info.json``), a path, or a URL (``pipe:``, ``http(s)://``,
    ``s3://``, ...).
    """
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if not is_remote(item) and os.path.isdir(item):
            out += _shards_in_dir(Path(item), split)
            continue
        for path in braceexpand.braceexpand(item):
            if any(c in path for c in "*?[") and not is_remote(path):
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
    """Where the ``_info.json`` of a local spec lives: the directory itself, or the first shard's folder."""
    spec = spec.split(",")[0].strip()
    if is_remote(spec):
        return None
    if os.path.isdir(spec):
        return Path(spec) / INFO_NAME
    if os.path.basename(spec) == INFO_NAME:
        return Path(spec)
    first = next(iter(braceexpand.braceexpand(spec)), spec)
    return Path(os.path.dirname(first) or ".") / INFO_NAME


def info_location(spec: str, info: str | None = None) -> str | None:
    """The ``_info.json`` of a shard spec: ``info`` (``data.info``) when given, else beside local shards."""
    if info:
        return str(Path(info) / INFO_NAME) if not is_remote(info) and os.path.isdir(info) else info
    path = info_path_for(str(spec))
    return None if path is None else str(path)


def read_info(spec: str | os.PathLike, info: str | None = None) -> DatasetInfo:
    """The ``_info.json`` of a shard folder, a shard spec, or the file itself (``info`` overrides)."""
    location = info_location(str(spec), info)
    if location is None:
        raise DataError(f"{spec}: {NEEDS_INFO}")
    local = local_path(location)
    if local is not None and not os.path.isfile(local):
        hint = "set data.info, or run make_shards or python -m distalex.data.index SPEC"
        raise DataError(f"{spec}: no {INFO_NAME} found (expected {location}); {hint}")
    try:
        raw = json.loads(read_bytes(location) if local is not None else _remote_text(location))
        splits = {
            name: SplitInfo(
                count=int(s["count"]),
                skipped=int(s.get("skipped", 0)),
                shards={sh["name"]: int(sh["count"]) for sh in s["shards"]},
                urls={sh["url"]: int(sh["count"]) for sh in s["shards"] if "url" in sh},
            )
            for name, s in raw["splits"].items()
        }
        classes = list(raw["classes"])
        names = raw.get("class_names")  # optional: files written before it existed lack it
        names = [str(n) for n in names] if isinstance(names, list) and len(names) == len(classes) else classes
        root = (os.path.dirname(local) or ".") if local is not None else location.rsplit("/", 1)[0]
        return DatasetInfo(
            root=root, classes=classes, class_names=names, splits=splits, stats=raw.get("stats", {}),
            location=location,
        )
    except OSError as e:
        raise DataError(f"{location}: cannot read {INFO_NAME}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{location}: not a valid {INFO_NAME}: {e!r}") from None


@functools.lru_cache(maxsize=8)
def _remote_text(url: str) -> bytes:
    """A remote _info.json is fetched once per process (setup, both loaders and normalize read it)."""
    return read_bytes(url)


def dataset_info(spec: str, info: str | None = None) -> DatasetInfo | None:
    """``read_info``, or None where the shards have no ``_info.json`` (local shards counted by reading)."""
    location = info_location(spec, info)
    if location is None or (local_path(location) is not None and not os.path.isfile(local_path(location))):
        return None
    return read_info(spec, info)


def resolve_shards(spec: str, split: str, what: str = "data.train_shards", info: str | None = None) -> list[Shard]:
    """Expand a spec and attach each shard's sample count; missing shards are one clear error.

    Counts come from the ``_info.json`` (``info``, i.e. ``data.info``, or beside local shards),
    found by URL or by file name. A local shard it does not list is counted by reading its tar
    headers (slow for many large shards); a remote one is an error.
    """
    urls = expand_spec(spec, split)
    if not urls:
        raise DataError(f"{what}={spec!r}: matches no shards")
    missing = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{what}={spec!r}: {len(missing)} of {len(urls)} shards not found: {missing[:5]}{more}")
    try:
        check_readable(urls, what)
    except ValueError as e:
        raise DataError(str(e)) from None
    given = read_info(spec, info) if info else None
    beside: dict[str, DatasetInfo | None] = {}
    counts: dict[str, int] = {}
    for url in urls:
        ds = given
        if ds is None and not is_remote(url):
            folder = os.path.dirname(local_path(url)) or "."
            if folder not in beside:
                beside[folder] = dataset_info(os.path.join(folder, INFO_NAME))
            ds = beside[folder]
        known = ds.splits.get(split) if ds is not None else None
        if known is not None and (url in known.urls or shard_name(url) in known.shards):
            counts[url] = known.urls.get(url, known.shards.get(shard_name(url)))
        elif not is_remote(url):
            counts[url] = _count_local(url)
        elif ds is None:
            raise DataError(f"{what}: {url}: {NEEDS_INFO}")
        else:
            raise DataError(
                f"{what}: {url} is not listed under split {split!r} in {ds.location}; "
                f"index it with: python -m distalex.data.index SPEC --split {split} --out FILE"
            )
    shards = [Shard(u, counts[u]) for u in urls]
    if sum(s.count for s in shards) == 0:
        raise DataError(f"{what}={spec!r}: the {len(shards)} shards hold no samples")
    return shards


def _count_local(path: str) -> int:
    try:
        return count_samples(path, ReadPolicy())
    except (OSError, tarfile.TarError) as e:  # without _info.json a broken shard has no known size
        raise DataError(
            f"{path}: not a readable tar ({e}); without {INFO_NAME} its samples cannot be counted"
        ) from None
