"""Sharded checkpoints that a crash never leaves looking complete.

A checkpoint is a folder ``<checkpoint.dir>/step-00001234/``:

    model-tp00.pt, model-tp01.pt   each tensor-parallel shard (model, optimizer), from dp rank 0
                                   (dp replicas are equal); the deepspeed engine adds its own files
    rng-rank00000.pt ...           every rank's random streams (torch, CUDA, dropout, lighting)
    meta.json                      train state (step, epoch, data position, LR schedule, MLflow run
                                   id), the resolved config, layout and parameter partitioning

Every rank writes into ``.step-00001234.tmp``; after a barrier rank 0 writes meta.json and renames
the folder. A ``step-*`` folder therefore always has meta.json and every shard; a crash mid-write
leaves only a ``.tmp`` folder, which is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distalex.config import Config
from distalex.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from distalex.engine.base import Engine

STEP_DIR = re.compile(r"^step-(\d{8})$")
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # data position: batches of this epoch already consumed
    lr: float = 0.0
    best_top1_error: float = float("inf")
    epochs_since_best: int = 0
    mlflow_run_id: str | None = None
    epoch_loss_sum: float = 0.0  # loss x steps logged so far this epoch (the epoch's mean survives a restart)
    epoch_loss_steps: int = 0

    def state_dict(self) -> dict:
        d = asdict(self)
        d["best_top1_error"] = None if d["best_top1_error"] == float("inf") else d["best_top1_error"]
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        if self.best_top1_error is None:
            self.best_top1_error = float("inf")


@dataclass
class RandomStreams:
    """This rank's random generators: torch's global ones plus the run's own (dropout, lighting)."""

    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "own": {k: g.get_state() for k, g in self.generators.items()}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        for k, g in self.generators.items():
            g.set_state(state["own"][k])


def shard_file(folder: Path, tp_rank: int) -> Path:
    """The model (and, with DDP, optimizer) file of one tensor-parallel shard in a checkpoint folder."""
    return folder / f"model-tp{tp_rank:02d}.pt"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first (a folder is complete once it has meta.json)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not (folder / META).is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {META}; it was being written when the job stopped)")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / META}: unreadable ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / META}: unknown checkpoint format {meta.get('format')!r}")
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


def partition_map(module: nn.Module) -> dict[str, int | None]:
    """Parameter name -> the dim it is split along over tp ranks (None: replicated)."""
    return {
        name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        for name, p in module.named_parameters()
    }


def layout_of(cfg: Config, dims: ParallelDims) -> dict:
    """What must match for a checkpoint's shards to fit this job's model. ``layout`` says which
    parameters the shards split (towers: the conv kernels too; hybrid: only fc6-fc8's)."""
    return {"tp": dims.tp, "layout": cfg.parallel.layout, "towers": cfg.model.towers,
            "model": cfg.model.model_dump(exclude={"dropout"})}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class CheckpointManager:
    """Saves and finds this run's checkpoints; every rank calls ``save`` and ``load``."""

    def __init__(self, cfg: Config, dims: ParallelDims, classes: list[str] | None = None):
        self.cfg, self.dims, self.classes = cfg, dims, list(classes or [])
        self.root = cfg.checkpoint_dir

    def resume_path(self) -> Path | None:
        """``checkpoint.resume``: auto (latest complete, if any), none, or an explicit path."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return latest_checkpoint(self.root)
        return resolve_checkpoint(resume)

    def save(self, engine: Engine, state: TrainState, streams: RandomStreams) -> Path:
        dims = self.dims
        final = step_dir(self.root, state.step)
        tmp = self.root / f".{final.name}.tmp"
        if dims.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # e.g. saved at this step before a restart
                shutil.rmtree(final)
            tmp.mkdir()
        dims.barrier()
        engine.save(tmp, dims)
        torch.save(streams.state_dict(), tmp / f"rng-rank{dims.rank:05d}.pt")
        dims.barrier()  # every shard is on disk before the checkpoint is declared complete
        if dims.is_main:
            meta = {
                "format": FORMAT_VERSION,
                "train_state": state.state_dict(),
                "layout": layout_of(self.cfg, dims),
                "world": {"dp": dims.dp, "tp": dims.tp, "engine": self.cfg.train.engine},
                "partition": partition_map(engine.module),
                "config": self.cfg.model_dump(),
                "classes": self.classes,
            }
            _write_json_atomic(tmp / META, meta)
            tmp.rename(final)
            for old in complete_checkpoints(self.root)[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dims.barrier()
        return final

    def load(self, folder: Path, engine: Engine, state: TrainState, streams: RandomStreams) -> None:
        meta = read_meta(folder)
        self.check_layout(folder, meta)
        if self.cfg.train.engine != meta["world"]["engine"]:
            raise CheckpointError(
                f"{folder}: written by engine {meta['world']['engine']!r}, this run uses {self.cfg.train.engine!r}"
            )
        if self.cfg.train.engine == "deepspeed" and meta["world"]["dp"] != self.dims.dp:
            raise CheckpointError(
                f"{folder}: ZeRO optimizer state was partitioned over dp={meta['world']['dp']}; this job has dp={self.dims.dp}"
            )
        try:
            engine.load(folder, self.dims)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or mismatched shard files alike
            raise CheckpointError(f"{folder}: cannot load this rank's shard ({type(e).__name__}: {e})") from None
        state.load_state_dict(meta["train_state"])
        rng = folder / f"rng-rank{self.dims.rank:05d}.pt"
        if rng.is_file():  # absent when the world grew: keep this rank's fresh streams
            streams.load_state_dict(torch.load(rng, weights_only=False))

    def check_layout(self, folder: Path, meta: dict) -> None:
        """Refuse a checkpoint whose shards cannot fit: names each difference."""
        saved, now = meta["layout"], layout_of(self.cfg, self.dims)
        diffs = []
        for key in ("tp", "towers"):
            if saved[key] != now[key]:
                diffs.append(f"{'parallel.tp' if key == 'tp' else 'model.towers'}: checkpoint {saved[key]}, now {now[key]}")
        # Shards split the same serial state differently per layout (one rank holds everything at tp=1).
        layout = saved.get("layout", "towers")  # checkpoints from before layouts were recorded: towers
        if layout != now["layout"] and max(saved["tp"], now["tp"]) > 1:
            diffs.append(f"parallel.layout: checkpoint {layout}, now {now['layout']}")
        for key, value in saved["model"].items():
            if now["model"].get(key) != value:
                diffs.append(f"model.{key}: checkpoint {value}, now {now['model'].get(key)}")
        if diffs:
            raise CheckpointError(f"{folder}: does not fit this run's model: " + "; ".join(diffs))


def load_serial_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, list[str]]:
    """The serial (tp=1) state dict of a checkpoint, its config and class list; no process group needed."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    cfg = Config.model_validate(meta["config"])
    shards = []
    for tp_rank in range(meta["layout"]["tp"]):
        f = shard_file(folder, tp_rank)
        if not f.is_file():
            raise CheckpointError(f"{folder}: missing shard {f.name}")
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True)["model"])
        except Exception as e:  # noqa: BLE001 - a corrupt shard gets one clear message
            raise CheckpointError(f"{f}: unreadable shard ({type(e).__name__}: {e})") from None
    state = {}
    for name, dim in meta["partition"].items():
        if any(name not in s for s in shards):
            raise CheckpointError(f"{folder}: {META} lists {name} but a shard lacks it")
        parts = [s[name] for s in shards]
        state[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return state, cfg, meta.get("classes", [])
