"""Decode + crop + flip throughput on ImageNet-sized JPEGs, per worker and in total.

    python bench/data.py [--images 600] [--workers N] [--resize 256] [--size 224] [--sources local,pipe,http]

The images are real photos (scikit-learn's two sample images), cut and scaled into 500x375 views
and saved as quality-90 JPEGs (about ImageNet's median size and quality). The numbers:
  1. one core, the augmentation alone (``augment.train_crop`` on bytes in memory);
  2. N processes doing the same, to see how it scales on this machine;
  3. the whole ``TrainLoader`` (tar reading, shuffle buffer, decode, crop, flip, batching, hand-over
     from N DataLoader workers), through shards written by ``make_shards``, read as local files,
     through ``pipe:cat`` and from an HTTP server on 127.0.0.1 (``python -m http.server``'s handler
     in a thread of this process, so it shares the cores);
  4. where CUDA exists, the same loader with ``data.decode=gpu`` (the workers only read; the batch
     is decoded with nvjpeg and cropped on the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
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


def _write_shards(jpegs: list[bytes], root: Path, workers: int) -> Path:
    from distalex.data.make_shards import make_shards

    src = root / "src"
    for split in ("train", "val"):
        for c in range(4):
            (src / split / f"n{c:08d}").mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (src / "train" / f"n{i % 4:08d}" / f"img_{i:06d}.JPEG").write_bytes(data)
    for c in range(4):
        (src / "val" / f"n{c:08d}" / "v.JPEG").write_bytes(jpegs[c])
    make_shards(src, root / "shards", max_count=max(1, len(jpegs) // 8), workers=workers, stats_samples=0)
    return root / "shards"


@contextlib.contextmanager
def _served(folder: Path):
    """An HTTP server for ``folder`` on 127.0.0.1, in a thread: yields its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _source_spec(shards: Path, source: str, url: str | None) -> tuple[str, str | None]:
    """(data.train_shards, data.info) reading the shards in ``shards`` as local files, pipe: or HTTP."""
    from distalex.data.info import read_info

    names = list(read_info(shards).splits["train"].shards)
    if source == "local":
        return str(shards), None
    if source == "pipe":
        return ",".join(f"pipe:cat {shards / n}" for n in names), str(shards / "_info.json")
    return ",".join(f"{url}/{n}" for n in names), f"{url}/_info.json"


def bench_loader(jpegs: list[bytes], workers: int, resize: int, size: int, batch: int, source: str = "local",
                 decode: str = "cpu") -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of the TrainLoader over ``jpegs``."""
    import torch

    from distalex.config import DataConfig
    from distalex.data.loader import TrainLoader
    from distalex.parallel.dims import ParallelDims

    torch.set_num_threads(1)
    device = torch.device("cuda" if decode == "gpu" else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        shards = _write_shards(jpegs, Path(tmp), workers)
        with _served(shards) if source == "http" else contextlib.nullcontext() as url:
            spec, info = _source_spec(shards, source, url)
            cfg = DataConfig(train_shards=spec, info=info, workers=workers, resize=resize, shuffle_buffer=256,
                             decode=decode)
            loader = TrainLoader(cfg, ParallelDims(device=device), global_batch=batch, image_size=size, seed=0)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            n = 0
            for b in loader.epoch(0):
                n += len(b.labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
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
    p.add_argument("--sources", default="local,pipe,http", help="comma list of local, pipe, http")
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

    import torch

    runs = [(src, "cpu") for src in a.sources.split(",") if src]
    if torch.cuda.is_available():
        runs.append(("local", "gpu"))
    else:
        print("data.decode=gpu: not measured (no CUDA device)")
    for source, decode in runs:
        n, dt, cpu = bench_loader(jpegs, a.workers, a.resize, a.size, a.batch, source=source, decode=decode)
        what = f"TrainLoader, {source}" + (", decode on the GPU" if decode == "gpu" else "")
        print(f"{what:<38} {a.workers} workers: {n / dt:7.0f} images/s total, {n / dt / a.workers:.0f} per "
              f"worker [{n / cpu:.0f} per core, main process included] (read, shuffle, decode, crop, flip, "
              "batch, worker start-up)")


if __name__ == "__main__":
    main()
