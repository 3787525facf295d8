"""Where a trained model comes from: one reader of SOURCE for predict, evaluate, export and report.

SOURCE is one of

    runs/<name>/model.pt     an exported model file (written at the end of training, or by distalex.export)
    a checkpoint             a step-N folder, a checkpoint directory (its latest complete checkpoint),
                             or a run folder holding checkpoints/
    runs:/<run_id>/model     an MLflow model (also models:/<name>/<version>, or a downloaded MLflow
                             model folder)
    <run_id>                 an MLflow run (32 hex digits): its model.pt artifact and its config

A source carries what the tools need, so that none of them depends on the working directory: the
serial weights and model config, the class ids and names, the preprocessing (crop sizes, training
mean and std), the run's config with absolute paths (its validation shards, for evaluate and the
10-crop picture) and the MLflow run and store it belongs to (curves). The store of runs:/, models:/
and run ids is --tracking-uri, else $MLFLOW_TRACKING_URI, else runs/mlflow.db in the working
directory (a run id alone names no store). Sources written before a part was recorded fall back to
what the run's config can still find, and say so in ``why``.

Every problem is a ``SourceError`` naming the source and what is wrong; the tools print it as one
line and exit with status 2.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from distalex.checkpoint import (
    SERVING, CheckpointError, CheckpointReadError, file_records, load_file, load_serial_state, read_meta,
    resolve_checkpoint,
)
from distalex.config import Config, ModelConfig
from distalex.data.augment import normalize, to_input_units
from distalex.data.info import DataError
from distalex.model import AlexNet, build_model
from distalex.serving import UNRECORDED_INPUT_SCALE, Preprocessing, training_settings
from distalex.tracking import sqlite_path  # importing distalex.tracking also sets MLflow's environment

# These tools talk to a store once: a dead server should fail in seconds, not after MLflow's minutes
# of retries, and stderr is for their own lines, not download progress bars.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
"""runs:/..., models:/..., s3://...: an MLflow model URI rather than a local path."""
DEFAULT_STORE = Path("runs") / "mlflow.db"
"""Where training keeps its runs unless told otherwise (``distalex.tracking``), seen from the working directory."""


class SourceError(ValueError):
    """A SOURCE the tools cannot use: the message names it and what is wrong."""


@dataclass
class ModelSource:
    """What one SOURCE gives; ``why`` says what it lacks (key: kernels, curves, ten_crop, preprocessing)."""

    label: str
    state: dict[str, torch.Tensor] | None = None
    """The serial (tp=1) weights."""
    model_config: dict | None = None
    classes: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    preprocessing: Preprocessing | None = None
    cfg: Config | None = None
    """The run's config (a model file: its model and data sections), with absolute paths when the run saved them."""
    run_id: str | None = None
    tracking_uri: str | None = None
    graph: Callable[[torch.Tensor], torch.Tensor] | None = None
    """An MLflow model's exported graph: uint8 crops (B, 3, S, S) -> class probabilities."""
    crop_sizes: tuple[int, int] | None = None
    """(resize, crop size) an image is cut with, where there are no full preprocessing settings (an
    MLflow model of a per-pixel-mean run: its graph subtracts the mean)."""
    why: dict[str, str] = field(default_factory=dict)

    def weights(self) -> dict[str, torch.Tensor]:
        if self.state is None:
            raise SourceError(f"{self.label}: {self.why.get('kernels', 'holds no weights')}")
        return self.state

    def model(self, model_cfg: ModelConfig | None = None) -> AlexNet:
        """The serial net with these weights (``model_cfg``: the source's own unless given), in eval mode."""
        cfg = model_cfg or ModelConfig(**(self.model_config or {}))
        model = build_model(cfg)
        try:
            model.load_state_dict(self.weights())
        except RuntimeError as e:
            raise SourceError(f"{self.label}: weights do not fit its model config ({e})") from None
        return model.eval()

    def config_base(self) -> dict:
        """The base a tool's --config and --set apply to: the run's config, else its model; at tp=1."""
        base = self.cfg.model_dump() if self.cfg is not None else Config(model=self.model_config or {}).model_dump()
        base["parallel"]["tp"] = 1
        return base

    def class_name(self, c: int) -> str:
        """The readable name of class ``c`` (``digit 3``), else its id (``n00000003``)."""
        if c < len(self.class_names):
            return self.class_names[c]
        return self.classes[c] if c < len(self.classes) else f"class {c}"

    def normalizer(self, data_cfg, ten: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 crops (B, 3, S, S), or (B, 10, 3, S, S) -> the net's input, as evaluation normalises them:
        with the training statistics the source carries, else those beside ``data_cfg.train_shards``."""
        prep = self.preprocessing
        if prep is None:
            return partial(normalize, train=False, data_cfg=data_cfg)
        mean, std = prep.mean_and_std(data_cfg.resize, ten)

        def apply(images: torch.Tensor) -> torch.Tensor:  # augment.normalize's arithmetic, same order
            return to_input_units(images, prep.input_scale).sub_(mean.to(images.device)).div_(std.to(images.device))

        return apply

    def sizes(self) -> tuple[int, int]:
        """(data.resize, image size): how an image is cut for this model."""
        if self.preprocessing is not None:
            return self.preprocessing.resize, self.preprocessing.image_size
        if self.crop_sizes is not None:
            return self.crop_sizes
        return self.require_preprocessing().resize, 0  # raises, naming what is missing

    def require_preprocessing(self) -> Preprocessing:
        if self.preprocessing is None:
            raise SourceError(f"{self.label}: {self.why.get('preprocessing', 'carries no preprocessing settings')}")
        return self.preprocessing


def load_source(arg: str, tracking_uri: str | None = None) -> ModelSource:
    """SOURCE (see the module docstring) as a ModelSource. Raises SourceError naming what is wrong."""
    if URI.match(arg):
        return _from_mlflow_model(arg, store_uri(tracking_uri))
    path = Path(arg)
    if path.is_file():
        src = _from_export(path)
        if tracking_uri and src.run_id:
            src.tracking_uri = tracking_uri
        return src
    if (path / "MLmodel").is_file():
        return _from_mlflow_model(str(path.resolve()), tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if path.is_dir():
        return _from_checkpoint(path, tracking_uri)
    if RUN_ID.match(arg):
        return _from_run(arg, store_uri(tracking_uri))
    raise SourceError(f"{arg}: no such file or folder, and not an MLflow model URI (runs:/<run_id>/model) "
                      "or run id (32 hex digits)")


def load_serial_model(path: str | Path) -> tuple[AlexNet, dict]:
    """The serial AlexNet of an exported model file (``distalex.export``), and the file's dict."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise SourceError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "model_config" not in blob:
        raise SourceError(f"{path}: not a distalex model export (no state_dict/model_config)")
    model = build_model(ModelConfig(**blob["model_config"]))
    missing = set(model.state_dict()) - set(blob["state_dict"])
    if missing:
        raise SourceError(f"{path}: the state dict lacks {sorted(missing)}")
    model.load_state_dict(blob["state_dict"])
    return model, blob


def _preprocessing(d: dict | None) -> Preprocessing | None:
    return Preprocessing.from_dict(d) if d else None


def _fall_back_to_shards(src: ModelSource) -> None:
    """A source saved without its preprocessing or class names: take them from the run's training shards."""
    if src.preprocessing is not None and src.class_names:
        return
    if src.cfg is None:
        src.why["preprocessing"] = "carries no preprocessing settings and names no training shards"
        return
    try:
        prep, names = training_settings(src.cfg)
    except DataError as e:
        src.why["preprocessing"] = f"carries no preprocessing settings, and its training shards' statistics are not found: {e}"
        return
    src.preprocessing = src.preprocessing or prep
    src.class_names = src.class_names or names


def _from_export(path: Path) -> ModelSource:
    model, blob = load_serial_model(path)
    src = ModelSource(f"model file {path}", state=model.state_dict(), model_config=blob["model_config"],
                      classes=list(blob.get("classes") or []), class_names=list(blob.get("class_names") or []),
                      preprocessing=_preprocessing(blob.get("preprocessing")))
    if blob.get("data"):
        try:
            src.cfg = Config.model_validate({"model": blob["model_config"], "data": blob["data"]})
        except ValueError as e:
            raise SourceError(f"{path}: its data section is not a valid config ({e})") from None
    run = blob.get("mlflow_run") or {}
    src.run_id, src.tracking_uri = run.get("run_id"), run.get("tracking_uri")
    if not src.run_id:
        src.why["curves"] = "the model file names no MLflow run (give the checkpoint or the MLflow run id)"
    _fall_back_to_shards(src)
    return src


def _from_checkpoint(path: Path, tracking_uri: str | None) -> ModelSource:
    if not (path / "meta.json").is_file() and (path / "checkpoints").is_dir() and not path.name.startswith("step-"):
        path = path / "checkpoints"  # a run folder
    try:
        folder = resolve_checkpoint(path)
        state, cfg, classes = load_serial_state(folder)
        meta = read_meta(folder)
        train_state, files = meta["train_state"], file_records(meta)
        serving = load_file(folder, SERVING, files) if (folder / SERVING).is_file() or SERVING in (files or {}) else {}
    except (CheckpointError, CheckpointReadError) as e:
        raise SourceError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a meta.json or file that lacks what it should
        raise SourceError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    src = ModelSource(f"checkpoint {folder}", state=state, model_config=cfg.model.model_dump(), cfg=cfg,
                      classes=list(classes), class_names=list(serving.get("class_names") or []),
                      preprocessing=_preprocessing(serving.get("preprocessing")),
                      run_id=train_state.get("mlflow_run_id"))
    src.tracking_uri = tracking_uri or train_state.get("mlflow_tracking_uri") or cfg.tracking.uri
    if not src.run_id:
        src.why["curves"] = f"{folder / 'meta.json'} names no MLflow run (tracking was off?)"
    elif not src.tracking_uri:
        src.why["curves"] = f"{folder / 'meta.json'} names no MLflow store: pass --tracking-uri"
    _fall_back_to_shards(src)
    return src


def store_uri(tracking_uri: str | None) -> str:
    """The store for runs:/, models:/ and run ids: --tracking-uri, $MLFLOW_TRACKING_URI, ./runs/mlflow.db."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(DEFAULT_STORE.resolve())
    check_store(uri)
    return uri


def check_store(uri: str) -> None:
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would quietly create an empty store there
        raise SourceError(f"{uri}: no MLflow database there; pass --tracking-uri or set MLFLOW_TRACKING_URI")


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    check_store(uri)
    return MlflowClient(uri)


def get_run(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise SourceError(f"MLflow run {run_id} not found at {uri} ({e.message})") from None
    except Exception as e:  # noqa: BLE001 - a dead server, a refused connection: one clear line
        raise SourceError(f"cannot reach MLflow at {uri} ({type(e).__name__}: {e})") from None


def _run_config(client, run_id: str, tmp: str) -> Config | None:
    """The resolved config the loop stores with the run (``config.yaml``), or None."""
    import yaml

    try:
        text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        return Config.model_validate(yaml.safe_load(text))
    except Exception:  # noqa: BLE001 - absent (MLflow's own error), unreadable or invalid: no config
        return None


def _from_mlflow_model(uri: str, store: str | None) -> ModelSource:
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    if store is not None:
        mlflow.set_tracking_uri(store)
    with tempfile.TemporaryDirectory(prefix="distalex-model-") as tmp:
        try:
            local = uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            info = Model.load(local)
            graph = mlflow.pytorch.load_model(local)
        except Exception as e:  # noqa: BLE001 - a missing run, a dead server, a foreign model: one line
            where = f" in {store}" if store else ""
            raise SourceError(f"{uri}: cannot load the MLflow model{where} ({type(e).__name__}: {e})") from None
        meta = info.metadata or {}
        prep = meta.get("preprocessing")
        if not prep or "classes" not in meta:
            raise SourceError(f"{uri}: not a distalex MLflow model (its metadata has no preprocessing and classes)")
        src = ModelSource(f"MLflow model {uri}", classes=list(meta["classes"]),
                          class_names=list(meta.get("class_names") or meta["classes"]), graph=graph,
                          run_id=info.run_id, tracking_uri=store)
        if store is not None and info.run_id:
            src.cfg = _run_config(mlflow.MlflowClient(store), info.run_id, tmp)
    src.crop_sizes = (int(prep["resize"]), int(prep["image_size"]))
    if prep.get("mean") == "pixel":  # the mean image is inside the graph, not in the metadata
        src.why["preprocessing"] = "its metadata holds no mean image (data.mean=pixel): use the run's model.pt"
    else:
        src.preprocessing = Preprocessing(int(prep["resize"]), int(prep["image_size"]), list(prep["mean_rgb"]),
                                          list(prep["std_rgb"]), input_scale=prep.get("input_scale", UNRECORDED_INPUT_SCALE))
    if meta.get("model_config"):
        src.model_config = meta["model_config"]
        src.state = {k.removeprefix("model."): v for k, v in graph.state_dict().items() if k.startswith("model.")}
    else:
        src.why["kernels"] = "its metadata has no model_config (logged by an older distalex): use the run's model.pt"
    return src


def _from_run(run_id: str, store: str) -> ModelSource:
    client = mlflow_client(store)
    get_run(client, store, run_id)
    artifact = _find_model_artifact(client, run_id)
    if artifact is None:
        src = ModelSource(f"MLflow run {run_id}", run_id=run_id, tracking_uri=store)
        src.why["kernels"] = src.why["ten_crop"] = src.why["preprocessing"] = (
            f"MLflow run {run_id} has no model file (*.pt) among its artifacts")
        return src
    with tempfile.TemporaryDirectory(prefix="distalex-run-") as tmp:
        src = _from_export(Path(client.download_artifacts(run_id, artifact, tmp)))
        src.cfg = _run_config(client, run_id, tmp) or src.cfg
    src.label = f"MLflow run {run_id} (model artifact {artifact})"
    src.run_id, src.tracking_uri = run_id, store
    src.why.pop("curves", None)
    return src


def _find_model_artifact(client, run_id: str) -> str | None:
    """The first ``model.pt`` among a run's artifacts, else the first ``*.pt`` (breadth first)."""
    found, todo = [], [None]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop(0)):
            if info.is_dir:
                todo.append(info.path)
            elif info.path.endswith(".pt"):
                found.append(info.path)
    found.sort(key=lambda p: (Path(p).name != "model.pt", p.count("/"), p))
    return found[0] if found else None
