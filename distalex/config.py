"""Typed run configuration: defaults, then a YAML file, then ``--set dotted.key=value`` overrides.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or an
impossible value is a ``ConfigError`` that names the key and the file and suggests the closest key.
``python -m distalex.config --config FILE [--set ...]`` prints the resolved config.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad config: the message names the key and where it came from."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    num_classes: int = Field(1000, ge=2)
    """Outputs of fc8."""
    towers: int = Field(2, ge=1)
    """The paper's 2 towers; each tensor-parallel rank holds towers/tp of them."""
    width: float = Field(1.0, gt=0, le=4)
    """Multiplier on every channel count and fc width (1.0 = the paper; 1/16 for CPU tests)."""
    image_size: int = Field(224, ge=63)
    """Side of the square input crop. 63 is the smallest that leaves pool5 a 1x1 map."""
    dropout: float = Field(0.5, ge=0, lt=1)
    """Dropout on fc6 and fc7 outputs (the paper: 0.5)."""
    lrn: bool = True
    """Local response normalisation after conv1 and conv2 (the paper: on)."""
    init: Literal["paper", "caffe", "kaiming"] = "paper"
    """paper: N(0, 0.01) weights, biases 1 in conv2/4/5 and fc6/7 (section 5). caffe: Caffe's
    bvlc_alexnet, N(0, 0.01) weights but N(0, 0.005) in fc6/7, biases 0.1 where the paper has 1.
    kaiming: N(0, 2/fan_in) weights, biases 0, for narrow variants. docs/paper.md, "Conventions"."""


class ParallelConfig(Section):
    tp: int = Field(2, ge=1)
    """Tensor-parallel degree: ranks per tower group. dp = world size / tp."""
    layout: Literal["towers", "hybrid"] = "towers"
    """How a tp group splits the net (the same net either way; docs/parallelism.md).
    towers: each rank holds towers/tp whole towers and sees every image (the paper's split).
    hybrid: each rank holds every conv kernel and convolves 1/tp of the group's images; the fully
    connected layers are split as in towers (Krizhevsky 2014). tp need not divide model.towers."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when present (nccl), else CPU (gloo)."""
    timeout_s: float = Field(600.0, gt=0)
    """Timeout of every collective, in every process group of the job: how long a rank waits for a
    peer that is alive but not there yet (a rank still loading, compiling or writing). Dead peers are
    found sooner, by ``peer_timeout_s``."""
    peer_timeout_s: float = Field(30.0, gt=0)
    """A rank whose peer (process, host or link) or the job's store has given no heartbeat for this
    long ends the job, naming the peer (docs/training.md, "Faults at scale"). Heartbeats come from a
    thread, so a slow step, compile or checkpoint write never counts. 30 s: a few seconds more than
    torchrun's own rendezvous keep-alive allows (3 beats of 5 s), and longer than the pauses a healthy
    host can have (TCP retransmissions over a short link flap, a swap or GC stall), while a dead peer
    costs 30 s instead of the collective timeout (10 to 30 minutes by default)."""
    progress_timeout_s: float = Field(120.0, gt=0)
    """A training job in which no rank has finished a step for this long while every rank's process
    lives (a deadlock, a read that never returns or a stuck kernel on one rank, the others waiting for
    it in a collective) ends, naming the rank that is behind, after every rank has written its Python
    stacks to the log (docs/training.md, "Faults at scale"). Not counted: start-up, the first 2 steps
    of each process (compiles), checkpoint writes, validation, an epoch's loader start. Must exceed
    the slowest step with the wait for its batch; with remote shards the bound used is at least the
    longest a read may stall through its retries (data.stall_timeout_s for each of data.retries + 1
    tries, and the waits between them: 247 s at the defaults)."""


class DataConfig(Section):
    train_shards: str = "data/shards/imagenet-train-{000000..000146}.tar"
    """Shard list: a brace pattern, a glob, a directory, or a comma-separated list."""
    val_shards: str = "data/shards/imagenet-val-{000000..000006}.tar"
    workers: int = Field(4, ge=0)
    """DataLoader worker processes per loading rank (tp rank 0 of each dp group)."""
    start_method: Literal["auto", "forkserver", "spawn", "fork"] = "auto"
    """How the worker processes start (multiprocessing's start method, passed to the DataLoader, so
    Python's default does not matter): auto = forkserver on Linux (a single-threaded server, preloaded
    with the loader, forks them), else spawn; fork copies the training process with its threads
    (fastest, unsafe while another thread holds a lock); spawn starts each in a fresh interpreter
    (seconds per epoch). docs/data.md#loader-workers-and-start-methods has the measurements."""
    shuffle_buffer: int = Field(2000, ge=0)
    """Raw samples held in each worker's shuffle buffer (0: no sample shuffle; ~110 KB each on ImageNet)."""
    resize: int = Field(256, ge=1)
    """Shorter side rescaled to this, then the central square is kept (the paper: 256)."""
    input_scale: Literal["standardized", "raw"] = "standardized"
    """What the net sees. raw: the paper's "centred raw RGB values" (section 2), as the authors' code
    fed them: pixels 0-255 minus the training mean, nothing divided; PCA lighting in pixel units, the
    authors' form (alpha x the square root of each eigenvalue x 255). standardized: pixels / 255 minus
    the mean, divided by the per-channel training std (about 60 times smaller than raw); lighting
    alpha x eigenvalue in [0, 1] units, the form of public ImageNet code. docs/paper.md, "Conventions"."""
    lighting_std: float = Field(0.1, ge=0)
    """PCA lighting: alpha ~ N(0, lighting_std) per image per presentation (0 turns it off); what alpha
    multiplies depends on data.input_scale."""
    mean: Literal["pixel", "channel"] = "channel"
    """Subtract the training mean per channel or per pixel (the paper: per pixel). Both come from
    make_shards' statistics. Random training crops get the mean image's centre patch, as in the
    authors' code (the device sees only the crop's pixels, not where it was cut); the centre crop
    and the ten test crops get their own patches."""
    flip: bool = True
    """Random horizontal flip on training crops."""
    train_samples: int | None = Field(None, ge=1)
    """Training samples per epoch; default from the shards' _info.json. More than the shards hold
    repeats samples within the epoch, and then dp ranks may share some."""
    info: str | None = None
    """Path or URL of the shards' _info.json (per-shard counts, classes, statistics); default: beside
    local shards. Remote or foreign shards need one: python -m distalex.data.index SPEC --out FILE."""
    label_key: str = "label"
    """For shards whose samples carry the label in a json member instead of cls: its key."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Training images: cpu = decoded and cropped by the loader workers; gpu = the workers only read
    bytes, the training rank decodes each batch with one nvjpeg call and crops the whole batch on the
    device, to the same pixels (on the CPU of that process, with a printed note, where CUDA or nvjpeg
    is missing). Validation stays on cpu."""
    retries: int = Field(3, ge=0)
    """A remote shard read that fails or ends early is retried this many times from where it stopped;
    then the rest of that shard's part is counted in train/skipped_samples."""
    retry_wait_s: float = Field(1.0, ge=0)
    """Seconds before the first retry, doubled for each further one."""
    stall_timeout_s: float = Field(60.0, gt=0)
    """A remote read (http(s), pipe:, fsspec: s3://, gs://, ...) that delivers no byte for this long
    fails and is retried, opening the stream included; local files are never timed out."""


class OptimConfig(Section):
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_drop_factor: float = Field(0.1, gt=0, le=1)
    """Multiply the LR by this when validation error stops improving (the paper: /10)."""
    lr_patience: int = Field(5, ge=0)
    """Epochs without a new best validation top-1 error before the LR drops."""
    min_lr: float = Field(1e-5, ge=0)
    bias_lr_mult: float = Field(1.0, gt=0)
    """Biases learn at this multiple of the LR, also after it drops (the paper's text: 1, one rate for
    every layer; the authors' code and Caffe: 2)."""
    bias_decay_mult: float = Field(1.0, ge=0)
    """Weight decay on biases = this x optim.weight_decay (the paper's update rule: 1; the authors'
    code and Caffe: 0, biases are not decayed)."""


class TrainConfig(Section):
    batch_size: int = Field(128, ge=1)
    """Global batch (the paper: 128), split over the dp groups as evenly as it goes: where dp does
    not divide it the groups' batches differ by one image (128 at dp=12: eight of 11, four of 10), and
    each group's loss is weighted by its share, so a step is the serial step on the whole batch at
    any dp (docs/training.md, "Batch size and scale"). At least one image per dp group."""
    epochs: int = Field(90, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (for short runs); None: run all epochs."""
    seed: int = 0
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2] = 1
    """ZeRO stage with engine=deepspeed (optimizer state, plus gradients at 2, over the dp group)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, float32 on CPU."""
    channels_last: Literal["auto", True, False] = "auto"
    """The conv maps' memory format: true, channels-last (N, H, W, C) on every device, kept from
    conv1 to pool5 (``distalex.memory_format``); false, NCHW; auto, channels-last on CUDA and NCHW
    on the CPU (docs/benchmarks.md)."""
    compile: bool = False
    """torch.compile the model (inductor), one graph; under DDP split at the gradient buckets so that
    their all-reduce overlaps the backward (docs/training.md, ``train.compile``)."""
    ddp_bucket_mb: float = Field(25.0, ge=1.0)
    """engine=ddp: gradients are all-reduced in buckets of about this many MiB (DDP's
    ``bucket_cap_mb``), each as soon as the backward has made it; a compiled step is split into
    pieces of the same size. At least 1: DDP's first bucket is 1 MiB, and no later one may be smaller."""
    cuda_graphs: bool = False
    """Refused (``true`` is a config error): CUDA graphs of the compiled step would replay without its
    dropout draw. The dropout stream's state is a CPU tensor that the step mutates, and inductor
    skips CUDA graphs for a graph with a CPU tensor or a mutated input, so the option would do
    nothing; were the draw captured, its host-side state update would not run at replay
    (docs/training.md, ``train.compile``). The key stays so that configs saying ``false`` load."""
    log_every: int = Field(10, ge=1)
    """Steps between logged metrics (reading the loss is a device sync)."""
    progress_interval_s: float = Field(30.0, gt=0)
    """Where stderr is not a terminal (a SLURM log, ``> file``): seconds between plain progress
    lines (steps, rate, time left, loss, data wait). On a terminal a progress bar instead."""
    eval_ten_crop: bool = False
    """Validate with 10-crop (slower) instead of the centre crop."""
    deterministic: bool = False
    """Deterministic kernels (slower; for exact resume checks)."""
    plateau_steps: int = Field(2000, ge=0)
    """Warn once (a line, and the MLflow tag distalex.plateau) when the logged training loss has stayed
    within train.plateau_margin of ln(model.num_classes) for this many steps: the net gives every
    image the same prediction (docs/training.md, "A loss stuck at chance"). 0: no check."""
    plateau_margin: float = Field(0.02, gt=0, lt=1)
    """How close to ln(model.num_classes) a loss counts as on the plateau, as a fraction of it
    (0.02: 0.046 for 10 classes, 0.138 for 1000)."""


class CheckpointConfig(Section):
    dir: str = "runs/{run_name}/checkpoints"
    every_steps: int = Field(1000, ge=0)
    """Save every N steps (0: only at epoch ends and on SIGTERM)."""
    keep: int = Field(3, ge=1)
    """Complete checkpoints of this run to keep; its older ones are deleted (never another run's)."""
    resume: str = "auto"
    """auto: the latest complete checkpoint in dir, if any; none: a new run (refused when dir holds
    another run's checkpoints); or a checkpoint path. A restart of the same job (torchrun
    --max-restarts, a Slurm requeue) resumes the checkpoints it saved, whatever this says."""


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/../mlflow.db."""
    experiment: str = "distalex"
    run_name: str | None = None
    register_as: str | None = None
    """Register the run's final MLflow model under this name in the model registry (None: not registered)."""
    system_metrics: bool = True
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) from one process per
    host, as system/<host>/... in the run."""
    system_metrics_interval_s: float = Field(10.0, gt=0)
    """Seconds between system metric samples ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)."""


def towers_per_rank(towers: int, tp: int) -> int:
    """Whole towers each tensor-parallel rank holds; a ValueError naming both keys if tp does not divide towers."""
    if towers % tp:
        raise ValueError(f"model.towers={towers} is not divisible by parallel.tp={tp}: each rank must hold whole towers")
    return towers // tp


class Config(Section):
    run_name: str = "alexnet"
    """Names the run directory runs/<run_name> and the MLflow run."""
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _layout(self) -> "Config":
        if self.parallel.layout == "towers":
            towers_per_rank(self.model.towers, self.parallel.tp)
        if self.train.cuda_graphs:
            raise ValueError(
                "train.cuda_graphs=true is not supported: the dropout stream's state is a CPU tensor the step "
                "mutates, so inductor skips CUDA graphs for the step (it would do nothing), and a replayed graph "
                "would not advance the stream (the same dropout masks every step); set it to false "
                "(docs/training.md, train.compile)"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """``runs/<run_name>`` in the working directory: the resolved config, kernel pictures and the
        exported model. Training writes there; nothing that reads a run depends on the directory,
        because what a run saves holds absolute paths (``absolute_paths``)."""
        return Path("runs") / self.run_name

    @property
    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` with the run name filled in."""
        return Path(self.checkpoint.dir.format(run_name=self.run_name))


def absolute_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """``cfg`` with every relative local path taken from ``base`` (default: the working directory):
    the shard lists, ``data.info``, ``checkpoint.dir``, an explicit ``checkpoint.resume`` and a
    relative ``sqlite:///`` tracking URI. URLs and ``pipe:`` commands stay as they are.

    A run saves this form (checkpoints, the exported model, config.yaml), so that predict, evaluate
    and report find its data and store from any directory.
    """
    root = Path(base or Path.cwd()).resolve()

    def local(item: str) -> str:
        is_url = item.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", item)
        return item if not item or is_url or os.path.isabs(item) else os.path.normpath(root / item)

    def spec(value: str) -> str:
        return ",".join(local(item.strip()) for item in value.split(","))

    data = {"train_shards": spec(cfg.data.train_shards), "val_shards": spec(cfg.data.val_shards),
            "info": local(cfg.data.info) if cfg.data.info else None}
    resume = cfg.checkpoint.resume
    checkpoint = {"dir": local(cfg.checkpoint.dir), "resume": resume if resume in ("auto", "none") else local(resume)}
    uri = cfg.tracking.uri
    if uri and uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        uri = "sqlite:///" + local(uri[len("sqlite:///"):])
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update=data),
        "checkpoint": cfg.checkpoint.model_copy(update=checkpoint),
        "tracking": cfg.tracking.model_copy(update={"uri": uri}),
    })


# ------------------------------------------------------------------ loading and overrides


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, for suggestions."""
    keys = []
    for name, f in model.model_fields.items():
        key = prefix + name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, key + ".")
        else:
            keys.append(key)
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f", did you mean {close[0]}?" if close else ""


def _set_dotted(tree: dict, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(parts[: i + 1])} is a value, not a section (in {key})")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value``: the value is read as YAML, so ``3``, ``1e-3``, ``true`` and ``null`` are typed."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _explain(err: ValidationError, origin_of: dict[str, str]) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        origin = origin_of.get(key) or next(
            (o for k, o in origin_of.items() if k.startswith(key + ".")), origin_of[""]
        )
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: {key}: unknown key{_suggest(key)}")
        elif not key:
            lines.append(f"{origin}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            lines.append(f"{origin}: {key}: {e['msg']} (got {got!r})")
    return ConfigError("\n".join(lines))


def _merge(into: dict, update: dict) -> dict:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults (or ``base``) <- YAML file <- overrides, in that order.

    Raises ConfigError naming the key and where its value came from.
    """
    tree: dict = copy.deepcopy(base) if base else {}
    origin_of: dict[str, str] = {"": str(path) if path else "defaults"}
    if path is not None:
        from_file = _read_yaml(Path(path))
        _merge(tree, from_file)
        for key in _leaf_keys(from_file):
            origin_of[key] = str(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"--set {text}")
        origin_of[key] = f"--set {text}"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, origin_of) from None


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _leaf_keys(v, key + ".") if isinstance(v, dict) else [key]
        out.append(key)
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(cfg.model_dump(), "")
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=0.02 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config for a CLI; a bad one prints its message and exits with status 2."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distalex.config", description="print the resolved config")
    add_config_args(parser)
    print(to_yaml(config_from_args(parser.parse_args(argv))), end="")


if __name__ == "__main__":
    main()
