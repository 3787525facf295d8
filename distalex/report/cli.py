"""Pictures of a run: the towers' conv1 kernels (the paper's Figure 3), learning curves, 10-crop examples.

    python -m distalex.report RUN_OR_CHECKPOINT [--out DIR] [--tracking-uri URI]
                              [--images FILE_OR_DIR ...] [--val-shards SPEC] [--num-images N]

RUN_OR_CHECKPOINT is one of

    a checkpoint folder (step-N), a checkpoint   kernels and 10-crop examples from its weights (images
    directory (its latest complete checkpoint)   from the config's data.val_shards); curves from the
    or a run folder holding checkpoints/         MLflow run its meta.json names, in the store training
                                                 used (--tracking-uri, else the config's tracking.uri,
                                                 else $MLFLOW_TRACKING_URI, else runs/mlflow.db beside
                                                 the run folder)
    an exported model file (distalex.export)     kernels; 10-crop with --images or --val-shards; no curves
    an MLflow run id (32 hex digits; with        curves; kernels and 10-crop as well if the run logged a
    --tracking-uri or $MLFLOW_TRACKING_URI)      model file (*.pt) as an artifact

and DIR (default ``report``) gets those of ``kernels.png``, ``curves.png`` and ``ten_crop.png``
that the source allows; each one left out is printed with the reason. Relative paths in a run's
config (shards, a sqlite store) are looked up from where training ran, so the report works from
any directory. A missing run, an unreadable file, a checkpoint without conv1 and the like are one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distalex.report import ReportError
from distalex.report.curves import plot_curves, read_histories
from distalex.report.kernels import kernel_summary
from distalex.report.sources import Source, data_config, get_run, load_model, load_source, open_tracking
from distalex.report.ten_crop import examples_from_files, examples_from_shards, plot_ten_crop, ten_crop_predict


def build_report(
    source: Source, out: str | Path, images: list[str] | None = None, val_shards: str | None = None,
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
        model = load_model(source)
    else:
        results["kernels"] = source.why.get("kernels", "no weights")

    # Curves.
    if source.run_id:
        try:
            client, uri = open_tracking(source.tracking_uri)
            run = get_run(client, uri, source.run_id)
            histories = read_histories(client, source.run_id)
            if histories:
                name = run.info.run_name or source.run_id
                results["curves"] = plot_curves(histories, out / "curves.png", title=f"run {name} ({source.run_id})")
            else:
                results["curves"] = f"MLflow run {source.run_id} has none of the curve metrics"
        except ReportError as e:
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
        try:
            if images:
                examples = examples_from_files(images, num_images, source.classes)
            else:
                examples = examples_from_shards(data_cfg.val_shards, num_images, data_cfg.info)
            result = ten_crop_predict(model, examples, data_cfg.resize, data_cfg)
            results["ten_crop"] = plot_ten_crop(result, examples, source.classes, out / "ten_crop.png")
        except ReportError as e:
            if images or val_shards:
                raise
            results["ten_crop"] = f"{e} (pass --images or --val-shards)"
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m distalex.report", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="checkpoint folder or directory, run folder, exported model .pt, or MLflow run id")
    p.add_argument("--out", default="report", help="folder for the PNGs (default: report)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, or the checkpoint's)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE_OR_DIR", help="validation images for the 10-crop picture")
    p.add_argument("--val-shards", default=None, help="validation shards for the 10-crop picture (default: the run's data.val_shards)")
    p.add_argument("--num-images", type=int, default=4, help="images in the 10-crop picture (default: 4)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before cropping (default: the run's data.resize)")
    a = p.parse_args(argv)
    if a.num_images < 1:
        p.error("--num-images must be at least 1")
    # A dead tracking server should fail in seconds, not after MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    from distalex.config import ConfigError
    from distalex.data.info import DataError

    try:
        source = load_source(a.source, a.tracking_uri)
        results = build_report(source, a.out, a.images, a.val_shards, a.num_images, a.resize)
    except (ReportError, DataError, ConfigError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report of {source.label}")
    for key in ("kernels", "curves", "ten_crop"):
        value = results[key]
        if isinstance(value, Path):
            extra = f"  ({results['kernel_metrics']})" if key == "kernels" else ""
            print(f"  {key}: {value}{extra}")
        else:
            print(f"  {key}: skipped: {value}")


if __name__ == "__main__":
    main()

