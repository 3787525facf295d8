"""Top-1 / top-5 error on the validation shards, from the centre crop or the paper's 10 crops.

    python -m distalex.evaluate runs/demo/checkpoints            # latest checkpoint, centre crop
    python -m distalex.evaluate runs/demo/model.pt --ten-crop    # an exported model
    torchrun --nproc_per_node=2 -m distalex.evaluate runs/demo/model.pt --set parallel.tp=2

MODEL is any model source (``distalex.model_source``). It carries the run's config with absolute
paths, so evaluation reads the validation shards the run used, from any directory, and normalises
with the training statistics the source carries; ``--config`` and ``--set`` apply on top
(``--set data.val_shards=SPEC`` for shards that have moved).

10-crop averages the softmax over the four corners, the centre and their mirrors (section 4.1).
The validation samples are split over dp ranks and the counts summed once at the end, so the
error is over every readable validation image exactly once (corrupt ones are skipped and counted).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distalex.config import ConfigError, add_config_args, load_config
from distalex.model import build_model
from distalex.parallel.dims import ParallelDims
from distalex.serving import class_probabilities


@torch.no_grad()
def evaluate(model: nn.Module, loader, dims: ParallelDims, data_cfg, autocast=contextlib.nullcontext,
             poll_stop: Callable[[bool], tuple[bool, bool]] | None = None,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float] | None:
    """Sum of (samples, top-1 hits, top-5 hits, loss) over this dp rank's batches, reduced over dp.

    ``prepare`` turns a uint8 batch into the net's input (default: ``augment.normalize`` with the
    statistics beside ``data_cfg.train_shards``; a model source carries its own).

    ``poll_stop(busy)`` (``StopAgreement.poll``), if given, is asked after every batch and then until
    no rank has batches left (dp ranks may have different numbers); None is returned, on every
    rank, as soon as it reports a stop.
    """
    from distalex.data.augment import normalize

    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=dims.device)  # samples, top1, top5, loss sum
    skipped, stopped = 0, False
    for batch in loader:
        x = prepare(batch.images) if prepare is not None else normalize(batch.images, train=False, data_cfg=data_cfg)
        b = x.shape[0]
        with autocast():
            probs = class_probabilities(model, x)
        top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
        hits = top5 == batch.labels[:, None]
        totals += torch.stack([
            torch.tensor(float(b), device=dims.device, dtype=torch.float64),
            hits[:, 0].sum().double(),
            hits.any(1).sum().double(),
            F.nll_loss(probs.clamp_min(1e-12).log(), batch.labels, reduction="sum").double(),
        ])
        skipped = batch.skipped
        if poll_stop is not None and poll_stop(True)[0]:
            stopped = True
            break
    busy = poll_stop is not None and not stopped
    while busy and not stopped:  # until every rank is through its batches, or a stop
        stopped, busy = poll_stop(False)
    model.train(was_training)
    if stopped:
        return None
    counts = torch.cat([totals, torch.tensor([float(skipped)], dtype=torch.float64, device=dims.device)])
    if dims.dp_enabled:
        dist.all_reduce(counts, group=dims.dp_group)  # tp peers already hold the same sums
    n, top1, top5, loss, skipped_total = counts.tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no readable validation image")
    return {"top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n, "loss": loss / n, "samples": int(n), "skipped": int(skipped_total)}


def main(argv: list[str] | None = None) -> None:
    from distalex.data.info import DataError
    from distalex.data.loader import ValLoader
    from distalex.jobs import exit_now, report_failure
    from distalex.model_source import SourceError, load_source
    from distalex.parallel.dims import ParallelConfigError, destroy_parallel, init_parallel
    from distalex.parallel.plan import parallelize

    parser = argparse.ArgumentParser(prog="python -m distalex.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model.pt, a checkpoint folder or directory, runs:/<run_id>/model, or an MLflow run id")
    parser.add_argument("--ten-crop", action="store_true", help="average the softmax over 10 crops (the paper's test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store for runs:/, models:/ and run ids (default $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        source = load_source(args.model, args.tracking_uri)
        state = source.weights()
        # The run's own config (evaluated at tp=1 unless asked), then the file and --set given here.
        cfg = load_config(args.config, args.overrides, base=source.config_base())
        par = cfg.parallel
        dims = init_parallel(par.tp, cfg.model.towers, par.device, par.timeout_s, par.layout, par.peer_timeout_s)
    except (ConfigError, SourceError, ParallelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        model = build_model(cfg.model)
        model.load_state_dict(state)
        model = parallelize(model, dims.tp_group, cfg.parallel.layout).to(dims.device)
        loader = ValLoader(cfg.data, dims, args.batch_size, cfg.model.image_size, ten_crop=args.ten_crop)
        result = evaluate(model, loader, dims, cfg.data, prepare=source.normalizer(cfg.data, args.ten_crop))
    except BaseException as e:  # noqa: BLE001 - one line, and every rank ends (distalex.jobs)
        if isinstance(e, DataError):
            e = DataError(f"{e}{moved_data_hint(str(e))}")
        exit_now(report_failure(dims, e))
    if dims.is_main:
        mode = "10-crop" if args.ten_crop else "centre crop"
        print(
            f"{args.model}: {mode}, {result['samples']} images: top-1 error {100 * result['top1_error']:.2f}%, "
            f"top-5 error {100 * result['top5_error']:.2f}%, loss {result['loss']:.6f}" + (f" ({result['skipped']} unreadable skipped)" if result["skipped"] else "")
        )
    destroy_parallel(dims)


def moved_data_hint(message: str) -> str:
    """What to pass when the data a run names is not where the run read it."""
    keys = [k for k in ("data.val_shards", "data.info", "data.train_shards") if k in message]
    if not keys:
        return ""
    return f" (the model's run read it there; pass --set {keys[0]}=... for its new place)"


if __name__ == "__main__":
    main()
