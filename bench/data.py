"""Decode + crop + flip throughput on ImageNet-sized JPEGs, per worker and in total.

    python bench/data.py [--images 600] [--workers N] [--resize 256] [--size 224]

The images are real photos (scikit-learn's two sample images), cut and scaled into 500x375 views
and saved as quality-90 JPEGs (about ImageNet's median size and quality). Three numbers:
  1. one core, the augmentation alone (``augment.train_crop`` on bytes in memory);
  2. N processes doing the same, to see how it scales on this machine;
  3. the whole ``TrainLoader`` (tar reading, shuffle buffer, decode, crop, flip, batching, hand-over
     from N DataLoader workers), through shards written by ``make_shards``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distalex.data.augment import train_crop  # noqa: E402


def imagenet_like(n: int, seed: int = 0) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640x427 each
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        w = int(rng.integers(420, 641))
        h = int(w * 0.75)
        if h > src.height:
            h, w = src.height, int(src.height / 0.75)
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        img = src.crop((x, y, x + w, y + h)).resize((500, 375), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _crop_all(args) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of this process)."""
    jpegs, resize, size, seed = args
    rng = np.random.default_rng(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for data in jpegs:
        u, v, f = rng.random(3)
        train_crop(data, resize, size, u, v, f < 0.5)
    return len(jpegs), time.perf_counter() - t0, time.process_time() - c0


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_loader(jpegs: list[bytes], workers: int, resize: int, size: int, batch: int) -> tuple[int, float, float]:
    import torch

    from distalex.config import DataConfig
    from distalex.data.loader import TrainLoader
    from distalex.data.make_shards import make_shards
    from distalex.parallel.dims import ParallelDims

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for split in ("train", "val"):
            for c in range(4):
                (src / split / f"n{c:08d}").mkdir(parents=True)
        for i, data in enumerate(jpegs):
            (src / "train" / f"n{i % 4:08d}" / f"img_{i:06d}.JPEG").write_bytes(data)
        for c in range(4):
            (src / "val" / f"n{c:08d}" / "v.JPEG").write_bytes(jpegs[c])
        make_shards(src, Path(tmp) / "shards", max_count=max(1, len(jpegs) // 8), workers=workers, stats_samples=0)
        cfg = DataConfig(train_shards=str(Path(tmp) / "shards"), workers=workers, resize=resize, shuffle_buffer=256)
        loader = TrainLoader(cfg, ParallelDims(), batch_size=batch, image_size=size, seed=0)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        n = 0
        for b in loader.epoch(0):
            n += len(b.labels)
        wall = time.perf_counter() - t0
        del b
        return n, wall, _cpu_seconds() - c0  # the workers have been joined: their CPU time counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args(argv)
    jpegs = imagenet_like(a.images)
    kb = np.mean([len(j) for j in jpegs]) / 1024
    print(f"{len(jpegs)} JPEGs of 500x375, {kb:.0f} KiB mean; resize {a.resize}, crop {a.size}, flip; "
          f"{os.cpu_count()} CPU cores")

    print("images/s by wall clock; per CPU-second (= per fully used core) in brackets, which holds")
    print("even when other jobs share the cores")
    _crop_all((jpegs[:50], a.resize, a.size, 1))  # warm-up
    n, dt, cpu = _crop_all((jpegs, a.resize, a.size, 0))
    print(f"1 process  : {n / dt:7.0f} images/s  [{n / cpu:.0f} per core]  (decode + crop + flip)")

    chunks = [(jpegs[w:: a.workers], a.resize, a.size, w) for w in range(a.workers)]
    with mp.get_context("fork").Pool(a.workers) as pool:
        pool.map(_crop_all, [(c[0][:20], *c[1:]) for c in chunks])  # warm-up
        t0 = time.perf_counter()
        res = pool.map(_crop_all, chunks)
        wall = time.perf_counter() - t0
    per = " ".join(f"{n / dt:.0f} [{n / cpu:.0f}]" for n, dt, cpu in res)
    print(f"{a.workers} processes: {sum(r[0] for r in res) / wall:7.0f} images/s total; per worker {per}")

    n, dt, cpu = bench_loader(jpegs, a.workers, a.resize, a.size, a.batch)
    print(f"TrainLoader, {a.workers} workers: {n / dt:7.0f} images/s total, {n / dt / a.workers:.0f} per worker "
          f"[{n / cpu:.0f} per core, main process included] (tar read, shuffle, decode, crop, flip, batch, "
          "worker start-up)")


if __name__ == "__main__":
    main()
