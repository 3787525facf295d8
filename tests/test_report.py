"""The report's pictures: kernel grid per tower, colour statistic, curves, 10-crop; clear errors.

The run-level tests use one real tiny training run (tp=2 under torchrun, one epoch of the demo
config shortened): its checkpoint holds each tower's kernels in a different shard file, its MLflow
run has the loop's metrics and the exported model, and the loop logged the kernel statistic.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distalex import report
from distalex.report import cli as report_cli
from distalex.report import curves as report_curves
from distalex.report import kernels as report_kernels
from distalex.report import ten_crop as report_ten_crop
from distalex.config import Config, ModelConfig
from distalex.data.info import read_info
from distalex.export import save_serial_model
from distalex.model import AlexNet
from distalex.model_source import load_source
from tests.runs import launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture

def read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000, f"{path}: missing or empty"
    return np.asarray(Image.open(path).convert("RGB"))


def expected_pixels(kernel: torch.Tensor) -> np.ndarray:
    """(3, k, k) -> (k, k, 3) uint8: the documented display normalisation, min-max over the kernel."""
    w = kernel.detach().double()
    v = (w - w.min()) / (w.max() - w.min())
    return (v * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def kernel_in_png(png: np.ndarray, layout: report_kernels.KernelLayout, k: int) -> np.ndarray:
    """The k-th kernel as drawn, shrunk back to k x k; asserts each magnified pixel is uniform."""
    left, top, right, bottom = layout.box(k)
    cell = png[top:bottom, left:right]
    z = report_kernels.ZOOM
    small = cell[::z, ::z]
    assert np.array_equal(cell, small.repeat(z, axis=0).repeat(z, axis=1)), f"kernel {k}: not a clean {z}x zoom"
    return small


def assert_grid_holds(png: np.ndarray, conv1: torch.Tensor, towers: int) -> None:
    """Block t of the picture shows exactly tower t's kernels, in order."""
    layout = report_kernels.kernel_layout(conv1.shape, towers)
    assert png.shape == (layout.height, layout.width, 3)
    per = conv1.shape[0] // towers
    for t in range(towers):
        for i in range(per):
            k = t * per + i
            assert np.array_equal(kernel_in_png(png, layout, k), expected_pixels(conv1[k])), f"tower {t} kernel {i}"


# ------------------------------------------------------------------ the colour statistic


def test_colour_energy_is_zero_for_grey_and_grows_with_colour():
    g = torch.Generator().manual_seed(0)
    grey = torch.randn(1, 1, 11, 11, generator=g, dtype=torch.float64).expand(1, 3, 11, 11)  # R = G = B everywhere
    raw = torch.randn(1, 3, 11, 11, generator=g, dtype=torch.float64)
    colour = raw - raw.mean(dim=1, keepdim=True)  # no grey component at any pixel
    alphas = [0.0, 0.05, 0.2, 0.5, 1.0, 3.0, 10.0]
    values = report_kernels.colour_energy(torch.cat([grey + a * colour for a in alphas])).tolist()
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a for a, b in zip(values, values[1:])), values
    # exact: ||a c||^2 / (||g||^2 + ||a c||^2), because c is orthogonal to the grey axis
    for a, v in zip(alphas, values):
        cc, gg = (a * colour).square().sum().item(), grey.square().sum().item()
        assert v == pytest.approx(cc / (gg + cc), rel=1e-9)
    assert report_kernels.colour_energy(colour).item() == pytest.approx(1.0)
    mixed = grey + 0.5 * colour
    assert report_kernels.colour_energy(37.0 * mixed).item() == pytest.approx(report_kernels.colour_energy(mixed).item())  # scale-free
    assert report_kernels.colour_energy(torch.zeros(1, 3, 11, 11)).item() == 0.0
    random = report_kernels.colour_energy(torch.randn(4000, 3, 11, 11, generator=g))
    assert random.mean().item() == pytest.approx(report_kernels.RANDOM_COLOUR_ENERGY, abs=0.01)


def test_grey_tower_and_colour_tower_metrics_and_pixels(tmp_path):
    """The paper's Figure 3 in miniature: tower 0 grey, tower 1 coloured."""
    g = torch.Generator().manual_seed(1)
    per = 8
    grey = torch.randn(per, 1, 11, 11, generator=g).expand(per, 3, 11, 11)
    coloured = torch.randn(per, 3, 11, 11, generator=g) * torch.tensor([1.0, 0.1, -0.6]).view(1, 3, 1, 1)
    w = torch.cat([grey, coloured]).contiguous()
    metrics = report_kernels.kernel_summary(w, 2, tmp_path / "k.png")
    assert metrics["kernels/tower0_colour_energy"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["kernels/tower1_colour_energy"] > 0.3
    assert metrics["kernels/colour_energy_gap"] == pytest.approx(metrics["kernels/tower1_colour_energy"])
    png = read_png(tmp_path / "k.png")
    layout = report_kernels.kernel_layout(w.shape, 2)
    for k in range(2 * per):
        drawn = kernel_in_png(png, layout, k).astype(int)
        is_grey = (drawn[..., 0] == drawn[..., 1]).all() and (drawn[..., 1] == drawn[..., 2]).all()
        assert is_grey == (k < per), f"kernel {k}"


# ------------------------------------------------------------------ the kernel grid


@pytest.mark.parametrize("towers,width", [(2, 1.0), (2, 0.5), (4, 0.125), (1, 0.25)])
def test_kernel_grid_blocks_hold_exactly_each_towers_kernels(tmp_path, towers, width):
    torch.manual_seed(towers)
    conv1 = AlexNet(num_classes=10, towers=towers, width=width, image_size=63).conv1.weight
    metrics = report_kernels.kernel_summary(conv1, towers, tmp_path / "k.png")
    assert_grid_holds(read_png(tmp_path / "k.png"), conv1, towers)
    per = conv1.shape[0] // towers
    for t in range(towers):
        tower_mean = report_kernels.colour_energy(conv1[t * per : (t + 1) * per]).mean().item()
        assert metrics[f"kernels/tower{t}_colour_energy"] == pytest.approx(tower_mean)
    assert ("kernels/colour_energy_gap" in metrics) == (towers > 1)


def test_paper_size_picture_is_documented_size_and_fast(tmp_path):
    conv1 = AlexNet().conv1.weight  # (96, 3, 11, 11)
    report_kernels.kernel_summary(conv1, 2, tmp_path / "warm.png")  # first call loads fonts
    t0 = time.perf_counter()
    report_kernels.kernel_summary(conv1, 2, tmp_path / "k.png")
    elapsed = time.perf_counter() - t0
    assert Image.open(tmp_path / "k.png").size == (758, 494)  # the module docstring's numbers
    assert elapsed < 1.0, f"kernel_summary took {elapsed:.2f} s for 96 kernels"


def test_kernel_summary_rejects_a_weight_that_is_not_conv1(tmp_path):
    with pytest.raises(report.ReportError, match="not divisible into towers=2"):
        report_kernels.kernel_summary(torch.zeros(5, 3, 11, 11), 2, tmp_path / "k.png")
    with pytest.raises(report.ReportError, match=r"\(kernels, 3, k, k\)"):
        report_kernels.kernel_summary(torch.zeros(4, 48, 5, 5), 2, tmp_path / "k.png")


# ------------------------------------------------------------------ a tiny tp=2 run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_shards):
    """One epoch (7 steps) of the demo config shortened, tp=2 on 2 gloo ranks under torchrun.

    The shards are given as a relative path (data/shards in the run's directory) and the MLflow
    store is the default sqlite file there, so the report must find both from the checkpoint alone.
    """
    import mlflow

    from distalex.checkpoint import complete_checkpoints, read_meta

    workdir = tmp_path_factory.mktemp("report-run")
    (workdir / "data").mkdir()
    (workdir / "data" / "shards").symlink_to(tiny_shards)
    overrides = tiny_overrides(tiny_shards, run_name="tiny", **{
        "train.epochs": 1, "data.train_shards": "data/shards", "data.val_shards": "data/shards",
        "tracking.system_metrics_interval_s": 1,
    })
    proc = launch(workdir, overrides)
    assert proc.returncode == 0, f"tiny run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run = workdir / "runs" / "tiny"
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    run_id = read_meta(ckpt)["train_state"]["mlflow_run_id"]
    uri = f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"
    assert run_id and mlflow.tracking.MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    return {"workdir": workdir, "ckpt": ckpt, "model_pt": run / "model.pt", "run_id": run_id, "uri": uri}


def shard_kernels(ckpt: Path) -> list[torch.Tensor]:
    """conv1 as each tp rank saved it: model-tp00.pt holds tower 0's kernels, model-tp01.pt tower 1's."""
    return [torch.load(ckpt / f"model-tp{r:02d}.pt", weights_only=True)["model"]["conv1.weight"] for r in range(2)]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        report_cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.e2e
def test_report_on_tp2_checkpoint_writes_all_three_pictures(tiny, tmp_path, capsys, monkeypatch):
    """From a directory that holds neither the run nor its data (the run's config named them relative
    to its own): the checkpoint names its store and its shards by absolute path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([str(tiny["ckpt"].parent), "--out", "pictures", "--num-images", "3", "--no-upload"], capsys)
    assert code == 0, err
    assert "skipped" not in out and "uploaded" not in out, out
    tmp_path = tmp_path / "pictures"
    layout = report_kernels.kernel_layout(torch.cat(shard_kernels(tiny["ckpt"])).shape, 2)
    assert read_png(tmp_path / "kernels.png").shape == (layout.height, layout.width, 3)
    assert read_png(tmp_path / "curves.png").shape == (800, 1500, 3)
    assert read_png(tmp_path / "ten_crop.png").shape == (40 + 190 * 3, 1600, 3)


@pytest.mark.e2e
def test_tp2_checkpoint_blocks_are_the_ranks_shards(tiny, tmp_path, capsys):
    """Tower t's block shows exactly the kernels that tp rank t saved."""
    assert run_cli([str(tiny["ckpt"]), "--out", str(tmp_path)], capsys)[0] == 0
    per_rank = shard_kernels(tiny["ckpt"])
    assert per_rank[0].shape == (6, 3, 11, 11) and not torch.equal(per_rank[0], per_rank[1])
    assert_grid_holds(read_png(tmp_path / "kernels.png"), torch.cat(per_rank), towers=2)


@pytest.mark.e2e
def test_tp2_checkpoint_and_its_export_give_the_same_picture(tiny, tmp_path, capsys):
    from distalex.export import main as export_main

    exported = tmp_path / "exported.pt"
    export_main([str(tiny["ckpt"]), str(exported)])
    sources = {"ckpt": tiny["ckpt"], "export": exported, "loop_export": tiny["model_pt"], "run": tiny["run_id"]}
    pictures = {}
    for name, src in sources.items():
        code, out, err = run_cli([str(src), "--out", str(tmp_path / name), "--tracking-uri", tiny["uri"]], capsys)
        assert code == 0, err
        pictures[name] = read_png(tmp_path / name / "kernels.png")
    # Only the title line names the source; everything below it is identical.
    below = report_kernels.TITLE_H
    for name in ("export", "loop_export", "run"):  # "run": through the run's model.pt artifact
        assert np.array_equal(pictures["ckpt"][below:], pictures[name][below:]), name
    assert not np.array_equal(pictures["ckpt"][:below], pictures["export"][:below])


@pytest.mark.e2e
def test_loop_logged_the_kernel_statistic_of_its_weights(tiny):
    """Item 2: at the epoch end the loop logged kernel_summary's metrics and picture to MLflow."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tiny["uri"])
    histories = report_curves.read_histories(client, tiny["run_id"])
    assert len(histories["train/loss"]) >= 3 and len(histories["val/top1_error"]) == 1
    expected = report_kernels.kernel_metrics(report_kernels.tower_colour_energy(torch.cat(shard_kernels(tiny["ckpt"])), 2))
    for name, value in expected.items():
        (step, logged), = histories[name]
        assert step == 7 and logged == pytest.approx(value, rel=1e-6), name
    kernels = [a.path for a in client.list_artifacts(tiny["run_id"], "kernels")]
    assert kernels and all(p.endswith(".png") for p in kernels)


@pytest.mark.e2e
def test_the_mlflow_run_holds_system_metrics_datasets_and_the_reports_pictures(tiny, tiny_shards, tmp_path, capsys,
                                                                             monkeypatch):
    """What a researcher opens: the run's system metrics for this host (one sampler: each step once),
    the two shard splits as its datasets (source and the digest of their _info.json), and, once
    the report has run, its pictures as report/*.png, read back through MLflow's client."""
    import hashlib
    import json
    import socket

    import mlflow

    client = mlflow.tracking.MlflowClient(tiny["uri"])
    run = client.get_run(tiny["run_id"])
    host = socket.gethostname()
    assert {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")} == {host}
    for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        steps = [m.step for m in client.get_metric_history(tiny["run_id"], f"system/{host}/{metric}")]
        assert len(steps) >= 2 and sorted(steps) == list(range(len(steps))), steps
    digest = hashlib.sha256((tiny_shards / "_info.json").read_bytes()).hexdigest()[:32]
    shards = tiny["workdir"] / "data" / "shards"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["data/shards/train", "data/shards/val"]
    for split, context in (("train", "training"), ("val", "validation")):
        given = inputs[f"data/shards/{split}"]
        assert given.dataset.digest == digest and given.dataset.source_type == "webdataset"
        assert json.loads(given.dataset.source)["uri"] == str(shards)
        assert json.loads(given.dataset.profile)["samples"] == sum(read_info(shards).splits[split].shards.values())
        assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", context)]
    drawn_with = []  # the names the 10-crop picture gets (the picture itself: test_the_ten_crop_picture_names_...)
    real_plot = report_cli.plot_ten_crop
    monkeypatch.setattr(report_cli, "plot_ten_crop", lambda r, e, names, png: drawn_with.append(names) or real_plot(r, e, names, png))
    code, out, err = run_cli([str(tiny["ckpt"]), "--out", str(tmp_path), "--num-images", "2"], capsys)
    assert code == 0 and f"uploaded: MLflow run {tiny['run_id']}: report/kernels.png" in out, out + err
    assert drawn_with == [[f"digit {c}" for c in range(10)]]
    logged = sorted(a.path for a in client.list_artifacts(tiny["run_id"], "report"))
    assert logged == ["report/curves.png", "report/kernels.png", "report/ten_crop.png"]
    back = Path(client.download_artifacts(tiny["run_id"], "report/ten_crop.png", str(tmp_path / "back")))
    assert back.read_bytes() == (tmp_path / "ten_crop.png").read_bytes()


def test_the_ten_crop_picture_names_classes_as_predict_does():
    g = torch.Generator().manual_seed(0)
    crop_probs = torch.softmax(torch.randn(2, 10, 10, generator=g), dim=-1)
    result = report_ten_crop.TenCropResult(np.zeros((2, 10, 8, 8, 3), np.uint8), crop_probs.mean(1), crop_probs)
    examples = [report_ten_crop.Example(b"", 3, "a.jpg"), report_ten_crop.Example(b"", None, "b.jpg")]
    names = [f"digit {c}" for c in range(10)]
    fig = report_ten_crop.ten_crop_figure(result, examples, names)
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_xlabel()] + [t.get_text() for t in ax.get_yticklabels()]
    assert "a.jpg    true: digit 3" in texts and "b.jpg    true: unknown" in texts
    top = result.probs[0].topk(5).indices.tolist()
    assert [f"digit {c}" for c in top] in [texts[i : i + 5] for i in range(len(texts))]
    assert not [t for t in texts if "n0000" in t or "class " in t]


@pytest.mark.e2e
def test_run_id_and_the_runs_model_file_give_all_three_pictures(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny["uri"])  # the run id form reads the environment
    code, out, err = run_cli([tiny["run_id"], "--out", str(tmp_path / "run"), "--num-images", "1", "--no-upload"], capsys)
    assert code == 0 and "skipped" not in out, out + err  # model.pt and config.yaml artifacts: all three
    assert read_png(tmp_path / "run" / "curves.png").shape == (800, 1500, 3)
    assert read_png(tmp_path / "run" / "ten_crop.png").shape == (40 + 190, 1600, 3)
    # the model file training writes names its run, store and validation shards
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code, out, err = run_cli([str(tiny["model_pt"]), "--out", str(tmp_path / "export"), "--num-images", "1",
                              "--no-upload"], capsys)
    assert code == 0 and "skipped" not in out, out + err
    # a model file exported without them says what it lacks
    bare = save_serial_model(tmp_path / "bare.pt", load_source(str(tiny["model_pt"])).state, ModelConfig(
        **load_source(str(tiny["model_pt"])).model_config))
    code, out, err = run_cli([str(bare), "--out", str(tmp_path / "bare")], capsys)
    assert code == 0 and "curves: skipped: the model file names no MLflow run" in out
    assert "ten_crop: skipped: no validation images" in out
    assert not (tmp_path / "bare" / "curves.png").exists()


def test_curves_cover_every_metric_the_run_has():
    available = ["train/loss", "train/lr", "val/top1_error", "kernels/tower1_colour_energy", "kernels/tower0_colour_energy",
                 "train/skipped_samples", "epoch"]
    assert report_curves.curve_metric_names(available) == [
        "train/loss", "val/top1_error", "train/lr", "kernels/tower0_colour_energy", "kernels/tower1_colour_energy"]


def test_resumed_steps_keep_the_value_logged_last():
    """A job resumed from step 4 logs steps 5.. again; the curve follows the later values."""
    from types import SimpleNamespace as NS

    history = [NS(step=s, value=float(s), timestamp=s) for s in range(1, 8)]
    history += [NS(step=s, value=-float(s), timestamp=100 + s) for s in range(5, 10)]

    class Client:
        def get_run(self, run_id):
            return NS(data=NS(metrics={"train/loss": 0.0, "train/skipped_samples": 0.0}))

        def get_metric_history(self, run_id, name):
            assert name == "train/loss"
            return history

    assert report_curves.read_histories(Client(), "r") == {
        "train/loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)] + [(s, -float(s)) for s in range(5, 10)]}


@pytest.mark.e2e
def test_ten_crop_from_image_files(tiny, tiny_shards, tmp_path, capsys):
    from distalex.data.info import read_info
    from distalex.data.loader import Segment, parse_sample, read_segment

    # two validation JPEGs, filed under their class folders as in an ImageNet val/ layout
    info = read_info(tiny_shards)
    name = next(iter(info.splits["val"].shards))
    samples = list(read_segment(Segment(str(tiny_shards / name), 0, 2), lambda n, why: None))
    for key, members in samples:
        data, label = parse_sample(key, members)
        folder = tmp_path / "images" / info.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(data)
    examples = report_ten_crop.examples_from_files([str(tmp_path / "images")], 5, info.classes)
    assert sorted(e.label for e in examples) == sorted(parse_sample(k, m)[1] for k, m in samples)
    source = load_source(str(tiny["model_pt"]))
    data_cfg = Config.model_validate({"data": {"train_shards": str(tiny_shards)}}).data
    result = report_ten_crop.ten_crop_predict(source.model(), examples, 72, source.normalizer(data_cfg, ten=True))
    assert result.crops.shape == (2, 10, 64, 64, 3)
    assert torch.allclose(result.probs, result.crop_probs.mean(1))
    assert torch.allclose(result.probs.sum(1), torch.ones(2, dtype=result.probs.dtype))
    # the centre patch is what the evaluation's loader feeds the model for a centre-crop pass
    from distalex.data.augment import centre_crop, centre_square

    assert np.array_equal(result.crops[0, 4], centre_crop(centre_square(examples[0].data, 72), 64))
    code, out, err = run_cli([str(tiny["model_pt"]), "--out", str(tmp_path / "o"), "--images", str(tmp_path / "images"),
                              "--resize", "72", "--no-upload"], capsys)
    assert code == 0, err
    assert read_png(tmp_path / "o" / "ten_crop.png").shape == (40 + 190 * 2, 1600, 3)


# ------------------------------------------------------------------ clear errors, no tracebacks


@pytest.mark.e2e
def test_missing_run_is_a_clear_error(tiny, tmp_path, capsys):
    code, out, err = run_cli(["0123456789abcdef0123456789abcdef", "--tracking-uri", tiny["uri"], "--out", str(tmp_path)], capsys)
    assert code == 2 and "0123456789abcdef0123456789abcdef not found" in err and "Traceback" not in err
    code, out, err = run_cli([tiny["run_id"], "--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"], capsys)
    assert code == 2 and "no MLflow database" in err
    assert not (tmp_path / "nope.db").exists()  # no empty store created by mistake


@pytest.mark.e2e
def test_checkpoint_without_conv1_is_a_clear_error(tiny, tmp_path, capsys):
    import json
    import shutil

    from tests.test_checkpoint import rewrite

    broken = tmp_path / "step-00000002"
    shutil.copytree(tiny["ckpt"], broken)
    for shard in broken.glob("model-tp*.pt"):  # rewritten with their checksums: whole, just without conv1
        blob = torch.load(shard, weights_only=True)
        del blob["model"]["conv1.weight"]
        rewrite(broken, shard.name, blob)
    meta = json.loads((broken / "meta.json").read_text())
    del meta["partition"]["conv1.weight"]
    (broken / "meta.json").write_text(json.dumps(meta))
    code, out, err = run_cli([str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no conv1.weight" in err, err
    # a shard that lacks it while meta.json still lists it
    meta["partition"] = json.loads((tiny["ckpt"] / "meta.json").read_text())["partition"]
    (broken / "meta.json").write_text(json.dumps(meta))
    code, out, err = run_cli([str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "conv1.weight" in err, err


@pytest.mark.e2e
def test_moved_checkpoint_still_gives_everything_and_moved_data_is_named(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no runs/mlflow.db in the working directory either (make demo leaves one)
    moved = tmp_path / "elsewhere" / tiny["ckpt"].name
    shutil.copytree(tiny["ckpt"], moved)  # without the run's data/ and runs/ beside it
    code, out, err = run_cli([str(moved), "--out", str(tmp_path / "o"), "--no-upload"], capsys)
    assert code == 0 and "skipped" not in out, out + err  # absolute paths to the store and the shards
    # the run's data and store gone: kernels still, the rest skipped with what to pass
    data, runs = tiny["workdir"] / "data", tiny["workdir"] / "runs"
    data.rename(tmp_path / "data-aside")
    runs.rename(tmp_path / "runs-aside")
    try:
        code, out, err = run_cli([str(moved), "--out", str(tmp_path / "o"), "--no-upload"], capsys)
        evaluated = subprocess.run([sys.executable, "-m", "distalex.evaluate", str(tmp_path / "runs-aside" / "tiny" / "model.pt")],
                                   capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "data-aside").rename(data)
        (tmp_path / "runs-aside").rename(runs)
    assert code == 0, err
    assert read_png(tmp_path / "o" / "kernels.png").size > 0
    assert "curves: skipped: " in out and "no MLflow database" in out
    assert "ten_crop: skipped: " in out and "not found" in out and "--val-shards" in out
    assert evaluated.returncode == 2 and evaluated.stderr.count("\n") == 1, evaluated.stderr
    assert f"data.val_shards='{data / 'shards'}'" in evaluated.stderr and "pass --set data.val_shards=" in evaluated.stderr
    # naming the images explicitly makes a bad path an error, not a skip
    code, out, err = run_cli([str(moved), "--out", str(tmp_path / "o"), "--val-shards", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere" in err


@pytest.mark.e2e
def test_unreadable_and_missing_files_are_clear_errors(tiny, tmp_path, capsys):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a torch file at all")
    code, out, err = run_cli([str(junk)], capsys)
    assert code == 2 and "not a readable model file" in err
    no_conv1 = save_serial_model(tmp_path / "partial.pt", {"fc8.weight": torch.zeros(10, 4)}, ModelConfig(num_classes=10))
    code, out, err = run_cli([str(no_conv1)], capsys)
    assert code == 2 and "conv1.weight" in err
    code, out, err = run_cli([str(tmp_path / "does-not-exist")], capsys)
    assert code == 2 and "no such file or folder" in err
    code, out, err = run_cli([str(tmp_path)], capsys)  # a folder with no checkpoint in it
    assert code == 2 and "no complete checkpoint" in err


def test_cli_error_is_one_line_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "distalex.report", "/nonexistent/run"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: /nonexistent/run: no such file or folder"), proc.stderr
