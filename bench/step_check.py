"""Two checks of the training step that only a GPU can answer (bench/gpu_check.sh runs both):

    python bench/step_check.py sync [--tiny] --json OUT.json       # no host sync in a step
    python bench/step_check.py overlap [--tiny] --json OUT.json    # eager vs compiled, with and without overlap

``sync``: the step as ``distalex.train`` runs it from a uint8 batch on the device (normalisation
with the lighting, the memory format, ``Engine.train_step``: forward, backward, SGD) on one
process, eager and then compiled (the paper's net, 128 images; ``--tiny`` as below): ``--warmup`` steps first (compiling and cuDNN's algorithm search
may sync), then ``--steps`` steps under ``torch.cuda.set_sync_debug_mode("error")``, where any
operation that makes the host wait for the device raises. A row's status is ``ok`` or the error,
which names the operation. Without CUDA: every row ``skipped`` with the reason (the mode exists
for CUDA only).

``overlap``: the DDP step at dp=2 (one process per GPU, NCCL; without CUDA two gloo CPU ranks in
the tiny form), three ways: ``eager``; ``compiled`` as one graph, every gradient bucket all-reduced
after the whole backward (``compile_model(overlap=False)``); ``compiled+overlap``, the training
setting, the graph split at the buckets so that their all-reduce runs during the backward
(``distalex/build.py``). images/s is the global batch over the step's time (bench.py's timing:
median of windows, rank 0's clock; the ranks step in lockstep), and ``pieces`` the compiled
graphs AOT autograd made (1 without the split). With one GPU: skipped with the reason (one rank
has no all-reduce to overlap).

The JSON is written after every row, so a run cut short keeps what it finished. Exit status 1 only
if a row that should run failed (a sync found, an error); nothing here gates on timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench import measure  # noqa: E402
from results import provenance  # noqa: E402

# The batch is synthetic: ImageNet's mean and std, which normalize falls back to, are the right ones.
warnings.filterwarnings("ignore", message=".*no training statistics in its _info.json.*")

MODES = ("eager", "compiled", "compiled+overlap")
FULL = {"width": 1.0, "size": 224, "batch": 128, "classes": 1000, "bucket_mb": 25.0, "backend": "inductor",
        "warmup": 3, "steps": 5, "iters": 5, "windows": 3}
TINY = {"width": 0.25, "size": 64, "batch": 16, "classes": 10, "bucket_mb": 1.0, "backend": "aot_eager",
        "warmup": 2, "steps": 2, "iters": 2, "windows": 2}
"""The tiny form needs more than one 1 MiB bucket (width 1/4: 5.6 MB of gradients) so that the split shows."""


def step_config(a, compile: bool, dp: int):
    from distalex.config import Config

    return Config.model_validate({
        "model": {"num_classes": a.classes, "width": a.width, "image_size": a.size},
        "parallel": {"tp": 1},
        "train": {"batch_size": a.batch * dp, "compile": compile, "ddp_bucket_mb": a.bucket_mb},
    })


def training_step(a, mode: str, dims):
    """(step function, its engine) for ``mode`` at this rank, on a fixed uint8 batch of ``a.batch``
    images already on the device, stepped as ``distalex.train.train_epoch`` steps a batch."""
    from distalex.build import build_parallel_model, channels_last, compile_model
    from distalex.data.augment import normalize
    from distalex.engine import build_engine

    cfg = step_config(a, compile=False, dp=dims.dp)
    model = build_parallel_model(cfg, dims)
    if mode != "eager":
        compile_model(model, a.backend, overlap=mode == "compiled+overlap")
    engine = build_engine(model, cfg, dims)
    g = torch.Generator().manual_seed(dims.dp_rank)
    images = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, generator=g).to(dims.device)
    labels = torch.randint(0, a.classes, (a.batch,), generator=g).to(dims.device)
    lighting = torch.Generator(device=dims.device).manual_seed(dims.dp_rank)
    layout = torch.channels_last if channels_last(cfg, dims.device) else torch.contiguous_format

    def step():
        x = normalize(images, train=True, data_cfg=cfg.data, generator=lighting).contiguous(memory_format=layout)
        return engine.train_step(x, labels)

    return step, engine


def sync_row(a, mode: str) -> dict:
    """``a.steps`` steps of ``mode`` under the sync debug mode "error" after ``a.warmup`` without."""
    from distalex.parallel.dims import ParallelDims

    torch._dynamo.reset()
    dims = ParallelDims(device=torch.device("cuda", torch.cuda.current_device()))
    step, _ = training_step(a, mode, dims)
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(a.steps):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"status": "ok", "steps": a.steps}


def overlap_worker(a, modes: list[str]) -> dict:
    """Every mode on this rank of the dp=2 job (tests/distributed.run_workers starts it)."""
    from torch._dynamo.utils import counters

    from distalex.parallel.dims import init_parallel

    dims = init_parallel(tp=1, towers=2, device="cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for mode in modes:
        torch._dynamo.reset()
        counters.clear()
        step, _ = training_step(a, mode, dims)
        row = measure(step, a.batch * dims.dp, a.warmup, a.iters, a.windows, dims.device)
        out[mode] = {**row, "pieces": counters["aot_autograd"]["total"] if mode != "eager" else 0}
    return out


def run_sync(a, result: dict, write) -> int:
    failed = 0
    for mode in a.modes:
        row = {"name": f"sync-debug/{mode}", "mode": mode}
        if not torch.cuda.is_available():
            row["status"] = "skipped: no CUDA (torch.cuda.set_sync_debug_mode checks CUDA operations only)"
        else:
            try:
                row.update(sync_row(a, mode))
            except Exception as e:  # noqa: BLE001 - reported as the row's status, the run goes on
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                row["traceback"] = traceback.format_exc()
                failed = 1
        print(f"{row['name']:<28} {row['status']}", flush=True)
        result["rows"].append(row)
        write()
    return failed


def run_overlap(a, result: dict, write) -> int:
    from tests.distributed import run_workers

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 1:
        reason = "skipped: one GPU; the overlap needs dp=2 (a GPU per rank), one rank has no all-reduce"
        result["rows"] += [{"name": f"overlap/{m}", "mode": m, "status": reason} for m in a.modes]
        print(reason, flush=True)
        write()
        return 0
    result["config"]["device"] = "2 GPUs, nccl" if gpus else "2 CPU ranks, gloo"
    try:
        ranks = run_workers(overlap_worker, 2, a, a.modes, timeout=a.timeout)
    except AssertionError as e:  # a worker's error, with its traceback
        result["rows"].append({"name": "overlap", "status": f"error: {str(e).splitlines()[-1]}", "traceback": str(e)})
        write()
        print(e, flush=True)
        return 1
    for mode in a.modes:
        row = {"name": f"overlap/{mode}", "mode": mode, "status": "ok", **ranks[0][mode],
               "per_rank_images_per_s": [r[mode]["images_per_s"] for r in ranks]}
        result["rows"].append(row)
        print(f"{row['name']:<28} {row['images_per_s']:10.1f} images/s  first step {row['first_step_s']:6.1f} s  "
              f"pieces {row['pieces']}", flush=True)
    rates = {r["mode"]: r["images_per_s"] for r in result["rows"] if r["status"] == "ok"}
    if "compiled" in rates and "compiled+overlap" in rates:
        result["overlap_gain"] = rates["compiled+overlap"] / rates["compiled"]
        print(f"compiled+overlap / compiled: {result['overlap_gain']:.3f}x", flush=True)
    write()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=("sync", "overlap"))
    p.add_argument("--tiny", action="store_true", help="width 1/4, 64 px, batch 16 per rank, aot_eager (CI smoke)")
    p.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: all; sync: eager,compiled, "
                                   "the same step as compiled+overlap on one process, which has no DDP)")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=type(FULL[key]))
    p.add_argument("--timeout", type=float, default=900, help="overlap: seconds for the two ranks to finish")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    for key, value in (TINY if a.tiny else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.modes = [m for m in a.modes.split(",") if m] if a.modes else list(MODES if a.check == "overlap" else MODES[:2])
    if unknown := [m for m in a.modes if m not in MODES]:
        p.error(f"--modes: unknown {', '.join(unknown)}; known: {', '.join(MODES)}")
    config = {k: getattr(a, k) for k in FULL} | {"check": a.check, "tiny": a.tiny}
    result = {"config": config, "provenance": provenance(argv), "rows": []}
    out = Path(a.json)

    def write():
        out.write_text(json.dumps(result, indent=1) + "\n")

    write()
    return (run_sync if a.check == "sync" else run_overlap)(a, result, write)


if __name__ == "__main__":
    sys.exit(main())
