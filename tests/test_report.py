"""The report's pictures: kernel grid per tower, colour statistic, curves, 10-crop; clear errors.

A tp=2 checkpoint is written here by the project's own pieces (init_parallel, the training loop's
build_parallel_model, the DDP engine, CheckpointManager) on 2 gloo processes after two SGD steps,
so each tower's kernels live in a different shard file; its MLflow run is a sqlite store with the
loop's metric names and the exported model as an artifact.
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
from distalex.config import Config, ModelConfig
from distalex.export import save_serial_model
from distalex.model import AlexNet
from tests.distributed import run_workers

CLASSES = [f"n{i:08d}" for i in range(10)]


def read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000, f"{path}: missing or empty"
    return np.asarray(Image.open(path).convert("RGB"))


def expected_pixels(kernel: torch.Tensor) -> np.ndarray:
    """(3, k, k) -> (k, k, 3) uint8: the documented display normalisation, min-max over the kernel."""
    w = kernel.detach().double()
    v = (w - w.min()) / (w.max() - w.min())
    return (v * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def kernel_in_png(png: np.ndarray, layout: report.KernelLayout, k: int) -> np.ndarray:
    """The k-th kernel as drawn, shrunk back to k x k; asserts each magnified pixel is uniform."""
    left, top, right, bottom = layout.box(k)
    cell = png[top:bottom, left:right]
    z = report.ZOOM
    small = cell[::z, ::z]
    assert np.array_equal(cell, small.repeat(z, axis=0).repeat(z, axis=1)), f"kernel {k}: not a clean {z}x zoom"
    return small


def assert_grid_holds(png: np.ndarray, conv1: torch.Tensor, towers: int) -> None:
    """Block t of the picture shows exactly tower t's kernels, in order."""
    layout = report.kernel_layout(conv1.shape, towers)
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
    values = report.colour_energy(torch.cat([grey + a * colour for a in alphas])).tolist()
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a for a, b in zip(values, values[1:])), values
    # exact: ||a c||^2 / (||g||^2 + ||a c||^2), because c is orthogonal to the grey axis
    for a, v in zip(alphas, values):
        cc, gg = (a * colour).square().sum().item(), grey.square().sum().item()
        assert v == pytest.approx(cc / (gg + cc), rel=1e-9)
    assert report.colour_energy(colour).item() == pytest.approx(1.0)
    mixed = grey + 0.5 * colour
    assert report.colour_energy(37.0 * mixed).item() == pytest.approx(report.colour_energy(mixed).item())  # scale-free
    assert report.colour_energy(torch.zeros(1, 3, 11, 11)).item() == 0.0
    random = report.colour_energy(torch.randn(4000, 3, 11, 11, generator=g))
    assert random.mean().item() == pytest.approx(report.RANDOM_COLOUR_ENERGY, abs=0.01)


def test_grey_tower_and_colour_tower_metrics_and_pixels(tmp_path):
    """The paper's Figure 3 in miniature: tower 0 grey, tower 1 coloured."""
    g = torch.Generator().manual_seed(1)
    per = 8
    grey = torch.randn(per, 1, 11, 11, generator=g).expand(per, 3, 11, 11)
    coloured = torch.randn(per, 3, 11, 11, generator=g) * torch.tensor([1.0, 0.1, -0.6]).view(1, 3, 1, 1)
    w = torch.cat([grey, coloured]).contiguous()
    metrics = report.kernel_summary(w, 2, tmp_path / "k.png")
    assert metrics["kernels/tower0_colour_energy"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["kernels/tower1_colour_energy"] > 0.3
    assert metrics["kernels/colour_energy_gap"] == pytest.approx(metrics["kernels/tower1_colour_energy"])
    png = read_png(tmp_path / "k.png")
    layout = report.kernel_layout(w.shape, 2)
    for k in range(2 * per):
        drawn = kernel_in_png(png, layout, k).astype(int)
        is_grey = (drawn[..., 0] == drawn[..., 1]).all() and (drawn[..., 1] == drawn[..., 2]).all()
        assert is_grey == (k < per), f"kernel {k}"


# ------------------------------------------------------------------ the kernel grid


@pytest.mark.parametrize("towers,width", [(2, 1.0), (2, 0.5), (4, 0.125), (1, 0.25)])
def test_kernel_grid_blocks_hold_exactly_each_towers_kernels(tmp_path, towers, width):
    torch.manual_seed(towers)
    conv1 = AlexNet(num_classes=10, towers=towers, width=width, image_size=63).conv1.weight
    metrics = report.kernel_summary(conv1, towers, tmp_path / "k.png")
    assert_grid_holds(read_png(tmp_path / "k.png"), conv1, towers)
    per = conv1.shape[0] // towers
    for t in range(towers):
        tower_mean = report.colour_energy(conv1[t * per : (t + 1) * per]).mean().item()
        assert metrics[f"kernels/tower{t}_colour_energy"] == pytest.approx(tower_mean)
    assert ("kernels/colour_energy_gap" in metrics) == (towers > 1)


def test_paper_size_picture_is_documented_size_and_fast(tmp_path):
    conv1 = AlexNet().conv1.weight  # (96, 3, 11, 11)
    report.kernel_summary(conv1, 2, tmp_path / "warm.png")  # first call loads fonts
    t0 = time.perf_counter()
    report.kernel_summary(conv1, 2, tmp_path / "k.png")
    elapsed = time.perf_counter() - t0
    assert Image.open(tmp_path / "k.png").size == (758, 494)  # the module docstring's numbers
    assert elapsed < 1.0, f"kernel_summary took {elapsed:.2f} s for 96 kernels"


def test_kernel_summary_rejects_a_weight_that_is_not_conv1(tmp_path):
    with pytest.raises(report.ReportError, match="not divisible into towers=2"):
        report.kernel_summary(torch.zeros(5, 3, 11, 11), 2, tmp_path / "k.png")
    with pytest.raises(report.ReportError, match=r"\(kernels, 3, k, k\)"):
        report.kernel_summary(torch.zeros(4, 48, 5, 5), 2, tmp_path / "k.png")


# ------------------------------------------------------------------ a tiny tp=2 run


def _tp2_checkpoint(cfg_dict: dict, run_id: str) -> dict:
    """On each of 2 ranks: the loop's model (this rank's tower), 2 SGD steps, then a checkpoint."""
    from distalex.checkpoint import CheckpointManager, RandomStreams, TrainState
    from distalex.engine import build_engine
    from distalex.parallel.dims import init_parallel
    from distalex.train import build_parallel_model

    cfg = Config.model_validate(cfg_dict)
    dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu")
    model = build_parallel_model(cfg, dims)
    engine = build_engine(model, cfg, dims)
    g = torch.Generator().manual_seed(5)  # the same batch on both ranks
    for _ in range(2):
        x = torch.randn(8, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
        y = torch.randint(0, cfg.model.num_classes, (8,), generator=g)
        engine.train_step(x, y)
    path = CheckpointManager(cfg, dims, CLASSES).save(engine, TrainState(step=2, mlflow_run_id=run_id), RandomStreams())
    return {"path": str(path), "conv1": model.conv1.weight.detach().clone()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from distalex.data.demo import write_demo
    from distalex.data.make_shards import make_shards

    root = tmp_path_factory.mktemp("report-data")
    write_demo(root / "src", train_per_class=3, val_per_class=2, size=80)
    make_shards(root / "src", root / "shards", max_count=20, stats_samples=30)
    return root / "shards"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shards):
    """A tp=2 checkpoint, its exported serial model, and its MLflow run (metrics + model artifact)."""
    import mlflow

    root = tmp_path_factory.mktemp("report-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("distalex", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="tiny").info.run_id

    cfg = Config.model_validate({
        "run_name": "tiny",
        "model": {"num_classes": 10, "towers": 2, "width": 0.125, "image_size": 64},
        "parallel": {"tp": 2, "device": "cpu"},
        "data": {"train_shards": str(shards), "val_shards": str(shards), "resize": 72},
        "checkpoint": {"dir": str(root / "runs" / "tiny" / "checkpoints")},
        "tracking": {"uri": uri},
    })
    ranks = run_workers(_tp2_checkpoint, 2, cfg.model_dump(), run_id)
    ckpt = Path(ranks[0]["path"])

    from distalex.checkpoint import load_serial_state

    state, ckpt_cfg, classes = load_serial_state(ckpt)
    model_pt = save_serial_model(root / "model.pt", state, ckpt_cfg.model, classes)

    metrics = {
        "train/loss": [(s, 2.3 / (1 + 0.1 * s)) for s in range(2, 21, 2)],
        "train/lr": [(s, 0.01 if s < 12 else 0.001) for s in range(2, 21, 2)],
        "train/images_per_s": [(s, 300.0 + s) for s in range(2, 21, 2)],
        "train/epoch_loss": [(10, 2.0), (20, 1.5)],
        "val/top1_error": [(10, 0.8), (20, 0.6)],
        "val/top5_error": [(10, 0.4), (20, 0.2)],
        "val/loss": [(10, 2.1), (20, 1.7)],
        "kernels/tower0_colour_energy": [(10, 0.66), (20, 0.5)],
        "kernels/tower1_colour_energy": [(10, 0.67), (20, 0.7)],
    }
    for name, points in metrics.items():
        for step, value in points:
            client.log_metric(run_id, name, value, step=step)
    client.log_artifact(run_id, str(model_pt))
    client.set_terminated(run_id)
    return {"root": root, "uri": uri, "run_id": run_id, "ckpt": ckpt, "model_pt": model_pt, "ranks": ranks,
            "metrics": metrics, "state": state}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        report.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_on_tp2_checkpoint_writes_all_three_pictures(tiny, tmp_path, capsys):
    code, out, err = run_cli([str(tiny["ckpt"]), "--out", str(tmp_path), "--num-images", "3"], capsys)
    assert code == 0, err
    conv1 = tiny["state"]["conv1.weight"]
    layout = report.kernel_layout(conv1.shape, 2)
    assert read_png(tmp_path / "kernels.png").shape == (layout.height, layout.width, 3)
    assert read_png(tmp_path / "curves.png").shape == (800, 1500, 3)
    assert read_png(tmp_path / "ten_crop.png").shape == (40 + 190 * 3, 1600, 3)
    assert "skipped" not in out, out


def test_tp2_checkpoint_blocks_are_the_ranks_shards(tiny, tmp_path, capsys):
    """Tower t's block shows exactly the kernels that tp rank t held in the run."""
    assert run_cli([str(tiny["ckpt"]), "--out", str(tmp_path)], capsys)[0] == 0
    png = read_png(tmp_path / "kernels.png")
    rank_kernels = [r["conv1"] for r in tiny["ranks"]]
    assert rank_kernels[0].shape[0] == 6 and not torch.equal(rank_kernels[0], rank_kernels[1])
    assert_grid_holds(png, torch.cat(rank_kernels), towers=2)


def test_tp2_checkpoint_and_its_export_give_the_same_picture(tiny, tmp_path, capsys):
    pictures = {}
    for name, src in (("ckpt", tiny["ckpt"]), ("export", tiny["model_pt"]), ("run", tiny["run_id"])):
        code, out, err = run_cli([str(src), "--out", str(tmp_path / name), "--tracking-uri", tiny["uri"]], capsys)
        assert code == 0, err
        pictures[name] = read_png(tmp_path / name / "kernels.png")
    # Only the title line names the source; everything below it is identical.
    below = report.TITLE_H
    assert np.array_equal(pictures["ckpt"][below:], pictures["export"][below:])
    assert np.array_equal(pictures["ckpt"][below:], pictures["run"][below:])  # via the run's model artifact
    assert not np.array_equal(pictures["ckpt"][:below], pictures["export"][:below])


def test_curves_read_the_runs_metric_histories(tiny):
    import mlflow

    client = mlflow.tracking.MlflowClient(tiny["uri"])
    histories = report.read_histories(client, tiny["run_id"])
    assert {k: sorted(v) for k, v in histories.items()} == pytest.approx(tiny["metrics"])


def test_run_id_gives_curves_and_export_says_it_has_none(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny["uri"])  # the run id form reads the environment
    code, out, err = run_cli([tiny["run_id"], "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert read_png(tmp_path / "run" / "curves.png").shape == (800, 1500, 3)
    assert "ten_crop: skipped: no validation images" in out  # an artifact model has no data config
    code, out, err = run_cli([str(tiny["model_pt"]), "--out", str(tmp_path / "export")], capsys)
    assert code == 0 and "curves: skipped: an exported model file has no metric history" in out
    assert not (tmp_path / "export" / "curves.png").exists()


def test_ten_crop_from_image_files(tiny, shards, tmp_path, capsys):
    folder = tmp_path / "images" / CLASSES[3]
    folder.mkdir(parents=True)
    src = sorted((shards.parent / "src" / "val" / CLASSES[3]).iterdir())
    for f in src:
        (folder / f.name).write_bytes(f.read_bytes())
    examples = report.examples_from_files([str(tmp_path / "images")], 5, CLASSES)
    assert [e.label for e in examples] == [3] * len(src)  # the class is the parent folder's name
    model = report._build_model(report.load_source(str(tiny["model_pt"])))
    result = report.ten_crop_predict(model, examples, 72, Config(data={"train_shards": str(shards)}).data)
    assert result.crops.shape == (len(src), 10, 64, 64, 3)
    assert torch.allclose(result.probs, result.crop_probs.mean(1)) and torch.allclose(result.probs.sum(1), torch.ones(len(src)))
    code, out, err = run_cli([str(tiny["model_pt"]), "--out", str(tmp_path / "o"), "--images", str(tmp_path / "images"),
                              "--resize", "72"], capsys)
    assert code == 0, err
    assert read_png(tmp_path / "o" / "ten_crop.png").shape == (40 + 190 * len(src), 1600, 3)


# ------------------------------------------------------------------ clear errors, no tracebacks


def test_missing_run_is_a_clear_error(tiny, tmp_path, capsys):
    code, out, err = run_cli(["0123456789abcdef0123456789abcdef", "--tracking-uri", tiny["uri"], "--out", str(tmp_path)], capsys)
    assert code == 2 and "0123456789abcdef0123456789abcdef not found" in err and "Traceback" not in err
    code, out, err = run_cli([tiny["run_id"], "--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"], capsys)
    assert code == 2 and "no MLflow database" in err
    assert not (tmp_path / "nope.db").exists()  # no empty store created by mistake


def test_checkpoint_without_conv1_is_a_clear_error(tiny, tmp_path, capsys):
    import json
    import shutil

    broken = tmp_path / "step-00000002"
    shutil.copytree(tiny["ckpt"], broken)
    for shard in broken.glob("model-tp*.pt"):
        blob = torch.load(shard, weights_only=True)
        del blob["model"]["conv1.weight"]
        torch.save(blob, shard)
    meta = json.loads((broken / "meta.json").read_text())
    del meta["partition"]["conv1.weight"]
    (broken / "meta.json").write_text(json.dumps(meta))
    code, out, err = run_cli([str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no conv1.weight" in err, err
    # a shard that lacks it while meta.json still lists it
    shutil.copy(tiny["ckpt"] / "meta.json", broken / "meta.json")
    code, out, err = run_cli([str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "conv1.weight" in err, err


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
    assert "report: error: /nonexistent/run" in proc.stderr
