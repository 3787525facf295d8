"""Loader worker start-up per epoch under each multiprocessing start method.

    python bench/start_methods.py [--workers 4] [--epochs 4] [--methods forkserver,fork,spawn]

Workers start again every epoch and every validation pass. For each method a fresh process (as a
training process: it has imported ``distalex.train``, which a spawned worker imports again) runs
the demo's training loader (``configs/demo.yaml``'s data settings on the bundled digits, made in a
temporary folder) for a few epochs, and reports per epoch the seconds from ``TrainLoader.start``
to the first batch (the workers' start plus one batch's decoding, which every method shares) and
the whole epoch; and the workers' unique memory (USS: pages no other process shares) at the first
batch. The first epoch of forkserver includes starting the server itself (once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distalex.train  # noqa: E402, F401 - as in a training process: what a spawned worker imports again

ROOT = Path(__file__).resolve().parents[1]


def make_shards(folder: Path) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "distalex.data.demo", str(folder / "src")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "distalex.data.make_shards", str(folder / "src"), str(folder / "shards"),
                    "--max-count", "300", "--no-progress"], check=True, env=env, capture_output=True)
    return folder / "shards"


def one_method(shards: Path, method: str, workers: int, epochs: int) -> dict:
    """In this process: the demo's training loader for ``epochs`` epochs under ``method``."""
    import psutil

    from distalex.config import load_config
    from distalex.data.loader import TrainLoader
    from distalex.parallel.dims import ParallelDims

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.train_shards={shards}", f"data.val_shards={shards}",
                                                       f"data.workers={workers}", f"data.start_method={method}"])
    loader = TrainLoader(cfg.data, ParallelDims(dp=1, tp=1, rank=0), cfg.train.batch_size, cfg.model.image_size, 0)
    first, whole, uss = [], [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        batches = loader.start(epoch)
        try:
            it = iter(batches)
            next(it)
            first.append(time.perf_counter() - t0)
            kids = [p for p in psutil.Process().children(recursive=True) if p.pid in batches._pool.pids()]
            uss.append(sum(p.memory_full_info().uss for p in kids) / len(kids) / 2**20)
            for _ in it:
                pass
            whole.append(time.perf_counter() - t0)
        finally:
            batches.close()
    return {"method": method, "workers": workers, "steps": len(loader), "first_batch_s": first, "epoch_s": whole,
            "worker_uss_mib": uss}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--methods", default="forkserver,fork,spawn")
    p.add_argument("--child", nargs=2, metavar=("SHARDS", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(one_method(Path(a.child[0]), a.child[1], a.workers, a.epochs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        print(f"{'method':<11} {'first epoch':>12} {'later epochs (median)':>22} {'epoch':>8} {'worker USS':>11}")
        for method in a.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--workers", str(a.workers), "--epochs", str(a.epochs),
                                  "--child", str(shards), method], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            later = sorted(r["first_batch_s"][1:])
            median = later[len(later) // 2]
            epoch = sorted(r["epoch_s"][1:])[len(later) // 2]
            print(f"{method:<11} {r['first_batch_s'][0]:>10.2f} s {median:>20.2f} s {epoch:>6.2f} s "
                  f"{sorted(r['worker_uss_mib'])[len(later) // 2]:>7.0f} MiB")
        print(f"({a.workers} workers, {r['steps']} steps of the demo's loader per epoch, {a.epochs} epochs; "
              f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
