"""data.decode=gpu: the training rank's batched decode and crop against the CPU loader, same shards.

    python bench/decode.py                                   # 512 photos, batch 64, both forms
    python bench/decode.py --images 32 --batch 8 --repeats 1 --json decode.json

The photos and their shards are bench/data.py's: real photos in ImageNet's shapes, and the same in
the paper's form (``make_shards --square 256``, whose crops are slices). For each form:

  device decode  ``decode.decode_batch`` over the shards' images, batch after batch, as the training
                 rank runs it with data.decode=gpu (one decode call, then the batch's crops and flips);
                 on CUDA when there is a GPU (synchronized before the clock stops), else on this CPU.
                 The batches' bytes are read beforehand: this is the rank's own work, not the workers'.
  CPU loader     ``TrainLoader`` with data.decode=cpu and ``--workers`` workers over the same shards.

Images/s by wall clock, the median of ``--repeats`` passes after a warm-up; for the device decode
also per CPU-second of this process (one torch thread). The JSON is written after each form.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import FORMS, Form, _cpu_seconds, distalex_loader, imagenet_like, measure  # noqa: E402  (bench/data.py)
from results import provenance  # noqa: E402


def encoded_batches(jpegs: list[bytes], batch: int, seed: int = 0) -> list:
    """The images as the loader's workers send them with data.decode=gpu: bytes and random numbers."""
    from distalex.data.decode import EncodedBatch

    rng = np.random.default_rng(seed)
    out, pending = [], EncodedBatch()
    for i, data in enumerate(jpegs):
        u, v, f = rng.random(3)
        pending.add(data, i, float(u), float(v), bool(f < 0.5))
        if pending.fill == batch:
            out.append(pending.take(0))
    return out


def device_decode_rate(batches: list, resize: int, size: int, device, repeats: int) -> dict:
    """Images/s (wall, median of ``repeats`` passes) and per CPU-second of ``decode_batch`` on ``device``."""
    import torch

    from distalex.data.decode import decode_batch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    decode_batch(batches[0], resize, size, device)  # warm-up: decoder state, the allocator's first blocks
    sync()
    walls, cpus, n = [], [], sum(len(b.labels) for b in batches)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for b in batches:
            decode_batch(b, resize, size, device)
        sync()
        walls.append(n / (time.perf_counter() - t0))
        cpus.append(n / max(_cpu_seconds() - c0, 1e-9))
    return dict(images=n, images_per_s=statistics.median(walls), images_per_cpu_s=statistics.median(cpus))


def cpu_loader_rate(form: Form, a) -> dict:
    """Images/s by wall clock of the CPU loader's epochs (its workers' CPU time is not this process's
    to count: under the default forkserver they are the server's children)."""
    epoch = distalex_loader(form, a)  # built once; the repeats are its epochs
    epoch()  # warm-up
    ms = [measure(epoch) for _ in range(a.repeats)]
    return dict(images=ms[0]["images"], images_per_s=statistics.median(m["images"] / m["wall_s"] for m in ms))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="the CPU loader's workers")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma list of {', '.join(FORMS)}")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if not set(a.forms.split(",")) <= set(FORMS):
        p.error(f"--forms: one of {', '.join(FORMS)}")

    import torch

    from distalex import allocator
    from distalex.data.decode import probe

    torch.set_num_threads(1)
    allocator.keep_freed_memory()
    cuda = torch.cuda.is_available() and probe(torch.device("cuda")) is None
    device = torch.device("cuda" if cuda else "cpu")
    where = torch.cuda.get_device_name(0) if cuda else "this CPU (no CUDA or no nvjpeg), 1 torch thread"
    print(f"{a.images} photos in ImageNet's shapes, JPEG q{a.quality}, batch {a.batch}, resize {a.resize}, "
          f"crop {a.size}, flip; device decode on {where}; CPU loader with {a.workers} workers")
    result = {"provenance": provenance(argv), "config": vars(a), "device": where, "forms": {}}
    originals = imagenet_like(a.images, quality=a.quality)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.forms.split(","):
            form = Form(name, originals, Path(tmp), a.resize, a.quality, a.workers)
            gpu = device_decode_rate(encoded_batches(form.jpegs, a.batch), a.resize, a.size, device, a.repeats)
            cpu = cpu_loader_rate(form, a)
            result["forms"][name] = {"device_decode": gpu, "cpu_loader": cpu,
                                     "device_over_loader": gpu["images_per_s"] / cpu["images_per_s"]}
            print(f"{name:9s} ({form.kib:4.1f} KiB): device decode {gpu['images_per_s']:7.0f} img/s "
                  f"({gpu['images_per_cpu_s']:6.0f} per CPU-second of this process); CPU loader "
                  f"{cpu['images_per_s']:6.0f} img/s: the device decode {gpu['images_per_s'] / cpu['images_per_s']:.2f}x")
            if a.json:
                Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
