"""A checkpoint folder on disk: its names, when it counts as complete, how it is written durably
(each file's size and CRC-32 taken as its bytes go out), replaced, pruned or moved aside, and how
its files are read (checked against those records first, then ``torch.load(weights_only=True)``:
a folder from elsewhere runs no code). The package docstring (``distalex.checkpoint``) describes
the whole."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")
ASIDE_DIR = re.compile(r"^\.step-(\d{8})\.old$")
"""A complete checkpoint moved aside while the same step is re-saved; used only if step-N is missing."""
SET_ASIDE_DIR = re.compile(r"^\.step-(\d{8})\.unreadable$")
"""A checkpoint moved aside because a fault was found in it (kept for a look; never resumed or pruned)."""
META = "meta.json"
SERVING = "serving.pt"
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
"""Format 1 (before momentum was stored by name) still exports and evaluates, but does not resume.
Format 2 (before checksums) resumes and exports; its files are loaded unchecked (``load_file``)."""
RESUMABLE_FORMAT = 2
"""The first format that holds momentum by name."""
CHECKSUMMED_FORMAT = 3
"""The first format whose meta.json lists every file's size and CRC-32 ("files") and the job that
saved it ("launch")."""
META_KEYS = ("train_state", "layout", "world", "partition", "config")
CHECKSUMMED_META_KEYS = (*META_KEYS, "files", "launch")
FILE_LOOKS = 6
"""Looks (0.5 s apart) for a file before it counts as missing: a network file system may show a
name to another host a moment later."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


class UnreadableCheckpoint(CheckpointError):
    """A fault found in a checkpoint itself (a file missing, or not the size or checksum written; a
    meta.json that does not parse or lacks a key): resume moves it aside and tries the previous one."""


class CheckpointReadError(RuntimeError):
    """Reading a checkpoint failed for a reason outside its files (an I/O error such as EIO from a
    storage server briefly gone, out of memory): every checkpoint stays where it is and the job
    ends; a restart may read it (exit status 5, ``distalex.jobs``)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def shard_file(folder: Path, tp_rank: int) -> Path:
    """The weights and momentum of one tensor-parallel shard in a checkpoint folder."""
    return folder / f"model-tp{tp_rank:02d}.pt"


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank{rank:05d}.pt"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first (a folder is complete once it has meta.json).

    A ``.step-N.old`` folder (moved aside during a re-save of step N) stands in for ``step-N``
    when the job stopped before ``step-N`` was back in place.
    """
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = STEP_DIR.match(p.name) or ASIDE_DIR.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            step = int(m.group(1))
            if step not in found or STEP_DIR.match(p.name):
                found[step] = p
    return [found[s] for s in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def set_aside(root: Path) -> list[Path]:
    """Checkpoints moved aside for a fault found in them, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if SET_ASIDE_DIR.match(p.name) and p.is_dir())


def read_meta(folder: str | Path) -> dict:
    """A checkpoint's meta.json. UnreadableCheckpoint when it is missing, does not parse or lacks a
    key (a fault in the checkpoint); CheckpointReadError when reading it fails (OSError)."""
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such checkpoint folder")
        if not (folder / META).is_file():
            raise UnreadableCheckpoint(f"{folder}: incomplete checkpoint (no {META}; it was being written when the job stopped)")
        text = (folder / META).read_text()
    except OSError as e:
        raise CheckpointReadError(f"{folder / META}: cannot be read ({why_not_read(e)})") from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableCheckpoint(f"{folder / META}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise UnreadableCheckpoint(f"{folder / META}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    keys = CHECKSUMMED_META_KEYS if meta["format"] >= CHECKSUMMED_FORMAT else META_KEYS
    missing = [k for k in keys if not isinstance(meta.get(k), dict)]
    if missing:
        raise UnreadableCheckpoint(f"{folder / META}: incomplete (no {', '.join(missing)})")
    return meta


def why_not_read(e: BaseException) -> str:
    """'OSError: [Errno 5] Input/output error', without the path the caller names already."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__}: [Errno {e.errno}] {e.strerror}"
    return f"{type(e).__name__}: {e}".splitlines()[0]


def file_records(meta: dict) -> dict[str, dict] | None:
    """File name -> {"bytes", "crc32"} as written, from meta.json; None for a checkpoint from
    before checksums."""
    return meta["files"] if meta["format"] >= CHECKSUMMED_FORMAT else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step-N`` folder as is; a checkpoint directory -> its latest complete checkpoint."""
    path = Path(path)
    if (path / META).is_file() or STEP_DIR.match(path.name):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint (step-*/{META}) here")
    return latest


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Checksummed:
    """A binary file's writes, counted and checksummed on their way out: the record that proves the
    file whole, without reading it again. CRC-32 (zlib) runs at ~4 GB/s on one core here, 0.25 s
    per GB written (SHA-256 0.6 s, BLAKE2b 1.1 s); it always finds a damaged run of up to 32 bits,
    lets other damage pass by chance 1 time in 2^32, and guards against accidents, not an attacker."""

    def __init__(self, f):
        self.f, self.size, self.crc = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def record(self) -> dict:
        return {"bytes": self.size, "crc32": self.crc}


def save_durably(obj: dict, path: Path) -> dict:
    """``torch.save`` and fsync: the bytes are on disk, not in the page cache, when this returns.
    Returns the file's record for meta.json: {"bytes": size, "crc32": CRC-32 of the bytes written}."""
    with open(path, "wb") as f:
        out = _Checksummed(f)
        torch.save(obj, out)
        f.flush()
        os.fsync(f.fileno())
    return out.record()


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (files written or renamed into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no crash leaves it looking complete: meta.json goes first."""
    (folder / META).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def tidy(root: Path) -> None:
    """What a stopped save or prune left behind: temporary folders, half-deleted checkpoints, and a
    checkpoint moved aside for a re-save (put back when the re-save never completed)."""
    for p in root.iterdir():
        if not p.is_dir():
            continue
        aside = ASIDE_DIR.match(p.name)
        if p.name.startswith(".step-") and p.name.endswith(".tmp"):
            discard(p)
        elif aside and (p / META).is_file() and not (step_dir(root, int(aside.group(1))) / META).is_file():
            final = step_dir(root, int(aside.group(1)))
            discard(final)  # a half-written or half-deleted step-N without meta.json
            p.rename(final)
        elif aside or (STEP_DIR.match(p.name) and not (p / META).is_file()):
            discard(p)


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` folder to ``final``; an existing ``final`` stays complete (moved
    aside, still found by resume) until the new one is in place."""
    if not final.exists():
        tmp.rename(final)
        fsync_dir(final.parent)
        return
    aside = final.with_name(f".{final.name}.old")
    discard(aside)
    final.rename(aside)
    tmp.rename(final)
    fsync_dir(final.parent)
    discard(aside)


def move_aside_unreadable(folder: Path) -> Path:
    """Rename a checkpoint with a fault in it out of resume's and pruning's way (kept for a look)."""
    step = (STEP_DIR.match(folder.name) or ASIDE_DIR.match(folder.name)).group(1)
    aside = folder.with_name(f".step-{step}.unreadable")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


def appears(path: Path) -> bool:
    """Whether ``path`` is a file, looking FILE_LOOKS times before saying no."""
    for look in range(FILE_LOOKS):
        if path.is_file():
            return True
        if look < FILE_LOOKS - 1:
            time.sleep(0.5)
    return False


def load_file(folder: Path, name: str, files: dict[str, dict] | None):
    """``torch.load(weights_only=True)`` of ``folder/name``, its bytes read once and checked against
    their record in meta.json (``files``, from ``file_records``; None: a checkpoint from before
    checksums, loaded unchecked): what is loaded is exactly what was checked, at the cost of the
    file's bytes in memory beside its tensors while it loads (~250 MB for a shard of the paper's
    net). Raises
      UnreadableCheckpoint  the file is missing, or not the size or CRC-32 written, or meta.json
                            lists no such file: a fault in the checkpoint;
      CheckpointReadError   reading failed (OSError such as EIO, MemoryError): no fault is proven;
      CheckpointError       the bytes are the ones written (or unchecked) but do not load (another
                            torch version, a type that weights_only refuses): a restart fails the
                            same way, so the checkpoint is not moved aside either."""
    path = folder / name
    checked = files is not None
    if checked and name not in files:
        raise UnreadableCheckpoint(f"{folder / META}: incomplete (lists no {name})")
    try:
        if not appears(path):
            if checked:
                raise UnreadableCheckpoint(f"{folder}: {name} is missing ({META} lists it)")
            raise CheckpointError(f"{folder}: {name} is missing")
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, MemoryError) as e:
        raise CheckpointReadError(f"{path}: cannot be read ({why_not_read(e)})") from None
    if checked:
        written = files[name]
        if not (isinstance(written, dict) and isinstance(written.get("bytes"), int) and isinstance(written.get("crc32"), int)):
            raise UnreadableCheckpoint(f"{folder / META}: incomplete (no size and CRC-32 for {name})")
        if len(data) != written["bytes"]:
            raise UnreadableCheckpoint(f"{path}: {len(data)} bytes where {written['bytes']} were written (truncated or overwritten)")
        crc = zlib.crc32(data)
        if crc != written["crc32"]:
            raise UnreadableCheckpoint(f"{path}: corrupt (CRC-32 {crc:08x} where {written['crc32']:08x} was written)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except MemoryError as e:
        raise CheckpointReadError(f"{path}: cannot be loaded (MemoryError: {e})") from None
    except Exception as e:  # noqa: BLE001 - whatever torch raises, one line naming the file
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        if checked:
            raise CheckpointError(f"{path}: does not load although its size and CRC-32 are the ones written ({why})") from None
        raise CheckpointError(f"{path}: does not load ({why}); written before checksums, so nothing shows whether the "
                              "file is damaged: it stays where it is") from None


def read_shard(folder: Path, tp_rank: int, files: dict[str, dict] | None) -> dict:
    """One tensor-parallel shard ({"model", "momentum"}) of a checkpoint, checked as ``load_file`` says."""
    return load_file(folder, shard_file(folder, tp_rank).name, files)


def join_shards(folder: Path, partition: dict[str, int | None], shards: list[dict]) -> dict[str, torch.Tensor | None]:
    """One serial (tp=1) tensor per name from the tp shards' tensors, joined along the partition map
    (a replicated tensor is tp rank 0's; None stays None: no momentum before the first step)."""
    out = {}
    for name, dim in partition.items():
        if any(name not in s for s in shards):
            raise CheckpointError(f"{folder}: {META} lists {name} but a shard lacks it")
        parts = [s[name] for s in shards]
        out[name] = parts[0] if dim is None or parts[0] is None else torch.cat(parts, dim=dim)
    return out
