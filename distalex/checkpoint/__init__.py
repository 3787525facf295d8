"""Sharded checkpoints that a crash never leaves looking complete, resumable at any dp x tp,
set aside only for a fault proven in them, and owned by the run that saved them.

A checkpoint is a folder ``<checkpoint.dir>/step-00001234/``:

    model-tp00.pt, model-tp01.pt   each tensor-parallel shard: {"model": weights, "momentum": SGD
                                   momentum buffers}, by parameter name, written by dp rank 0 (with
                                   ZeRO the dp partitions of the momentum are gathered first)
    rng-rank00000.pt ...           every rank's random streams (torch, CUDA, dropout, lighting)
    serving.pt                     what a user of the weights needs besides them: the class names and
                                   the preprocessing (training mean and std, crop sizes; written by rank 0)
    meta.json                      train state (step, epoch, data position, LR schedule, MLflow run
                                   id and store, the run's id), the resolved config (absolute paths),
                                   layout, parameter partitioning, the settings that give the data
                                   position its meaning, every file's size and CRC-32 ("files") and
                                   the job that saved it ("launch", ``owners``)

Every file is plain tensors in dicts, read back with ``torch.load(weights_only=True)``: loading a
checkpoint folder from elsewhere runs no code.

Writing: every rank writes into ``.step-00001234.tmp``, taking each file's size and CRC-32 as its
bytes go out (no second read), and flushes its files to disk (fsync); the records are gathered to
rank 0, which writes meta.json, renames the folder and flushes the directories, so a checkpoint
that counts as complete survives a power cut too. A folder counts as a checkpoint only once it has
meta.json, and a checkpoint that is replaced or pruned loses its meta.json first, so a crash at any
point leaves either the old or the new checkpoint complete, never a half-deleted one that looks
complete:

- re-saving a step that exists (after a resume from a checkpoint saved before the epoch's
  validation) renames the old folder aside to ``.step-N.old`` (still found by ``resume: auto``),
  renames the new one into place, then deletes the old one; never another run's;
- pruning to ``checkpoint.keep`` starts only after the new checkpoint is in place, and counts and
  deletes only this run's checkpoints.

Resuming: rank 0 chooses the checkpoint (on a network file system two hosts can list different
folders for a moment after a fast requeue) and every rank loads that one; every rank learns of a
failure on any, so all take the same path. Each file a rank reads is checked against its size and
CRC-32 before ``torch.load``. Only a fault proven in the checkpoint moves it aside to
``.step-N.unreadable`` (out of the way of resume and pruning, kept for a look) and the previous
complete one is tried (``resume: auto``): a listed file missing, or not the size or checksum
written, or a meta.json that does not parse or lacks a key. Any other error leaves every
checkpoint where it is and ends the job in one line: an I/O error (EIO from a storage server
briefly gone) or no memory (``CheckpointReadError``, exit status 5: a restart may read it); whole
files that do not load (another torch version, a type ``weights_only`` refuses) or a checkpoint
that does not fit this run (another model, batch size or seed) (exit status 2).

A checkpoint from before checksums (format 2) resumes and exports as before, its files loaded
unchecked; nothing can prove a fault in them, so it is never moved aside for one.

Runs own their checkpoints (``plan_resume`` has the rules): a run gets an id when it starts at
step 0 and keeps it through every resume. ``resume: auto`` continues the run in checkpoint.dir;
a new run (``resume: none``) in a checkpoint.dir holding another run's checkpoints is refused
before its first step, naming them and the ways out, because two runs in one folder would prune
each other's checkpoints by step number and a later ``auto`` could continue the wrong one. A
restart of the same job (torchrun ``--max-restarts``, a Slurm requeue: ``owners.same_job``)
resumes the checkpoints that job saved, whatever ``resume`` says. A start that finds checkpoints
moved aside says so in one line.

Resuming at another layout: the shards are joined into the serial (tp=1) layout along the
partition map in meta.json and split again for the new tp (``parallel.plan.local_state_dict``),
momentum the same way; ZeRO re-partitions the momentum over the new dp when it is loaded.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distalex.checkpoint.folders import (
    ASIDE_DIR, FORMAT_VERSION, META, RESUMABLE_FORMAT, SERVING, STEP_DIR, CheckpointError, CheckpointReadError,
    UnreadableCheckpoint, appears, complete_checkpoints, discard, file_records, fsync_dir, join_shards,
    latest_checkpoint, load_file, move_aside_unreadable, publish, read_meta, read_shard, resolve_checkpoint, rng_file,
    save_durably, set_aside, shard_file, step_dir, tidy, why_not_read, write_json_atomic,
)
from distalex.checkpoint.owners import ResumePlan, launch_of, plan_resume, run_of, torchrun_agent
from distalex.config import Config
from distalex.parallel.dims import ParallelDims
from distalex.parallel.liveness import where_am_i
from distalex.parallel.plan import local_state_dict

if TYPE_CHECKING:
    from distalex.engine.base import Engine

__all__ = [
    "ASIDE_DIR", "META", "SERVING", "STEP_DIR", "CheckpointError", "CheckpointManager", "CheckpointReadError",
    "RandomStreams", "ResumePlan", "Resumed", "TrainState", "UnreadableCheckpoint", "complete_checkpoints",
    "data_position_settings", "file_records", "latest_checkpoint", "layout_of", "load_file", "load_serial_state",
    "partition_map", "read_meta", "resolve_checkpoint", "rng_file", "rng_source_rank", "set_aside", "shard_file",
    "step_dir",
]


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
    run_id: str | None = None  # the run's identity: made when it starts at step 0, kept by every resume

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


class CheckpointManager:
    """Saves and finds this run's checkpoints; every rank calls ``save`` and ``load``."""

    def __init__(self, cfg: Config, dims: ParallelDims, classes: list[str] | None = None,
                 data_position: dict | None = None, serving: dict | None = None):
        self.cfg, self.dims, self.classes = cfg, dims, list(classes or [])
        self.data_position = data_position or data_position_settings(cfg, dims, 0, 0)
        self.serving = serving  # {"class_names": [...], "preprocessing": Preprocessing.to_dict()}
        self.root = cfg.checkpoint_dir
        self._launch: dict | None = None

    def launch(self) -> dict:
        """This job (``owners.launch_of``): a collective the first time, so every rank calls it."""
        if self._launch is None:
            self._launch = launch_of(self.dims.all_objects(torchrun_agent()))
        return self._launch

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
            missing = None if appears(self.root / name) else f"rank {dims.rank} ({where_am_i()})"
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

    def plan_resume(self) -> ResumePlan:
        """Where to resume from, as rank 0 sees checkpoint.dir (on a network file system two hosts
        can list different folders for a moment after a fast requeue), on every rank:

        - a restart of this job (``owners.same_job``: a torchrun restart, a Slurm requeue) resumes
          the checkpoints the job saved, newest first, whatever ``checkpoint.resume`` says: that
          was for the job's first start;
        - auto: every complete checkpoint, newest first; refused when they are more than one run's;
        - none: none; refused when checkpoint.dir holds any checkpoint (it is another run's);
        - a path: that one, without fallback (it was asked for); refused when checkpoint.dir is
          another folder that holds another run's checkpoints.

        A refusal is a CheckpointError, before step 1; an I/O error reading the folder is a
        CheckpointReadError. Each one is raised on every rank."""
        launch = self.launch()
        plan, error = None, None
        if self.dims.is_main:
            try:
                plan = plan_resume(self.root, self.cfg.checkpoint.resume, launch)
            except (CheckpointError, CheckpointReadError) as e:
                error = (type(e), str(e))
            except OSError as e:  # listing checkpoint.dir
                error = (CheckpointReadError, f"checkpoint.dir {self.root}: cannot be read ({why_not_read(e)})")
        plan, error = self.dims.broadcast_object((plan, error))
        if error is not None:
            raise error[0](error[1])
        return plan

    def resume(self, engine: Engine, state: TrainState, streams: RandomStreams) -> tuple[Path, Resumed] | None:
        """Load the newest candidate of ``plan_resume`` that loads, on every rank; None when there is
        none to resume. A candidate with a fault found in it (``UnreadableCheckpoint``) is named, moved
        aside (rank 0) and the previous one is tried; any other error ends the start with every
        checkpoint in place. A run that starts anew (or from a checkpoint saved before runs had ids)
        gets its id here."""
        plan = self.plan_resume()
        if self.dims.is_main:
            for line in plan.notes:
                print(line, file=sys.stderr, flush=True)
        found, failures = None, []
        for folder in plan.candidates:
            try:
                found = folder, self.load(folder, engine, state, streams)
                break
            except UnreadableCheckpoint as e:
                if not plan.fall_back:
                    raise
                failures.append(f"{folder.name} ({e})")
                if self.dims.is_main:
                    aside = move_aside_unreadable(folder)
                    fallback = "the previous complete one" if folder != plan.candidates[-1] else "no other checkpoint"
                    print(f"warning: checkpoint {folder} has a fault ({e}): moved aside to {aside.name}; trying "
                          f"{fallback}", file=sys.stderr, flush=True)
                self.dims.barrier()
        if found is None and failures:
            raise CheckpointError(f"{self.root}: no complete checkpoint loads: " + "; ".join(failures))
        if state.run_id is None:
            state.run_id = self.dims.broadcast_object(uuid.uuid4().hex if self.dims.is_main else None)
        return found

    def save(self, engine: Engine, state: TrainState, streams: RandomStreams) -> Path:
        """Every rank: its shard (dp rank 0 of each tp group) and random streams; rank 0: meta.json,
        then the folder is put in place and old checkpoints are pruned."""
        dims = self.dims
        launch = self.launch()
        final = step_dir(self.root, state.step)
        tmp = self.root / f".{final.name}.tmp"
        written = {}  # file name -> {"bytes", "crc32"}, taken as the bytes went out
        try:
            if dims.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                tidy(self.root)
                tmp.mkdir()
            dims.barrier()
            model, momentum = engine.shard_state()  # a collective over dp with ZeRO: every rank calls
            if dims.dp_rank == 0:
                shard = shard_file(tmp, dims.tp_rank)
                written[shard.name] = save_durably({"model": model, "momentum": momentum}, shard)
            written[rng_file(tmp, dims.rank).name] = save_durably(streams.state_dict(), rng_file(tmp, dims.rank))
            if dims.is_main and self.serving is not None:
                written[SERVING] = save_durably(self.serving, tmp / SERVING)
        except OSError as e:  # a full disk, a lost mount: one line, and every rank ends (distalex.jobs)
            raise CheckpointError(f"cannot write checkpoint {tmp} (checkpoint.dir): {e}") from None
        # Every file is on disk before the checkpoint is declared complete; rank 0 gets their records.
        files = {name: record for part in dims.all_objects(written) for name, record in part.items()}
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
                "files": dict(sorted(files.items())),
                "launch": launch,
            }
            write_json_atomic(tmp / META, meta)
            self._refuse_to_replace_another_runs(final, state.run_id)
            publish(tmp, final)
            for old in [c for c in complete_checkpoints(self.root) if self._prunable(c, state.run_id)][: -self.cfg.checkpoint.keep]:
                discard(old)
        dims.barrier()
        return final

    @staticmethod
    def _prunable(folder: Path, run_id: str | None) -> bool:
        """Whether pruning may delete ``folder``: a checkpoint of this run, or one saved before runs had
        ids (in a folder where this run started, only one it resumed from can be that). Never one
        whose meta.json does not read: whose it is cannot be told."""
        try:
            return run_of(read_meta(folder)) in (run_id, None)
        except (CheckpointError, CheckpointReadError):
            return False

    @staticmethod
    def _refuse_to_replace_another_runs(final: Path, run_id: str | None) -> None:
        """A re-save of a step replaces the checkpoint there: never another run's (two jobs saving into
        one checkpoint.dir, both started when it was empty)."""
        try:
            owner = run_of(read_meta(final)) if (final / META).is_file() else None
        except (CheckpointError, CheckpointReadError):
            return  # unreadable: replaced, as before run ids
        if owner is not None and owner != run_id:
            raise CheckpointError(f"checkpoint.dir: {final} belongs to another run (run {owner[:8]}) that saved into this "
                                  "folder after this run started: two jobs are saving into one checkpoint.dir; give each "
                                  "its own run_name")

    def load(self, folder: Path, engine: Engine, state: TrainState, streams: RandomStreams) -> Resumed:
        """Weights, momentum, train state and random streams of ``folder``, re-split for this job's
        layout if it differs; refuses a different model or a changed batch size or seed."""
        dims = self.dims
        try:
            meta = read_meta(folder)
            self.check_fits(folder, meta)
            if meta["format"] < RESUMABLE_FORMAT:
                raise CheckpointError(
                    f"{folder}: checkpoint format {meta['format']} holds no momentum by name and cannot be resumed "
                    "(python -m distalex.export still reads its weights)"
                )
            resumed = self._load_files(folder, meta, engine, streams)
            error = None
        except (CheckpointError, CheckpointReadError) as e:
            error = (type(e), str(e))
        # Every rank learns of a failure on any (the lowest rank's words), so all take the same path:
        # the fallback to the previous checkpoint (UnreadableCheckpoint), or the end of the job with
        # every checkpoint in place (exit status 2, or 5 for CheckpointReadError). It also means every
        # rank has read the folder before rank 0 may tidy, replace or move it aside.
        first = dims.first_of(error)
        if first is not None:
            raise first[0](first[1])
        state.load_state_dict(meta["train_state"])
        return resumed

    def _load_files(self, folder: Path, meta: dict, engine: Engine, streams: RandomStreams) -> Resumed:
        """This rank's shard and random streams of ``folder``, each file checked against its record
        first (``load_file``, which also says what each error means)."""
        dims = self.dims
        saved_dp, saved_tp = meta["world"]["dp"], meta["world"]["tp"]
        resumed = Resumed([f"{k} {a} -> {b}" for k, a, b in (("dp", saved_dp, dims.dp), ("tp", saved_tp, dims.tp)) if a != b])
        saved_position = meta.get("data_position", {})
        resumed.saved_steps_per_epoch = saved_position.get("steps per epoch", 0)
        resumed.position_changes = [
            f"{key} {saved_position[key]} -> {now}" for key, now in self.data_position.items()
            if key in saved_position and saved_position[key] != now
        ]
        files = file_records(meta)
        try:
            model, momentum = read_local_shard(folder, meta["partition"], saved_tp, engine.module, dims, files)
            engine.load_shard_state(model, momentum)
            source = rng_source_rank(dims, saved_dp, saved_tp)
            if source is not None:  # None: a new dp rank keeps its fresh streams
                streams.load_state_dict(load_file(folder, rng_file(folder, source).name, files))
        except (CheckpointError, CheckpointReadError):
            raise
        except (OSError, MemoryError, torch.OutOfMemoryError) as e:
            raise CheckpointReadError(f"{folder}: rank {dims.rank} cannot load it ({why_not_read(e)})") from None
        except Exception as e:  # noqa: BLE001 - whole files whose contents do not fit this model or stream
            raise CheckpointError(f"{folder}: rank {dims.rank} cannot load it ({type(e).__name__}: {e})".splitlines()[0]) from None
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
                     dims: ParallelDims, files: dict[str, dict] | None) -> tuple[dict, dict]:
    """(weights, momentum) of this rank's shard of ``module``: its own file when tp and the split are unchanged,
    else every shard joined into the serial layout and split again for this rank."""
    if saved_tp == dims.tp and partition == partition_map(module):
        blob = read_shard(folder, dims.tp_rank, files)
        return blob["model"], blob["momentum"]
    blobs = [read_shard(folder, r, files) for r in range(saved_tp)]
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
    shards = [read_shard(folder, r, file_records(meta))["model"] for r in range(meta["layout"]["tp"])]
    return join_shards(folder, meta["partition"], shards), cfg, meta.get("classes", [])
