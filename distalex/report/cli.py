"""Pictures of a run: the towers' conv1 kernels (the paper's Figure 3), learning curves, 10-crop examples.

    python -m distalex.report SOURCE [--out DIR] [--tracking-uri URI] [--no-upload]
                              [--images FILE_OR_DIR ...] [--val-shards SPEC] [--num-images N]

SOURCE is any model source (``distalex.model_source``): a checkpoint folder or directory, a run
folder holding checkpoints/, an exported model file, an MLflow model or an MLflow run id. It gives

    kernels.png    from its weights
    curves.png     from the MLflow run it belongs to (a checkpoint and the model file training writes
                   name their run and store; --tracking-uri overrides the store)
    ten_crop.png   from its weights and the run's validation shards (data.val_shards, absolute
                   paths), or --images / --val-shards

into DIR (default ``report``); each one left out is printed with the reason. The pictures are also
logged to the source's MLflow run as ``report/*.png`` (``--no-upload``: not). A source carries
absolute paths, so the report works from any directory. A missing run, an unreadable file, a
checkpoint without conv1 and the like are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distalex.config import DataConfig
from distalex.model_source import ModelSource, SourceError, get_run, load_source, mlflow_client
from distalex.report import ReportError
from distalex.report.curves import plot_curves, read_histories
from distalex.report.kernels import kernel_summary
from distalex.report.ten_crop import examples_from_files, examples_from_shards, plot_ten_crop, ten_crop_predict

PICTURES = ("kernels", "curves", "ten_crop")
ARTIFACT_DIR = "report"
"""Where the pictures go in the MLflow run."""


def build_report(
    source: ModelSource, out: str | Path, images: list[str] | None = None, val_shards: str | None = None,
    num_images: int = 4, resize: int | None = None,
) -> dict[str, Path | str]:
    """Write what the source allows into ``out``; returns {picture: path, or the reason it is missing}."""
    out = Path(out)
    results: dict[str, Path | str] = {}

    # Kernels (and the model, for the 10-crop examples).
    model = None
    if source.state is not None:
        if "conv1.weight" not in source.state:
            raise ReportError(f"{source.label}: no conv1.weight in its state dict (has {sorted(source.state)[:8]} ...)")
        towers = int((source.model_config or {}).get("towers", 2))
        metrics = kernel_summary(source.state["conv1.weight"], towers, out / "kernels.png", title=f"conv1 kernels: {source.label}")
        results["kernels"] = out / "kernels.png"
        results["kernel_metrics"] = ", ".join(f"{k.removeprefix('kernels/')} {v:.3f}" for k, v in metrics.items())
        model = source.model()
    else:
        results["kernels"] = source.why.get("kernels", "no weights")

    # Curves.
    if source.run_id and source.tracking_uri:
        try:
            client = mlflow_client(source.tracking_uri)
            run = get_run(client, source.tracking_uri, source.run_id)
            histories = read_histories(client, source.run_id)
            if histories:
                name = run.info.run_name or source.run_id
                results["curves"] = plot_curves(histories, out / "curves.png", title=f"run {name} ({source.run_id})")
            else:
                results["curves"] = f"MLflow run {source.run_id} has none of the curve metrics"
        except SourceError as e:
            if model is None:  # the run is all there is: nothing to show
                raise
            results["curves"] = f"{e} (pass --tracking-uri)"
    else:
        results["curves"] = source.why.get("curves", "no MLflow run")

    # 10-crop examples. Images the user named must work; the run's own shards may have moved.
    if model is None:
        results["ten_crop"] = source.why.get("ten_crop", "no weights")
    elif not (images or val_shards or source.cfg is not None):
        results["ten_crop"] = "no validation images: pass --images or --val-shards"
    else:
        data_cfg = data_config(source, val_shards, resize)
        names = [source.class_name(c) for c in range(model.fc8.out_features)]
        try:
            if images:
                examples = examples_from_files(images, num_images, source.classes)
            else:
                examples = examples_from_shards(data_cfg.val_shards, num_images, data_cfg.info)
            result = ten_crop_predict(model, examples, data_cfg.resize, source.normalizer(data_cfg, ten=True))
            results["ten_crop"] = plot_ten_crop(result, examples, names, out / "ten_crop.png")
        except ReportError as e:
            if images or val_shards:
                raise
            results["ten_crop"] = f"{e} (pass --images or --val-shards)"
    return results


def data_config(source: ModelSource, val_shards: str | None, resize: int | None) -> DataConfig:
    """The run's data section, else defaults; --val-shards also supplies the statistics' _info.json."""
    data = source.cfg.data.model_copy() if source.cfg is not None else DataConfig()
    if val_shards:
        data.val_shards = val_shards
        if source.cfg is None:
            data.train_shards = val_shards  # the same _info.json holds the training statistics
    if resize:
        data.resize = resize
    elif source.preprocessing is not None:
        data.resize = source.preprocessing.resize
    elif source.cfg is None:
        data.resize = round(source.model_config["image_size"] * 256 / 224)  # the paper's 256 for 224
    return data


def upload(source: ModelSource, results: dict[str, Path | str]) -> str:
    """Log the pictures drawn to the source's MLflow run under report/; what happened, in words."""
    drawn = [results[k] for k in PICTURES if isinstance(results[k], Path)]
    if not drawn:
        return "nothing drawn"
    if not (source.run_id and source.tracking_uri):
        return source.why.get("curves", "the source names no MLflow run")
    try:
        client = mlflow_client(source.tracking_uri)
        for png in drawn:
            client.log_artifact(source.run_id, str(png), ARTIFACT_DIR)
    except Exception as e:  # noqa: BLE001 - the pictures are on disk; say why they are not in MLflow
        return f"not uploaded to MLflow run {source.run_id} at {source.tracking_uri} ({type(e).__name__}: {e})"
    return f"MLflow run {source.run_id}: " + ", ".join(f"{ARTIFACT_DIR}/{p.name}" for p in drawn)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m distalex.report", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE",
                   help="checkpoint folder or directory, run folder, exported model .pt, MLflow model URI or run id")
    p.add_argument("--out", default="report", help="folder for the PNGs (default: report)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, or the checkpoint's)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE_OR_DIR", help="validation images for the 10-crop picture")
    p.add_argument("--val-shards", default=None, help="validation shards for the 10-crop picture (default: the run's data.val_shards)")
    p.add_argument("--num-images", type=int, default=4, help="images in the 10-crop picture (default: 4)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before cropping (default: the run's data.resize)")
    p.add_argument("--no-upload", action="store_true", help="do not log the pictures to the source's MLflow run")
    a = p.parse_args(argv)
    if a.num_images < 1:
        p.error("--num-images must be at least 1")
    from distalex.config import ConfigError
    from distalex.data.info import DataError

    try:
        source = load_source(a.source, a.tracking_uri)
        results = build_report(source, a.out, a.images, a.val_shards, a.num_images, a.resize)
    except (ReportError, SourceError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report of {source.label}")
    for key in PICTURES:
        value = results[key]
        if isinstance(value, Path):
            extra = f"  ({results['kernel_metrics']})" if key == "kernels" else ""
            print(f"  {key}: {value}{extra}")
        else:
            print(f"  {key}: skipped: {value}")
    if not a.no_upload:
        print(f"  uploaded: {upload(source, results)}")


if __name__ == "__main__":
    main()

