"""What a report is drawn from: a checkpoint, an exported model file or an MLflow run (see ``cli``).

Relative paths in a run's config (shards, a sqlite store) are looked up from where training ran,
so the report works from any directory.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distalex.report import ReportError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Source:
    """What one RUN_OR_CHECKPOINT gives; None where it gives nothing, with the reason in ``why``."""

    label: str
    state: dict[str, torch.Tensor] | None = None
    model_config: dict | None = None
    cfg: object | None = None  # distalex.config.Config of a checkpoint (or an MLflow run's config)
    classes: list[str] = field(default_factory=list)
    run_id: str | None = None
    tracking_uri: str | None = None
    workdir: Path | None = None
    """Where training ran: relative data paths in ``cfg`` are taken from there if not found here."""
    why: dict[str, str] = field(default_factory=dict)


def load_source(arg: str, tracking_uri: str | None = None) -> Source:
    """Read RUN_OR_CHECKPOINT (see the module docstring). Raises ReportError naming what is wrong."""
    path = Path(arg)
    if path.is_file():
        return _from_export(path)
    if path.is_dir():
        return _from_checkpoint(path, tracking_uri)
    if RUN_ID.match(arg):
        return _from_run(arg, tracking_uri)
    raise ReportError(f"{arg}: no such file or folder, and not an MLflow run id (32 hex digits)")


def _from_export(path: Path) -> Source:
    from distalex.export import ExportError, load_serial_model

    try:
        model, blob = load_serial_model(path)
    except ExportError as e:
        raise ReportError(str(e)) from None
    src = Source(f"model file {path}", state=model.state_dict(), model_config=blob["model_config"],
                 classes=list(blob.get("classes", [])))
    src.why["curves"] = "an exported model file has no metric history (give the checkpoint or the MLflow run id)"
    return src


def _from_checkpoint(path: Path, tracking_uri: str | None) -> Source:
    from distalex.checkpoint import CheckpointError, load_serial_state, read_meta, resolve_checkpoint

    if not (path / "meta.json").is_file() and (path / "checkpoints").is_dir() and not path.name.startswith("step-"):
        path = path / "checkpoints"  # a run folder
    try:
        folder = resolve_checkpoint(path)
        state, cfg, classes = load_serial_state(folder)
        run_id = read_meta(folder)["train_state"].get("mlflow_run_id")
    except CheckpointError as e:
        raise ReportError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:  # a meta.json or shard that lacks what it should
        raise ReportError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    src = Source(f"checkpoint {folder}", state=state, model_config=cfg.model.model_dump(), cfg=cfg, classes=list(classes))
    src.workdir = _training_workdir(folder, cfg)
    src.run_id = run_id
    src.tracking_uri = tracking_uri or _run_tracking_uri(cfg, src.workdir)
    if not src.run_id:
        src.why["curves"] = f"{folder / 'meta.json'} names no MLflow run (tracking was off?)"
    return src


def _training_workdir(folder: Path, cfg) -> Path | None:
    """The directory training ran in: relative paths in the config (shards, sqlite store) are relative to it.

    Found by taking ``checkpoint.dir`` (e.g. ``runs/demo/checkpoints``) off the end of where the
    checkpoint is; None when the checkpoint was moved or the directory was absolute.
    """
    rel = cfg.checkpoint_dir
    root = folder.resolve().parent
    if rel.is_absolute():
        return None
    n = len(rel.parts)
    if root.parts[-n:] != rel.parts:
        return None
    return root.parents[n - 1]


def _run_tracking_uri(cfg, workdir: Path | None) -> str:
    """The tracking URI training used (``tracking.resolve_tracking_uri``), seen from the training directory."""
    from distalex.tracking import resolve_tracking_uri, sqlite_path

    base = workdir or Path.cwd()
    db = sqlite_path(cfg.tracking.uri or "", base)  # a relative store is relative to training's directory
    if db is not None:
        return "sqlite:///" + str(db)
    return resolve_tracking_uri(cfg, base / cfg.run_dir)


def _from_run(run_id: str, tracking_uri: str | None) -> Source:
    client, uri = open_tracking(tracking_uri)
    run = get_run(client, uri, run_id)
    src = Source(f"MLflow run {run_id}", run_id=run_id, tracking_uri=uri)
    run_dir = run.data.tags.get("distalex.run_dir")  # absolute: <training directory>/runs/<name>
    if run_dir:
        src.workdir = Path(run_dir).parent.parent
    artifact = _find_model_artifact(client, run_id)
    if artifact is None:
        src.why["kernels"] = src.why["ten_crop"] = f"MLflow run {run_id} has no model file (*.pt) among its artifacts"
        return src
    with tempfile.TemporaryDirectory() as tmp:
        exported = _from_export(Path(client.download_artifacts(run_id, artifact, tmp)))
        src.cfg = _run_config(client, run_id, tmp)
    src.state, src.model_config, src.classes = exported.state, exported.model_config, exported.classes
    src.label += f" (model artifact {artifact})"
    return src


def _run_config(client, run_id: str, tmp: str):
    """The resolved config the loop stores with the run (``config.yaml``), or None."""
    import yaml

    from distalex.config import Config

    try:
        text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        return Config.model_validate(yaml.safe_load(text))
    except Exception:  # noqa: BLE001 - absent (MLflow's own error), unreadable or invalid: no config
        return None


def _find_model_artifact(client, run_id: str, folder: str | None = None) -> str | None:
    """The first ``model.pt`` among a run's artifacts, else the first ``*.pt`` (breadth first)."""
    found, todo = [], [folder]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop(0)):
            if info.is_dir:
                todo.append(info.path)
            elif info.path.endswith(".pt"):
                found.append(info.path)
    found.sort(key=lambda p: (Path(p).name != "model.pt", p.count("/"), p))
    return found[0] if found else None


def open_tracking(tracking_uri: str | None):
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ReportError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    from mlflow.tracking import MlflowClient

    from distalex.tracking import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would silently create an empty store there
        raise ReportError(f"{uri}: no MLflow database at {db}")

    return MlflowClient(uri), uri


def get_run(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"MLflow run {run_id} not found at {uri} ({e.message})") from None
    except Exception as e:  # noqa: BLE001 - a dead server, a refused connection: one clear line
        raise ReportError(f"cannot reach MLflow at {uri} ({type(e).__name__}: {e})") from None


def load_model(source: Source):
    from distalex.config import ModelConfig
    from distalex.model import build_model

    model = build_model(ModelConfig(**source.model_config))
    try:
        model.load_state_dict(source.state)
    except RuntimeError as e:
        raise ReportError(f"{source.label}: weights do not fit its model config ({e})") from None
    return model.eval()


def data_config(source: Source, val_shards: str | None, resize: int | None):
    """The checkpoint's data section, else defaults; --val-shards also supplies the statistics' _info.json."""
    from distalex.config import DataConfig

    data = source.cfg.data.model_copy() if source.cfg is not None else DataConfig()
    if source.workdir is not None:
        data.train_shards = _rebase(data.train_shards, source.workdir)
        data.val_shards = _rebase(data.val_shards, source.workdir)
    if val_shards:
        data.val_shards = val_shards
        if source.cfg is None:
            data.train_shards = val_shards  # the same _info.json holds the training statistics
    if resize:
        data.resize = resize
    elif source.cfg is None:
        data.resize = round(source.model_config["image_size"] * 256 / 224)  # the paper's 256 for 224
    return data


def _rebase(spec: str, workdir: Path) -> str:
    """A relative shard spec that matches nothing from here, taken relative to the training directory."""
    from distalex.data.info import expand_spec

    def found(item: str) -> bool:  # a shard folder, or a spec that names an existing shard
        return os.path.isdir(item) or any(os.path.exists(p) for p in expand_spec(item))

    items = []
    for item in (s.strip() for s in spec.split(",")):
        if item and not Path(item).is_absolute() and not found(item) and found(str(workdir / item)):
            item = str(workdir / item)
        items.append(item)
    return ",".join(items)
