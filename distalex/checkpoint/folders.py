"""A checkpoint folder on disk: its names, when it counts as complete, how it is written durably,
replaced, pruned or moved aside, and how its files are read (with ``weights_only=True``: a folder
from elsewhere runs no code). The package docstring (``distalex.checkpoint``) describes the whole."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")
ASIDE_DIR = re.compile(r"^\.step-(\d{8})\.old$")
"""A complete checkpoint moved aside while the same step is re-saved; used only if step-N is missing."""
META = "meta.json"
SERVING = "serving.pt"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
"""Format 1 (before momentum was stored by name) still exports and evaluates, but does not resume."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


class UnreadableCheckpoint(CheckpointError):
    """A complete-looking checkpoint whose files do not load: resume falls back to the previous one."""


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


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not (folder / META).is_file():
        raise UnreadableCheckpoint(f"{folder}: incomplete checkpoint (no {META}; it was being written when the job stopped)")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnreadableCheckpoint(f"{folder / META}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise UnreadableCheckpoint(f"{folder / META}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


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


def save_durably(obj: dict, path: Path) -> None:
    """``torch.save`` and fsync: the bytes are on disk, not in the page cache, when this returns."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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
    """Rename a checkpoint that does not load out of resume's and pruning's way (kept for a look)."""
    step = (STEP_DIR.match(folder.name) or ASIDE_DIR.match(folder.name)).group(1)
    aside = folder.with_name(f".step-{step}.unreadable")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


def read_shard(folder: Path, tp_rank: int) -> dict:
    f = shard_file(folder, tp_rank)
    if not f.is_file():
        raise CheckpointError(f"{folder}: missing shard {f.name}")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt shard gets one clear message
        raise CheckpointError(f"{f}: unreadable shard ({type(e).__name__}: {e})") from None


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
