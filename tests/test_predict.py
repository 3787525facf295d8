"""Using a trained model: predict agrees with evaluate, the MLflow model agrees with predict, the
plain-torch snippet of docs/using-a-model.md agrees with distalex's net, and bad images are reported one by one.

The fast tests use a randomly initialised narrow net and images made here; the slow ones share one
short real training run (tp=2 under torchrun, the demo data given as a relative path) that logs and
registers its MLflow model. They run predict and evaluate from other directories than the run's:
what the run saved holds absolute paths and the training statistics.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from distalex.config import ModelConfig, load_config
from distalex.data.augment import normalize
from distalex.export import save_serial_model
from distalex.model import build_model
from distalex.predict import classify_files, load_predictor
from distalex.predict import main as predict_main
from distalex.serving import Preprocessing, class_probabilities, eval_crops, training_settings
from tests.runs import REPO, launch, run_env, tiny_overrides, tiny_shards  # noqa: F401 - fixture

MODEL_CFG = ModelConfig(num_classes=10, width=0.125, image_size=64, dropout=0.2, init="kaiming")
RESIZE = 72
CLASSES = [f"n{i:08d}" for i in range(10)]
NAMES = [f"digit {i}" for i in range(10)]


def jpeg(seed: int, w: int = 90, h: int = 80) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def random_net(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MODEL_CFG).eval()


def stats_folder(folder: Path, pixel_mean: bool) -> Path:
    """A shard folder's ``_info.json`` with training statistics (and a mean image), as make_shards writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    stats = {"mean_rgb": [0.41, 0.52, 0.47], "std_rgb": [0.21, 0.18, 0.26]}
    if pixel_mean:
        ramp = np.linspace(0.2, 0.7, 256 * 256 * 3, dtype=np.float32).reshape(256, 256, 3)
        np.save(folder / "_mean_image.npy", ramp)
        stats["mean_image"] = "_mean_image.npy"
    info = {"classes": CLASSES, "class_names": NAMES, "splits": {}, "stats": stats}
    (folder / "_info.json").write_text(json.dumps(info))
    return folder


def run_config(shards: Path, mean: str, scale: str = "standardized"):
    return load_config(None, [f"data.train_shards={shards}", f"data.mean={mean}", f"data.resize={RESIZE}",
                              f"data.input_scale={scale}", "model.num_classes=10", "model.width=0.125",
                              "model.image_size=64"])


@pytest.fixture
def exported(tmp_path) -> Path:
    """A random net exported with its preprocessing and class names, as train.finish writes it."""
    cfg = run_config(stats_folder(tmp_path / "shards", pixel_mean=False), "channel")
    prep, names = training_settings(cfg)
    return save_serial_model(tmp_path / "model.pt", random_net().state_dict(), MODEL_CFG, CLASSES, names, prep)


# ------------------------------------------------------------------ fast: the preprocessing


@pytest.mark.parametrize("scale", ["standardized", "raw"])
@pytest.mark.parametrize("mean", ["channel", "pixel"])
@pytest.mark.parametrize("ten", [False, True])
def test_classifier_normalises_exactly_as_evaluation(tmp_path, mean, ten, scale):
    cfg = run_config(stats_folder(tmp_path / f"shards-{mean}", pixel_mean=mean == "pixel"), mean, scale)
    net = random_net()
    crops = torch.stack([eval_crops(jpeg(i), RESIZE, 64, ten) for i in range(3)])  # uint8
    with torch.no_grad():
        want = class_probabilities(net, normalize(crops, train=False, data_cfg=cfg.data))  # what evaluate computes
        prep, names = training_settings(cfg)
        got = prep.classifier(net, ten)(crops)
        as_float = prep.classifier(net, ten)(crops.float() / 255)
    assert torch.equal(got, want)
    assert torch.equal(as_float, want), "float input in [0, 1] must equal the uint8 input"
    assert names == NAMES and got.shape == (3, 10) and prep.input_scale == scale


def test_export_carries_preprocessing_and_names_through_weights_only_load(tmp_path):
    cfg = run_config(stats_folder(tmp_path / "shards", pixel_mean=True), "pixel")
    prep, names = training_settings(cfg)
    path = save_serial_model(tmp_path / "m.pt", random_net().state_dict(), MODEL_CFG, CLASSES, names, prep)
    blob = torch.load(path, weights_only=True)
    assert blob["class_names"] == NAMES and blob["classes"] == CLASSES
    back = Preprocessing.from_dict(blob["preprocessing"])
    assert (back.resize, back.image_size, back.mean_rgb, back.std_rgb) == (RESIZE, 64, prep.mean_rgb, prep.std_rgb)
    assert np.array_equal(back.mean_image, prep.mean_image)


def test_train_settings_need_the_training_statistics(tmp_path):
    from distalex.data.info import DataError

    with pytest.raises(DataError, match="nowhere"):
        training_settings(run_config(tmp_path / "nowhere", "channel"))


def test_mlflow_model_is_skipped_without_a_run_or_while_the_store_fails(tmp_path, monkeypatch):
    import time
    import warnings

    from distalex.parallel.dims import ParallelDims
    from distalex.serving import log_mlflow_model
    from distalex.tracking import NullTracker, Tracker, TrackingWarning

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = run_config(stats_folder(tmp_path / "shards", pixel_mean=False), "channel")
    prep, names = training_settings(cfg)
    args = (random_net(), prep, CLASSES, names)
    assert log_mlflow_model(NullTracker("a" * 32), *args, step=1) is None  # tracking off, or not rank 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start(load_config(None, [f"tracking.uri={uri}"]), ParallelDims(dp=1, tp=1, rank=0), tmp_path / "run")

    def down(*a, **k):  # a dead server, as in test_tracking: MLflow retries for a while, then raises
        time.sleep(1.0)
        raise ConnectionError("tracking store went away")

    tracker._client.log_batch = down
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.flush()  # this one fails: the tracker now knows the store is failing
        tracker.log_metrics({"train/loss": 0.5}, step=2)  # in finish: the model file's upload, pending
        t0 = time.perf_counter()
        assert log_mlflow_model(tracker, *args, step=2) is None
        assert time.perf_counter() - t0 < 2, "a failing store must not hold the end of the job"
        tracker.close()
    assert any("MLflow model of run" in str(w.message) and "not logged" in str(w.message)
               for w in caught if issubclass(w.category, TrackingWarning))
    client = mlflow.MlflowClient(uri)
    assert client.search_logged_models(experiment_ids=[client.get_run(tracker.run_id).info.experiment_id]) == []


# ------------------------------------------------------------------ fast: the command line


def run_predict(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        predict_main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_images_get_one_line_each_and_the_rest_are_classified(exported, tmp_path, capsys):
    good = [tmp_path / "a.jpg", tmp_path / "b.png"]
    good[0].write_bytes(jpeg(1))
    Image.open(io.BytesIO(jpeg(2))).save(good[1])
    garbage, truncated, folder = tmp_path / "garbage.jpg", tmp_path / "cut.jpg", tmp_path / "a-folder"
    garbage.write_bytes(b"not an image at all")
    truncated.write_bytes(jpeg(3, 400, 300)[:500])
    folder.mkdir()
    missing = tmp_path / "missing.jpg"
    args = [str(p) for p in (good[0], missing, garbage, good[1], truncated, folder)]
    code, out, err = run_predict([str(exported), *args, "--top", "3"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0] == f"error: {missing}: no such file"
    assert lines[1] == f"error: {garbage}: not a readable image (UnidentifiedImageError: cannot identify image file)"
    assert lines[2].startswith(f"error: {truncated}: not a readable image ("), lines[2]
    assert lines[3] == f"error: {folder}: is a folder, not an image file"
    assert lines[4] == "4 of 6 images could not be classified"
    # the readable ones, in order, each with its top 3 and the probabilities predict computes
    predictor = load_predictor(str(exported))
    want = dict(classify_files(predictor, [str(p) for p in good], False, 8, lambda p, why: None))
    blocks = out.strip().split("\n")
    assert [blocks[0], blocks[4]] == [str(good[0]), str(good[1])]
    for head in (0, 4):
        probs = want[blocks[head]]
        top = probs.topk(3)
        for row, (p, c) in enumerate(zip(top.values, top.indices), 1):
            assert blocks[head + row] == f"  {float(p):.4f}  digit {int(c)} (n{int(c):08d})"


def test_a_model_predict_cannot_use_is_one_clear_error(exported, tmp_path, capsys, monkeypatch):
    img = tmp_path / "a.jpg"
    img.write_bytes(jpeg(1))
    code, _, err = run_predict([str(tmp_path / "nope.pt"), str(img)], capsys)
    assert code == 2 and err.strip() == (f"error: {tmp_path / 'nope.pt'}: no such file or folder, and not an MLflow model "
                                         "URI (runs:/<run_id>/model) or run id (32 hex digits)")
    bare = save_serial_model(tmp_path / "bare.pt", random_net().state_dict(), MODEL_CFG, CLASSES)
    code, _, err = run_predict([str(bare), str(img)], capsys)
    assert code == 2 and f"{bare}: carries no preprocessing settings" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_predict(["runs:/0123456789abcdef0123456789abcdef/model", str(img)], capsys)
    assert code == 2 and "runs/mlflow.db: no MLflow database there" in err
    code, out, _ = run_predict(["--help"], capsys)
    assert code == 0 and "Exit status: 0 when every image was classified; 2 when" in out


# ------------------------------------------------------------------ fast: the docs' plain-torch snippet


def plain_torch_snippet() -> str:
    """The python block of docs/using-a-model.md's "Without distalex" section."""
    text = (REPO / "docs" / "using-a-model.md").read_text()
    section = text.split("\n## Without distalex\n", 1)[1]
    return section.split("```python demo\n", 1)[1].split("```", 1)[0]


def test_plain_torch_snippet_loads_the_weights_without_distalex(exported, tmp_path):
    snippet = plain_torch_snippet()
    assert "distalex" not in snippet.replace("distalex's", "")
    work = tmp_path / "plain"
    (work / "runs" / "demo").mkdir(parents=True)
    (work / "runs" / "demo" / "model.pt").write_bytes(exported.read_bytes())
    x = torch.randn(4, 3, 64, 64)
    torch.save(x, work / "x.pt")
    # -I: no PYTHONPATH, no user site, not the script's folder; the blocker stops the installed
    # package too, so any import of distalex in the snippet fails the run.
    script = ("import sys\nsys.modules['distalex'] = None\n" + snippet
              + "\nwith torch.no_grad():\n    torch.save(model(torch.load('x.pt')), 'logits.pt')\n")
    (work / "snippet.py").write_text(script)
    proc = subprocess.run([sys.executable, "-I", "snippet.py"], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = random_net()
    with torch.no_grad():
        want = net(x)
    assert torch.allclose(torch.load(work / "logits.pt"), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ slow: a real run, its MLflow model


REGISTERED = "tiny-digits"


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """Two short epochs of the demo config (tp=2, 2 ranks), its model registered; plus the val images."""
    workdir = tmp_path_factory.mktemp("predict-run")
    (workdir / "data").mkdir()
    (workdir / "data" / "shards").symlink_to(tiny_shards)  # relative in the config: data/shards
    proc = launch(workdir, tiny_overrides(tiny_shards, run_name="tiny", **{
        "tracking.register_as": REGISTERED, "data.train_shards": "data/shards", "data.val_shards": "data/shards"}))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run_id = re.search(r"MLflow model: runs:/(\w+)/model \(registered as tiny-digits\)", proc.stdout).group(1)
    val = sorted((tiny_shards.parent / "src" / "val").glob("*/*.JPEG"))
    return {"workdir": workdir, "run": workdir / "runs" / "tiny", "run_id": run_id, "val": val,
            "uri": f"sqlite:///{workdir / 'runs' / 'mlflow.db'}", "labels": [CLASSES.index(p.parent.name) for p in val],
            "evaluated": {}}


def evaluate_line(trained, ten: bool) -> str:
    """What ``python -m distalex.evaluate model.pt`` prints for the run (once per mode), run from a
    directory that holds neither the run nor its data: the model file names its validation shards."""
    if ten not in trained["evaluated"]:
        elsewhere = trained["workdir"].parent / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "distalex.evaluate", str(trained["run"] / "model.pt"), *(["--ten-crop"] if ten else [])],
            capture_output=True, text=True, env=run_env(), timeout=300, cwd=elsewhere,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        trained["evaluated"][ten] = [ln for ln in proc.stdout.splitlines() if "top-1 error" in ln][-1]
    return trained["evaluated"][ten]


def errors_of(probs: torch.Tensor, labels: list[int]) -> tuple[str, float]:
    """evaluate's summary, computed from predict's probabilities."""
    y = torch.tensor(labels)
    top5 = probs.topk(5, dim=1).indices
    top1_err = 1 - (top5[:, 0] == y).double().mean().item()
    top5_err = 1 - (top5 == y[:, None]).any(1).double().mean().item()
    loss = torch.nn.functional.nll_loss(probs.double().clamp_min(1e-12).log(), y).item()
    return f"top-1 error {100 * top1_err:.2f}%, top-5 error {100 * top5_err:.2f}%", loss


@pytest.mark.e2e
@pytest.mark.parametrize("ten", [False, True])
def test_predict_gives_evaluates_numbers_on_the_held_out_images(trained, ten):
    line = evaluate_line(trained, ten)
    paths = [str(p) for p in trained["val"]]
    predictor = load_predictor(str(trained["run"] / "model.pt"), ten)
    results = list(classify_files(predictor, paths, ten, 64, lambda p, why: pytest.fail(f"{p}: {why}")))
    probs = torch.stack([p for _, p in results])
    summary, loss = errors_of(probs, trained["labels"])
    assert f"{len(paths)} images: {summary}" in line, (summary, line)
    assert abs(loss - float(line.split("loss ")[1].split()[0])) <= 2e-6, (loss, line)
    # the checkpoint the model was exported from gives the same probabilities
    from_ckpt = load_predictor(str(trained["run"] / "checkpoints"), ten)
    again = torch.stack([p for _, p in classify_files(from_ckpt, paths, ten, 64, lambda p, why: None)])
    assert torch.allclose(again, probs, atol=1e-6)


@pytest.mark.e2e
def test_predict_command_line_reports_evaluates_top1_error(trained):
    paths = [str(p) for p in trained["val"]]
    proc = subprocess.run([sys.executable, "-m", "distalex.predict", str(trained["run"] / "model.pt"), *paths, "--top", "1"],
                          capture_output=True, text=True, env=run_env(), timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0::2] == paths
    hits = [f"(n{label:08d})" in top for top, label in zip(lines[1::2], trained["labels"])]
    top1_err = 100 * (1 - sum(hits) / len(hits))
    assert f"top-1 error {top1_err:.2f}%" in evaluate_line(trained, ten=False)


@pytest.mark.e2e
def test_mlflow_model_gives_predicts_probabilities(trained, monkeypatch):
    from mlflow.models import Model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    mlflow.set_tracking_uri(trained["uri"])
    uri = f"runs:/{trained['run_id']}/model"
    paths = [str(p) for p in trained["val"][:12]]
    predictor = load_predictor(str(trained["run"] / "model.pt"))
    want = torch.stack([p for _, p in classify_files(predictor, paths, False, 64, lambda p, why: None)])
    crops = np.stack([predictor.crops(Path(p).read_bytes(), False).numpy() for p in paths])  # uint8 (12, 3, 64, 64)
    got = mlflow.pyfunc.load_model(uri).predict(crops)
    assert got.dtype == np.float32 and got.shape == (12, 10)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    # predict itself, from the MLflow model, centre and ten crops
    via_mlflow = load_predictor(uri)
    assert via_mlflow.class_names == NAMES and via_mlflow.classes == CLASSES
    got = torch.stack([p for _, p in classify_files(via_mlflow, paths, False, 64, lambda p, why: None)])
    assert torch.allclose(got, want, atol=1e-5)
    ten_want = torch.stack([p for _, p in classify_files(load_predictor(str(trained["run"] / "model.pt"), True),
                                                         paths, True, 64, lambda p, why: None)])
    ten_got = torch.stack([p for _, p in classify_files(load_predictor(uri, True), paths, True, 64, lambda p, why: None)])
    assert torch.allclose(ten_got, ten_want, atol=1e-5)
    # what the model says about itself, and its registration
    model = Model.load(uri)
    spec = model.signature.inputs.inputs[0]
    assert (spec.type, spec.shape) == (np.dtype(np.uint8), (-1, 3, 64, 64))
    assert model.metadata["preprocessing"]["resize"] == RESIZE and model.metadata["class_names"] == NAMES
    # distalex rebuilds the net from the graph's weights and the metadata's model config (evaluate, report)
    from distalex.model_source import load_source

    rebuilt, exported = load_source(uri), load_source(str(trained["run"] / "model.pt"))
    assert rebuilt.model_config == exported.model_config and rebuilt.run_id == trained["run_id"]
    assert rebuilt.state.keys() == exported.state.keys()
    assert all(torch.equal(rebuilt.state[k], exported.state[k]) for k in exported.state)
    assert rebuilt.cfg is not None and rebuilt.cfg.data.val_shards == str(trained["workdir"] / "data" / "shards")
    versions = mlflow.MlflowClient(trained["uri"]).search_model_versions(f"name = '{REGISTERED}'")
    assert [v.run_id for v in versions] == [trained["run_id"]]
    registered = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1").predict(crops)
    np.testing.assert_allclose(registered, want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.e2e
def test_mlflow_models_predict_command_line_against_the_local_store(trained, tmp_path):
    paths = [str(p) for p in trained["val"][:4]]
    predictor = load_predictor(str(trained["run"] / "model.pt"))
    want = torch.stack([p for _, p in classify_files(predictor, paths, False, 64, lambda p, why: None)])
    crops = [predictor.crops(Path(p).read_bytes(), False).tolist() for p in paths]
    (tmp_path / "images.json").write_text(json.dumps({"inputs": crops}))
    env = run_env(MLFLOW_TRACKING_URI=trained["uri"])
    cli = Path(sys.executable).with_name("mlflow")  # the console script of this Python's mlflow
    proc = subprocess.run(
        [str(cli) if cli.exists() else "mlflow", "models", "predict", "-m", f"runs:/{trained['run_id']}/model", "-i", "images.json", "-o", "out.json",
         "--env-manager", "local"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.float32)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
