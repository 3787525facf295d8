"""One reader of model sources for predict, evaluate, export and report (``distalex.model_source``).

Fast: no training. The runs that produce real checkpoints and MLflow models are in test_predict.py
and test_report.py, which read them from other directories than the run's.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from distalex import evaluate, export, predict
from distalex.config import absolute_paths, load_config
from distalex.data.augment import normalize
from distalex.model_source import SourceError, load_source
from distalex.serving import class_probabilities
from distalex.report import cli as report_cli
from tests.test_predict import CLASSES, MODEL_CFG, jpeg, random_net, run_config, stats_folder


def test_a_run_saves_its_paths_absolute_and_leaves_urls_alone(tmp_path):
    cfg = load_config(None, [
        "data.train_shards=data/a-{000..003}.tar, /abs/b.tar,pipe:cat x.tar",
        "data.val_shards=https://host/v-{0..1}.tar,s3://bucket/v.tar", "data.info=../info/_info.json",
        "checkpoint.resume=old/step-00000010", "tracking.uri=sqlite:///runs/other.db",
    ])
    got = absolute_paths(cfg, tmp_path / "work")
    assert got.data.train_shards == f"{tmp_path}/work/data/a-{{000..003}}.tar,/abs/b.tar,pipe:cat x.tar"
    assert got.data.val_shards == "https://host/v-{0..1}.tar,s3://bucket/v.tar"
    assert got.data.info == f"{tmp_path}/info/_info.json"
    assert got.checkpoint.dir == f"{tmp_path}/work/runs/{{run_name}}/checkpoints"
    assert got.checkpoint.resume == f"{tmp_path}/work/old/step-00000010"
    assert got.tracking.uri == f"sqlite:///{tmp_path}/work/runs/other.db"
    assert absolute_paths(got, tmp_path / "elsewhere") == got  # already absolute: unchanged
    assert absolute_paths(load_config(None, []), tmp_path).checkpoint.resume == "auto"


@pytest.mark.parametrize("scale", ["standardized", "raw"])
@pytest.mark.parametrize("mean", ["channel", "pixel"])
@pytest.mark.parametrize("ten", [False, True])
def test_the_statistics_a_source_carries_normalise_as_evaluation_does(tmp_path, mean, ten, scale):
    """A model file normalises with its own statistics, in its run's input scale, exactly as
    augment.normalize does with the shards' (so evaluate gives the same numbers after the training
    shards are gone)."""
    cfg = run_config(stats_folder(tmp_path / "shards", pixel_mean=mean == "pixel"), mean, scale)
    from distalex.serving import eval_crops, training_settings

    prep, names = training_settings(cfg)
    path = export.save_serial_model(tmp_path / "m.pt", random_net().state_dict(), MODEL_CFG, CLASSES, names, prep,
                                    cfg.data.model_dump())
    crops = torch.stack([eval_crops(jpeg(i), cfg.data.resize, 64, ten) for i in range(3)])
    want = normalize(crops, train=False, data_cfg=cfg.data)
    source = load_source(str(path))
    (tmp_path / "shards" / "_info.json").unlink()  # what evaluate reads next comes from the model file
    assert torch.equal(source.normalizer(cfg.data, ten)(crops), want)
    assert source.cfg.data.train_shards == cfg.data.train_shards and source.class_name(3) == "digit 3"


def run_tool(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def test_every_tool_gives_the_same_one_line_error_for_a_source_it_cannot_use(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no runs/mlflow.db here
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(1))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    empty = tmp_path / "empty"
    empty.mkdir()
    incomplete = tmp_path / "ckpt" / "step-00000004"
    incomplete.mkdir(parents=True)
    (tmp_path / "blob.pt").write_bytes(b"")
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    sources = {
        str(tmp_path / "nope"): "no such file or folder, and not an MLflow model URI",
        str(junk): "not a readable model file",
        str(tmp_path / "foreign.pt"): "not a distalex model export",
        str(empty): "no complete checkpoint",
        str(incomplete): "incomplete checkpoint (no meta.json",
        "0123456789abcdef0123456789abcdef": "runs/mlflow.db: no MLflow database there",
        "runs:/0123456789abcdef0123456789abcdef/model": "runs/mlflow.db: no MLflow database there",
    }
    tools = {
        "predict": lambda s: (predict.main, [s, str(image)]),
        "evaluate": lambda s: (evaluate.main, [s]),
        "export": lambda s: (export.main, [s, str(tmp_path / "out.pt")]),
        "report": lambda s: (report_cli.main, [s, "--out", str(tmp_path / "report")]),
    }
    for source, expected in sources.items():
        with pytest.raises(SourceError) as raised:
            load_source(source)
        assert expected in str(raised.value)
        for name, call in tools.items():
            code, err = run_tool(*call(source))
            assert (code, err) == (2, f"error: {raised.value}\n"), (name, source, err)
    assert not (tmp_path / "runs").exists()  # no empty store made on the way


def test_a_model_file_without_preprocessing_names_what_it_lacks(tmp_path):
    bare = export.save_serial_model(tmp_path / "bare.pt", random_net().state_dict(), MODEL_CFG, CLASSES)
    source = load_source(str(bare))
    assert source.preprocessing is None and "names no training shards" in source.why["preprocessing"]
    with pytest.raises(SourceError, match=r"bare.pt: carries no preprocessing settings"):
        predict.load_predictor(str(bare))
    blob = torch.load(bare, weights_only=True)
    assert blob["data"] is None and blob["mlflow_run"] is None


@pytest.mark.parametrize("mean", ["channel", "pixel"])
def test_a_model_file_from_before_input_scale_loads_with_the_standardized_scale(tmp_path, mean):
    """Model files and checkpoints written before data.input_scale existed carry no scale: they
    trained standardized, and keep loading (and normalising) so, whatever distalex's default."""
    cfg = run_config(stats_folder(tmp_path / "shards", pixel_mean=mean == "pixel"), mean)
    from distalex.serving import eval_crops, training_settings

    prep, names = training_settings(cfg)
    path = export.save_serial_model(tmp_path / "m.pt", random_net().state_dict(), MODEL_CFG, CLASSES, names, prep,
                                    cfg.data.model_dump())
    blob = torch.load(path, weights_only=True)
    del blob["preprocessing"]["input_scale"], blob["data"]["input_scale"]  # as an older distalex wrote it
    torch.save(blob, path)
    crops = torch.stack([eval_crops(jpeg(i), cfg.data.resize, 64, False) for i in range(3)])
    want = normalize(crops, train=False, data_cfg=cfg.data)
    source = load_source(str(path))
    assert source.preprocessing.input_scale == "standardized" and source.cfg.data.input_scale == "standardized"
    assert torch.equal(source.normalizer(source.cfg.data, False)(crops), want)
    with torch.no_grad():
        probs = predict.predictor_of(source, False).probabilities(crops)
        assert torch.equal(probs, class_probabilities(random_net(), want))
    # the same file read as raw would give other inputs: the scale matters
    raw = run_config(cfg.data.train_shards, mean, "raw").data
    assert not torch.allclose(normalize(crops, train=False, data_cfg=raw), want)
