"""Sharded checkpoints that a crash never leaves looking complete, resumable at any dp x tp.

A checkpoint is a folder ``<checkpoint.dir>/step-00001234/``:

    model-tp00.pt, model-tp01.pt   each tensor-parallel shard: {"model": weights, "momentum": SGD
                                   momentum buffers}, by parameter name, written by dp rank 0 (with
                                   ZeRO the dp partitions of the momentum are gathered first)
    rng-rank00000.pt ...           every rank's random streams (torch, CUDA, dropout, lighting)
    serving.pt                     what a user of the weights needs besides them: the class names and
                                   the preprocessing (training mean and std, crop sizes; written by rank 0)
    meta.json                      train state (step, epoch, data position, LR schedule, MLflow run
                                   id and store), the resolved config (absolute paths), layout,
                                   parameter partitioning and the settings that give the data
                                   position its meaning

Every file is plain tensors in dicts, read back with ``torch.load(weights_only=True)``: loading a
checkpoint folder from elsewhere runs no code.

Writing: every rank writes into ``.step-00001234.tmp`` and flushes its files to disk (fsync); after
a barrier rank 0 writes meta.json, renames the folder and flushes the directories, so a checkpoint
that counts as complete survives a power cut too. A folder counts as a checkpoint only once it has
meta.json, and a checkpoint
that is replaced or pruned loses its meta.json first, so a crash at any point leaves either the old
or the new checkpoint complete, never a half-deleted one that looks complete:

- re-saving a step that exists (after a resume from a checkpoint saved before the epoch's
  validation) renames the old folder aside to ``.step-N.old`` (still found by ``resume: auto``),
  renames the new one into place, then deletes the old one;
- pruning to ``checkpoint.keep`` starts only after the new checkpoint is in place.

Resuming: rank 0 chooses the checkpoint (on a network file system two hosts can list different
folders for a moment after a fast requeue) and every rank loads that one. A checkpoint that does not
load (an unreadable or truncated file on any rank) is named, moved aside to ``.step-N.unreadable``
(out of the way of resume and pruning, kept for a look) and the previous complete one is used; one
that loads but does not fit this run (another model, batch size or seed) is an error.

Resuming at another layout: the shards are joined into the serial (tp=1) layout along the
partition map in meta.json and split again for the new tp (``parallel.plan.local_state_dict``),
momentum the same way; ZeRO re-partitions the momentum over the new dp when it is loaded.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distalex.checkpoint.folders import (
    ASIDE_DIR, FORMAT_VERSION, META, SERVING, STEP_DIR, CheckpointError, UnreadableCheckpoint,
    complete_checkpoints, discard, fsync_dir, join_shards, latest_checkpoint, move_aside_unreadable, publish,
    read_meta, read_shard, resolve_checkpoint, rng_file, save_durably, shard_file, step_dir, tidy, write_json_atomic,
)
from distalex.config import Config
from distalex.parallel.dims import ParallelDims
from distalex.parallel.liveness import where_am_i
from distalex.parallel.plan import local_state_dict

if TYPE_CHECKING:
    from distalex.engine.base import Engine

__all__ = [
    "ASIDE_DIR", "META", "SERVING", "STEP_DIR", "CheckpointError", "CheckpointManager", "RandomStreams", "Resumed",
    "TrainState", "UnreadableCheckpoint", "complete_checkpoints", "data_position_settings", "latest_checkpoint",
    "layout_of", "load_serial_state", "partition_map", "read_meta", "resolve_checkpoint", "rng_file",
    "rng_source_rank", "shard_file", "step_dir",
]


SHARED_CHECK_TRIES = 6
"""Looks (0.5 s apart) for rank 0's file in checkpoint.dir before a rank says it does not see it."""
REFUSED_CHANGES = ("train.batch_size", "train.seed")
"""Settings a resumed run may not change: every later batch and random stream depends on them."""


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
    mlflow_tracking_uri: str | None = None  # the store that holds mlflow_run_id
    epoch_loss_sum: float = 0.0  # loss x steps of this epoch so far (the epoch's mean survives a restart)
    epoch_loss_steps: int = 0
    validated_step: int = -1  # the step at which validation last ran (a stop during it runs it again)

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


@dataclass
class Resumed:
    """What ``CheckpointManager.load`` found beyond the train state."""

    layout_changes: list[str] = field(default_factory=list)
    """e.g. ["dp 2 -> 1", "tp 2 -> 1"]: weights and momentum were re-split for this layout."""
    position_changes: list[str] = field(default_factory=list)
    """Settings that decide which samples a step of an epoch reads and that differ from the
    checkpoint's (e.g. "dp 2 -> 1", "data.workers 4 -> 8"): the saved step_in_epoch means nothing
    under them, so the epoch it points into cannot be continued sample for sample."""
    saved_steps_per_epoch: int = 0
    """The epoch length the saved position counts in."""


def partition_map(module: nn.Module) -> dict[str, int | None]:
    """Parameter name -> the dim it is split along over tp ranks (None: replicated)."""
    return {
        name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        for name, p in module.named_parameters()
    }


def layout_of(cfg: Config, dims: ParallelDims) -> dict:
    """The model a checkpoint's shards belong to. tp is recorded, but any tp dividing the towers can
    load it; ``layout`` says which parameters the shards split (towers: the conv kernels too;
    hybrid: only fc6-fc8's)."""
    return {"tp": dims.tp, "layout": cfg.parallel.layout, "towers": cfg.model.towers,
            "model": cfg.model.model_dump(exclude={"dropout"})}


def data_position_settings(cfg: Config, dims: ParallelDims, samples_in_shards: int, steps_per_epoch: int) -> dict:
    """What decides which samples step k of an epoch reads, besides batch size and seed (refused
    when changed): the dp split, the loader's per-worker streams, the epoch length and the shards.
    Worker counts 0 and 1 read the same single stream."""
    return {
        "dp": dims.dp,
        "data.workers": max(1, cfg.data.workers),
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "data.train_samples": cfg.data.train_samples,
        "samples in data.train_shards": samples_in_shards,
        "steps per epoch": steps_per_epoch,
    }


def _appears(path: Path) -> bool:
    for _ in range(SHARED_CHECK_TRIES):
        if path.is_file():
            return True
        time.sleep(0.5)
    return False


class CheckpointManager:
    """Saves and finds this run's checkpoints; every rank calls ``save`` and ``load``."""

    def __init__(self, cfg: Config, dims: ParallelDims, classes: list[str] | None = None,
                 data_position: dict | None = None, serving: dict | None = None):
        self.cfg, self.dims, self.classes = cfg, dims, list(classes or [])
        self.data_position = data_position or data_position_settings(cfg, dims, 0, 0)
        self.serving = serving  # {"class_names": [...], "preprocessing": Preprocessing.to_dict()}
        self.root = cfg.checkpoint_dir

    def check_shared_dir(self) -> None:
        """Stop before the first step unless every rank sees one ``checkpoint.dir``: rank 0 writes a
        file there and every rank looks for it (a few tries: a network file system may show a new
        name to another host a moment later). Without one shared directory the ranks of other hosts
        write their shards where no resume will find them."""
        dims = self.dims
        if not dims.distributed:
            return
        name = f".shared-check-{dims.broadcast_object(uuid.uuid4().hex if dims.is_main else None)}"
        error = None
        if dims.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.root / name, {"written_by": where_am_i()})
            except OSError as e:
                error = f"checkpoint.dir: cannot write to {self.root}: {e}"
        error = dims.first_of(error)
        if error is None:
            missing = None if _appears(self.root / name) else f"rank {dims.rank} ({where_am_i()})"
            error = dims.first_of(missing)
            if error is not None:  # in rank 0's words: its directory, its host
                host0, root0 = dims.broadcast_object((where_am_i(), str(self.root)) if dims.is_main else None)
                error = (f"checkpoint.dir: {root0} is not one directory shared by all hosts: {error} does not "
                         f"see the file rank 0 ({host0}) wrote there; point checkpoint.dir at a file system every "
                         "host mounts at the same path")
        if dims.is_main:
            (self.root / name).unlink(missing_ok=True)
        if error is not None:
            raise CheckpointError(error)

    def resume_candidates(self) -> list[Path]:
        """Where ``checkpoint.resume`` says to resume from, as rank 0 sees it (the same list on every
        rank): auto = every complete checkpoint, newest first (the next is the fallback when one does
        not load); none = []; an explicit path = [that one] (no fallback: it was asked for)."""
        resume = self.cfg.checkpoint.resume
        found = []
        if resume == "auto":
            found = [str(p) for p in reversed(complete_checkpoints(self.root))] if self.dims.is_main else []
        elif resume != "none":
            found = [str(resolve_checkpoint(resume))] if self.dims.is_main else []
        return [Path(p) for p in self.dims.broadcast_object(found)]

    def resume(self, engine: Engine, state: TrainState, streams: RandomStreams) -> tuple[Path, Resumed] | None:
        """Load the newest candidate that loads, on every rank; None when there is none to resume.
        A candidate that does not load is named, moved aside (rank 0) and the previous one is tried."""
        candidates = self.resume_candidates()
        failures = []
        for folder in candidates:
            try:
                return folder, self.load(folder, engine, state, streams)
            except UnreadableCheckpoint as e:
                if self.cfg.checkpoint.resume != "auto":
                    raise
                failures.append(f"{folder.name} ({e})")
                if self.dims.is_main:
                    aside = move_aside_unreadable(folder)
                    fallback = "the previous complete one" if folder != candidates[-1] else "no other checkpoint"
                    print(f"warning: checkpoint {folder} does not load ({e}): moved aside to {aside.name}; trying "
                          f"{fallback}", file=sys.stderr, flush=True)
                self.dims.barrier()
        if failures:
            raise CheckpointError(f"{self.root}: no complete checkpoint loads: " + "; ".join(failures))
        return None

    def save(self, engine: Engine, state: TrainState, streams: RandomStreams) -> Path:
        """Every rank: its shard (dp rank 0 of each tp group) and random streams; rank 0: meta.json,
        then the folder is put in place and old checkpoints are pruned."""
        dims = self.dims
        final = step_dir(self.root, state.step)
        tmp = self.root / f".{final.name}.tmp"
        try:
            if dims.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                tidy(self.root)
                tmp.mkdir()
            dims.barrier()
            model, momentum = engine.shard_state()  # a collective over dp with ZeRO: every rank calls
            if dims.dp_rank == 0:
                save_durably({"model": model, "momentum": momentum}, shard_file(tmp, dims.tp_rank))
            save_durably(streams.state_dict(), rng_file(tmp, dims.rank))
            if dims.is_main and self.serving is not None:
                save_durably(self.serving, tmp / SERVING)
        except OSError as e:  # a full disk, a lost mount: one line, and every rank ends (distalex.jobs)
            raise CheckpointError(f"cannot write checkpoint {tmp} (checkpoint.dir): {e}") from None
        dims.barrier()  # every shard is on disk before the checkpoint is declared complete
        if dims.is_main:
            fsync_dir(tmp)
            meta = {
                "format": FORMAT_VERSION,
                "train_state": state.state_dict(),
                "layout": layout_of(self.cfg, dims),
                "world": {"dp": dims.dp, "tp": dims.tp, "engine": self.cfg.train.engine},
                "data_position": self.data_position,
                "partition": partition_map(engine.module),
                "config": self.cfg.model_dump(),
                "classes": self.classes,
            }
            write_json_atomic(tmp / META, meta)
            publish(tmp, final)
            for old in complete_checkpoints(self.root)[: -self.cfg.checkpoint.keep]:
                discard(old)
        dims.barrier()
        return final

    def load(self, folder: Path, engine: Engine, state: TrainState, streams: RandomStreams) -> Resumed:
        """Weights, momentum, train state and random streams of ``folder``, re-split for this job's
        layout if it differs; refuses a different model or a changed batch size or seed."""
        dims = self.dims
        try:
            meta = read_meta(folder)
            self.check_fits(folder, meta)
            if meta["format"] != FORMAT_VERSION:
                raise CheckpointError(
                    f"{folder}: checkpoint format {meta['format']} holds no momentum by name and cannot be resumed "
                    "(python -m distalex.export still reads its weights)"
                )
            resumed = self._load_files(folder, meta, engine, streams)
            error = None
        except CheckpointError as e:
            error = (isinstance(e, UnreadableCheckpoint), str(e))
        # Every rank learns of a failure on any (the lowest rank's words), so all take the same path:
        # the fallback to the previous checkpoint, or exit status 2. It also means every rank has
        # read the folder before rank 0 may tidy, replace or move it aside.
        first = dims.first_of(error)
        if first is not None:
            unreadable, message = first
            raise (UnreadableCheckpoint if unreadable else CheckpointError)(message)
        state.load_state_dict(meta["train_state"])
        return resumed

    def _load_files(self, folder: Path, meta: dict, engine: Engine, streams: RandomStreams) -> Resumed:
        """This rank's shard and random streams of ``folder``; UnreadableCheckpoint if they do not load."""
        dims = self.dims
        saved_dp, saved_tp = meta["world"]["dp"], meta["world"]["tp"]
        resumed = Resumed([f"{k} {a} -> {b}" for k, a, b in (("dp", saved_dp, dims.dp), ("tp", saved_tp, dims.tp)) if a != b])
        saved_position = meta.get("data_position", {})
        resumed.saved_steps_per_epoch = saved_position.get("steps per epoch", 0)
        resumed.position_changes = [
            f"{key} {saved_position[key]} -> {now}" for key, now in self.data_position.items()
            if key in saved_position and saved_position[key] != now
        ]
        try:
            model, momentum = read_local_shard(folder, meta["partition"], saved_tp, engine.module, dims)
            engine.load_shard_state(model, momentum)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or mismatched shard files alike
            raise UnreadableCheckpoint(f"{folder}: cannot load rank {dims.rank}'s shard ({type(e).__name__}: {e})") from None
        source = rng_source_rank(dims, saved_dp, saved_tp)
        if source is not None:  # None: a new dp rank keeps its fresh streams
            try:
                streams.load_state_dict(torch.load(rng_file(folder, source), weights_only=True))
            except Exception as e:  # noqa: BLE001 - anything but plain tensors is refused here too
                raise UnreadableCheckpoint(f"{rng_file(folder, source)}: unreadable ({type(e).__name__}: {e})") from None
        return resumed

    def check_fits(self, folder: Path, meta: dict) -> None:
        """Refuse a checkpoint whose shards cannot fit this model, or whose run this one cannot
        continue; the message names every difference by key."""
        saved, now = meta["layout"], layout_of(self.cfg, self.dims)
        diffs = []
        if saved["towers"] != now["towers"]:
            diffs.append(f"model.towers: checkpoint {saved['towers']}, now {now['towers']}")
        # Shards split the same serial state differently per layout (one rank holds everything at tp=1).
        layout = saved.get("layout", "towers")  # checkpoints from before layouts were recorded: towers
        if layout != now["layout"] and max(saved["tp"], now["tp"]) > 1:
            diffs.append(f"parallel.layout: checkpoint {layout}, now {now['layout']}")
        for key, value in saved["model"].items():
            if now["model"].get(key) != value:
                diffs.append(f"model.{key}: checkpoint {value}, now {now['model'].get(key)}")
        if diffs:
            raise CheckpointError(f"{folder}: does not fit this run's model: " + "; ".join(diffs))
        saved_cfg, now_cfg = meta["config"], self.cfg.model_dump()
        changed = []
        for key in REFUSED_CHANGES:
            section, name = key.split(".")
            if saved_cfg[section][name] != now_cfg[section][name]:
                changed.append(f"{key}: checkpoint {saved_cfg[section][name]}, now {now_cfg[section][name]}")
        if changed:
            raise CheckpointError(
                f"{folder}: a resumed run cannot change " + "; ".join(changed)
                + " (set them back, or start a new run with checkpoint.resume=none or another run_name)"
            )


def rng_source_rank(dims: ParallelDims, saved_dp: int, saved_tp: int) -> int | None:
    """The saved rank whose random streams this rank continues: the same dp rank (its streams are
    per dp group: tp peers hold equal dropout and lighting streams), or None for a new dp rank."""
    if dims.dp_rank >= saved_dp:
        return None
    return dims.dp_rank * saved_tp + dims.tp_rank % saved_tp


def read_local_shard(folder: Path, partition: dict[str, int | None], saved_tp: int, module: nn.Module,
                     dims: ParallelDims) -> tuple[dict, dict]:
    """(weights, momentum) of this rank's shard of ``module``: its own file when tp and the split are unchanged,
    else every shard joined into the serial layout and split again for this rank."""
    if saved_tp == dims.tp and partition == partition_map(module):
        blob = read_shard(folder, dims.tp_rank)
        return blob["model"], blob["momentum"]
    blobs = [read_shard(folder, r) for r in range(saved_tp)]
    model = join_shards(folder, partition, [b["model"] for b in blobs])
    momentum = join_shards(folder, partition, [b["momentum"] for b in blobs])
    present = {k: v for k, v in momentum.items() if v is not None}
    local_momentum = dict.fromkeys(momentum) | local_state_dict(present, module, dims.tp_group)
    return local_state_dict(model, module, dims.tp_group), local_momentum


def load_serial_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, list[str]]:
    """The serial (tp=1) state dict of a checkpoint, its config and class list; no process group needed."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    cfg = Config.model_validate(meta["config"])
    shards = [read_shard(folder, r)["model"] for r in range(meta["layout"]["tp"])]
    return join_shards(folder, meta["partition"], shards), cfg, meta.get("classes", [])
