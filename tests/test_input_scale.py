"""data.input_scale end to end: a short real run of each scale (tp=2 under torchrun), and every form
of its model giving the numbers its own validation gave.

standardized with the per-channel mean (the demo's); raw with the mean image (the paper config's),
with the demo's Kaiming init at a learning rate small enough not to diverge on raw pixels: its
predictions then depend on the image strongly enough that a wrong scale would show (the paper's init
on this narrow net gives nearly the same prediction for every image). After the last epoch's validation the run saves its checkpoint, exports model.pt and logs the MLflow
model; each of them (and a checkpoint and an MLflow model stripped of the scale, as an older distalex
wrote them) classifies the validation images. Tolerances: the same top-1 and top-5 hits, the loss
within LOSS_ATOL of the logged val/loss (the run validated with the tp=2 net, these use the serial
one: sums in another order).
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from distalex.checkpoint import SERVING, latest_checkpoint
from distalex.model_source import load_source
from distalex.predict import classify_files, predictor_of
from distalex.serving import class_probabilities, eval_crops
from tests.runs import launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture
from tests.test_predict import CLASSES, errors_of

pytestmark = pytest.mark.e2e

LOSS_ATOL = 1e-5
SETTINGS = {"standardized": {"data.mean": "channel"}, "raw": {"data.mean": "pixel", "optim.lr": 1e-6}}


@pytest.fixture(scope="module", params=list(SETTINGS))
def run(request, tiny_shards, tmp_path_factory):
    scale = request.param
    workdir = tmp_path_factory.mktemp(f"scale-{scale}")
    proc = launch(workdir, tiny_overrides(tiny_shards, run_name="tiny", **{"data.input_scale": scale, **SETTINGS[scale]}))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run_id = re.search(r"MLflow model: runs:/(\w+)/model", proc.stdout).group(1)
    uri = f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    logged = {key: client.get_metric_history(run_id, f"val/{key}")[-1] for key in ("top1_error", "top5_error", "loss")}
    val = sorted((tiny_shards.parent / "src" / "val").glob("*/*.JPEG"))
    return {"scale": scale, "workdir": workdir, "run": workdir / "runs" / "tiny", "run_id": run_id, "uri": uri,
            "logged": logged, "val": val, "labels": [CLASSES.index(p.parent.name) for p in val]}


def validation_numbers(run) -> tuple[str, float]:
    """What the run's own validation logged, in errors_of's words."""
    top1, top5 = run["logged"]["top1_error"].value, run["logged"]["top5_error"].value
    return f"top-1 error {100 * top1:.2f}%, top-5 error {100 * top5:.2f}%", run["logged"]["loss"].value


def check_source(run, source, what: str) -> None:
    paths = [str(p) for p in run["val"]]
    predictor = predictor_of(source, False)
    probs = torch.stack([p for _, p in classify_files(predictor, paths, False, 64, lambda p, why: pytest.fail(why))])
    summary, loss = errors_of(probs, run["labels"])
    want_summary, want_loss = validation_numbers(run)
    assert summary == want_summary, (what, summary, want_summary)
    assert abs(loss - want_loss) <= LOSS_ATOL, (what, loss, want_loss)


def mlflow_model_folder(run, into: Path) -> tuple[Path, dict]:
    """The run's MLflow model downloaded under ``into``: its folder and its MLmodel file's contents."""
    mlflow.set_tracking_uri(run["uri"])  # runs:/ URIs are resolved in MLflow's process-wide store
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run['run_id']}/model", dst_path=str(into)))
    return folder, yaml.safe_load((folder / "MLmodel").read_text())


def test_the_run_records_its_scale(run, tmp_path):
    ckpt = latest_checkpoint(run["run"] / "checkpoints")
    assert torch.load(ckpt / SERVING, weights_only=True)["preprocessing"]["input_scale"] == run["scale"]
    assert torch.load(run["run"] / "model.pt", weights_only=True)["preprocessing"]["input_scale"] == run["scale"]
    assert mlflow_model_folder(run, tmp_path)[1]["metadata"]["preprocessing"]["input_scale"] == run["scale"]


def test_checkpoint_model_file_and_mlflow_model_predict_what_validation_measured(run):
    step = run["logged"]["loss"].step
    ckpt = latest_checkpoint(run["run"] / "checkpoints")
    assert ckpt.name == f"step-{step:08d}", "the last checkpoint holds the weights the last validation used"
    check_source(run, load_source(str(ckpt)), "checkpoint")
    check_source(run, load_source(str(run["run"] / "model.pt")), "model file")
    mlflow_model = load_source(f"runs:/{run['run_id']}/model", run["uri"])
    check_source(run, mlflow_model, "MLflow model")
    # evaluate's way with the MLflow model: the serial net from the graph's weights, the source's normaliser
    crops = torch.stack([eval_crops(p.read_bytes(), 72, 64, False) for p in run["val"][:8]])
    with torch.no_grad():
        graph = mlflow_model.graph(crops)
        rebuilt = class_probabilities(mlflow_model.model(), mlflow_model.normalizer(mlflow_model.cfg.data, False)(crops))
    torch.testing.assert_close(rebuilt, graph, atol=1e-5, rtol=0)  # the exported graph against eager kernels


@pytest.mark.parametrize("run", ["standardized"], indirect=True)  # the only scale older files can have
def test_older_checkpoints_and_mlflow_models_without_a_scale_load_standardized(run, tmp_path):
    """A checkpoint and an MLflow model as distalex wrote them before data.input_scale: no scale in
    their preprocessing or config. They trained standardized, and load so."""
    old = tmp_path / "checkpoints" / latest_checkpoint(run["run"] / "checkpoints").name
    shutil.copytree(latest_checkpoint(run["run"] / "checkpoints"), old)
    serving = torch.load(old / SERVING, weights_only=True)
    del serving["preprocessing"]["input_scale"]
    torch.save(serving, old / SERVING)
    meta = json.loads((old / "meta.json").read_text())
    del meta["config"]["data"]["input_scale"]
    data = (old / SERVING).read_bytes()  # the rewritten file's size and CRC-32, as the save records them
    meta["files"][SERVING] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (old / "meta.json").write_text(json.dumps(meta))
    source = load_source(str(old))
    assert source.preprocessing.input_scale == "standardized" and source.cfg.data.input_scale == "standardized"
    check_source(run, source, "older checkpoint")

    folder, mlmodel = mlflow_model_folder(run, tmp_path / "mlflow")
    del mlmodel["metadata"]["preprocessing"]["input_scale"]
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    source = load_source(str(folder), run["uri"])
    assert source.preprocessing.input_scale == "standardized"
    check_source(run, source, "older MLflow model")
