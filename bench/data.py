"""The input pipeline: images per CPU-second of every process, distalex next to the usual loaders.

    python bench/data.py                        # the comparison below, 3 repeats (~5 min on 2 cores)
    python bench/data.py --stages               # where one image's microseconds go, stage by stage
    python bench/data.py --sources local,pipe,http --forms originals --pipelines distalex
    python bench/data.py --pipelines distalex,distalex-gpu --workers 8 --feeds bench.json   # a GPU node

The images are real photos (scikit-learn's two sample images) cut into ImageNet's usual shapes
(500x375, 375x500, 500x333, 500x500, 800x600) and saved as JPEGs at ``--quality`` 90 (~57 KiB mean);
``paper`` is the same photos as ``make_shards --square 256`` stores them (shorter side 256, the
central square; ~17 KiB). Each form is written once as shards (make_shards, its time reported)
and as an ImageNet-layout folder of the same files, and every pipeline reads the same bytes:

  distalex       ``TrainLoader`` (tar reading, shuffle buffer, decode, the paper's crop and flip,
                 uint8 batches handed to the training process), ``--workers`` workers
  distalex-gpu   the same with ``data.decode=gpu``: the workers only read, the training process
                 decodes and crops each batch on its device (on its CPU where there is no CUDA)
  webdataset     ``webdataset.WebDataset`` over the same shards + torchvision transforms (Resize,
                 CenterCrop, RandomCrop, RandomHorizontalFlip, PILToTensor) in a ``WebLoader``
  imagefolder    ``torchvision.datasets.ImageFolder`` over the folder, same transforms, DataLoader
  pillow         bare decode in one process, bytes in memory: Pillow to an RGB numpy array
  torchvision    bare decode in one process: ``torchvision.io.decode_jpeg(..., mode=RGB)``

All loaders: batch ``--batch``, shuffle buffer 256 where there is one, uint8 output (the float
conversion and normalisation happen on the device in distalex). Each loader is built once, as
training builds it, and the repeats are its epochs, each over all ``--images`` images with its
worker start-up (workers are started per epoch: ~0.1 CPU-s here, a few percent of a 5,120-image
epoch, nothing next to an ImageNet one). CPU time is that of every process (this one, the
workers, what they ran), taken with ``getrusage`` once the workers have been joined; on a machine
shared with other jobs it is fairer than wall time. The process keeps freed memory as
``distalex.train`` does on the CPU (``distalex.allocator``), for every pipeline. The pipelines run
in turn, ``--repeats`` times; the table gives the median and the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distalex.data.augment import train_crop  # noqa: E402

SHAPES = ((500, 375), (375, 500), (500, 333), (500, 500), (800, 600))
"""ImageNet's common training-image shapes (most are 500 px on the longer side)."""
PIPELINES = ("distalex", "distalex-gpu", "webdataset", "imagefolder", "pillow", "torchvision")
FORMS = ("originals", "paper")
SHUFFLE_BUFFER = 256
CLASSES = 4


def imagenet_like(n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` JPEGs in ImageNet's shapes, views of scikit-learn's two photos at random places and scales."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640x427 each
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src, (w, h) = photos[i % len(photos)], SHAPES[i % len(SHAPES)]
        bw = min(src.width, src.height * w / h) * rng.uniform(0.6, 1.0)  # the view's box, the target's aspect
        bh = bw * h / w
        x, y = rng.uniform(0, src.width - bw), rng.uniform(0, src.height - bh)
        img = src.resize((w, h), Image.BILINEAR, box=(x, y, x + bw, y + bh))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _crop_all(args) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of this process) of ``train_crop`` over bytes in memory."""
    jpegs, resize, size, seed = args
    rng = np.random.default_rng(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for data in jpegs:
        u, v, f = rng.random(3)
        train_crop(data, resize, size, u, v, f < 0.5)
    return len(jpegs), time.perf_counter() - t0, time.process_time() - c0


def _cpu_seconds() -> float:
    """CPU time of this process and of every process below it (``_children_cpu_seconds``)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime + _children_cpu_seconds()


def _children_cpu_seconds() -> float:
    """CPU time of the finished (joined) children, and of the processes still running below this
    one with their own finished children: loader workers started by a fork server (the default
    start method) are its children, not this process's, and count only through it."""
    import psutil

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = kids.ru_utime + kids.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # ended meanwhile: its time is in its parent's children
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)}


def _joined(started_after: set[int], timeout: float = 10.0) -> None:
    """Wait for every child process not in ``started_after`` to be joined: only then does its CPU
    time count. (Children that were there before, such as torch.compile's workers, are not waited for.)"""
    deadline = time.monotonic() + timeout
    while _children() - started_after:
        if time.monotonic() > deadline:
            raise RuntimeError(f"child processes still running: {sorted(_children() - started_after)}")
        mp.active_children()  # joins finished multiprocessing children
        time.sleep(0.01)


# ------------------------------------------------------------------ the data, in both forms


def write_source(jpegs: list[bytes], root: Path) -> Path:
    """An ImageNet-layout folder (train/<class>/*.JPEG, val/ with one image per class)."""
    for split in ("train", "val"):
        for c in range(CLASSES):
            (root / split / f"n{c:08d}").mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (root / "train" / f"n{i % CLASSES:08d}" / f"img_{i:06d}.JPEG").write_bytes(data)
    for c in range(CLASSES):
        (root / "val" / f"n{c:08d}" / "v.JPEG").write_bytes(jpegs[c])
    return root


def _write_shards(jpegs: list[bytes], root: Path, workers: int, **make_shards_args) -> Path:
    """``jpegs`` as training shards (8 or more, so that every worker has its own) in ``root``/shards."""
    from distalex.data.make_shards import make_shards

    src = write_source(jpegs, root / "src")
    make_shards(src, root / "shards", max_count=max(1, len(jpegs) // 16), workers=workers, stats_samples=0,
                **make_shards_args)
    return root / "shards"


def shard_images(shards: Path) -> list[bytes]:
    """The training images stored in ``shards``, in shard order."""
    import tarfile

    from distalex.data.info import read_info

    out = []
    for name in read_info(shards).splits["train"].shards:
        with tarfile.open(shards / name) as tf:
            out += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    return out


class Form:
    """One form of the photos: its shards (make_shards), the same images as a folder and in memory."""

    def __init__(self, name: str, originals: list[bytes], root: Path, side: int, quality: int, workers: int):
        self.name = name
        square = dict(square=side, quality=quality) if name == "paper" else {}
        t0, c0 = time.perf_counter(), _cpu_seconds()
        self.shards = _write_shards(originals, root / name, workers, **square)
        self.make_shards_s = (time.perf_counter() - t0, _cpu_seconds() - c0)
        self.jpegs = shard_images(self.shards)  # what every pipeline reads
        self.folder = write_source(self.jpegs, root / name / "folder") / "train"
        self.kib = float(np.mean([len(j) for j in self.jpegs]) / 1024)


# ------------------------------------------------------------------ the pipelines
# Each builds its loader once (as training does) and returns one epoch's run: images seen.


def distalex_loader(form: Form, a, decode: str = "cpu", source: str = "local", url: str | None = None):
    import torch

    from distalex.config import DataConfig
    from distalex.data.loader import TrainLoader
    from distalex.parallel.dims import ParallelDims

    device = torch.device("cuda" if decode == "gpu" and torch.cuda.is_available() else "cpu")
    spec, info = _source_spec(form.shards, source, url)
    cfg = DataConfig(train_shards=spec, info=info, workers=a.workers, resize=a.resize, shuffle_buffer=SHUFFLE_BUFFER,
                     decode=decode)
    loader = TrainLoader(cfg, ParallelDims(device=device), a.batch, a.size, seed=0)
    epochs = iter(range(1 << 30))

    def epoch() -> int:
        n = 0
        for b in loader.epoch(next(epochs)):
            n += len(b.labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    return epoch


def _transform(a):
    import torchvision.transforms as T

    return T.Compose([T.Resize(a.resize), T.CenterCrop(a.resize), T.RandomCrop(a.size), T.RandomHorizontalFlip(),
                      T.PILToTensor()])


def _epoch_of(batches):
    return lambda: sum(len(images) for images, _ in batches)


def webdataset_loader(form: Form, a):
    import webdataset as wds

    from distalex.data.info import read_info

    urls = [str(form.shards / name) for name in read_info(form.shards).splits["train"].shards]
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
          .shuffle(SHUFFLE_BUFFER).decode("pil").to_tuple("jpg", "cls").map_tuple(_transform(a), int)
          .batched(a.batch))
    return _epoch_of(wds.WebLoader(ds, batch_size=None, num_workers=a.workers))


def imagefolder_loader(form: Form, a):
    import torch
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(form.folder), transform=_transform(a))
    return _epoch_of(torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers))


def pillow_decode(form: Form, a):
    def epoch() -> int:
        for data in form.jpegs:
            img = Image.open(io.BytesIO(data))
            np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        return len(form.jpegs)

    return epoch


def torchvision_decode(form: Form, a):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def epoch() -> int:
        for data in form.jpegs:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return len(form.jpegs)

    return epoch


PIPELINE_BUILDERS = {
    "distalex": distalex_loader, "distalex-gpu": lambda form, a: distalex_loader(form, a, decode="gpu"),
    "webdataset": webdataset_loader, "imagefolder": imagefolder_loader, "pillow": pillow_decode,
    "torchvision": torchvision_decode,
}


def measure(epoch) -> dict:
    """One epoch: images, wall s, CPU s of every process, and of the children (the workers) alone."""
    before = _children()
    t0, c0, k0 = time.perf_counter(), _cpu_seconds(), _children_cpu_seconds()
    n = epoch()
    _joined(before)
    return dict(images=n, wall_s=time.perf_counter() - t0, cpu_s=_cpu_seconds() - c0,
                workers_cpu_s=_children_cpu_seconds() - k0)


# ------------------------------------------------------------------ shards from other sources


def _source_spec(shards: Path, source: str, url: str | None) -> tuple[str, str | None]:
    """(data.train_shards, data.info) reading the shards in ``shards`` as local files, pipe: or HTTP."""
    from distalex.data.info import read_info

    names = list(read_info(shards).splits["train"].shards)
    if source == "local":
        return str(shards), None
    if source == "pipe":
        return ",".join(f"pipe:cat {shards / n}" for n in names), str(shards / "_info.json")
    return ",".join(f"{url}/{n}" for n in names), f"{url}/_info.json"


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


def bench_loader(jpegs: list[bytes], workers: int, resize: int, size: int, batch: int, source: str = "local",
                 decode: str = "cpu") -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of the TrainLoader over ``jpegs`` (bench.py's row)."""
    import torch

    torch.set_num_threads(1)
    a = argparse.Namespace(workers=workers, resize=resize, size=size, batch=batch)
    with tempfile.TemporaryDirectory() as tmp:
        form = Form("originals", jpegs, Path(tmp), resize, 90, workers)
        with _served(form.shards) if source == "http" else contextlib.nullcontext() as url:
            m = measure(distalex_loader(form, a, decode=decode, source=source, url=url))
    return m["images"], m["wall_s"], m["cpu_s"]


# ------------------------------------------------------------------ stage by stage


def stages(form: Form, a) -> list[tuple[str, float]]:
    """(stage, microseconds per image) in this process: what a loader worker does, piece by piece."""
    from distalex.data import augment, resample
    from distalex.data.info import resolve_shards
    from distalex.data.loader import Segment, read_segment

    def per_image(fn, n) -> float:
        fn()  # warm-up (imports, compilation)
        c0 = time.process_time()
        fn()
        return (time.process_time() - c0) / n * 1e6

    def distalex_cpu() -> tuple[float, float]:
        """(workers', main process's) CPU microseconds per image in the second epoch of one TrainLoader."""
        epoch = distalex_loader(form, a)
        epoch()
        m = measure(epoch)
        return m["workers_cpu_s"] / m["images"] * 1e6, (m["cpu_s"] - m["workers_cpu_s"]) / m["images"] * 1e6

    workers_us, main_us = distalex_cpu()  # first, while this process is small: forking it costs less
    jpegs, n = form.jpegs, len(form.jpegs)
    rng = np.random.default_rng(0)
    crops = [(*rng.random(2), rng.random() < 0.5) for _ in jpegs]
    shards = resolve_shards(str(form.shards), "train", "shards", None)

    def read():
        for s in shards:
            for _ in read_segment(Segment(s.url, 0, s.count), lambda *_: None):
                pass

    out = np.empty((3, a.size, a.size), dtype=np.uint8)
    some = min(n, 500)  # decoded images held for the crop rows (all of them would be gigabytes)
    decoded = [augment.decode_hwc(j, a.resize) for j in jpegs[:some]]
    boxes = [augment.crop_box(d.shape[1], d.shape[0], a.resize, a.size, u, v) for d, (u, v, _) in zip(decoded, crops)]
    rows = [
        ("tar reading (read_segment, per sample)", per_image(read, n)),
        ("decode, Pillow (to an RGB array)", per_image(pillow_decode(form, a), n)),
        ("decode, torchvision.io", per_image(torchvision_decode(form, a), n)),
        ("decode + crop + flip, Pillow (augment.train_crop)", per_image(
            lambda: [augment.train_crop(j, a.resize, a.size, u, v, f) for j, (u, v, f) in zip(jpegs, crops)], n)),
        ("  decode (augment.decode_hwc: torchvision.io, or Pillow)", per_image(
            lambda: [augment.decode_hwc(j, a.resize) for j in jpegs], n)),
        ("  crop + flip into the batch: resample (resample_into)", per_image(
            lambda: [resample.resample_into(out, d, b, f) for d, b, (_, _, f) in zip(decoded, boxes, crops)], some)),
        ("  crop + flip into the batch: slice (slice_into)", per_image(
            lambda: [resample.slice_into(out, d, 0, 0, f) for d, (_, _, f) in zip(decoded, crops)], some)),
        ("decode + crop + flip into the batch (augment.decode_crop_into)", per_image(
            lambda: [augment.decode_crop_into(out, j, a.resize, a.size, u, v, f) for j, (u, v, f) in zip(jpegs, crops)],
            n)),
    ]
    rows.append((f"TrainLoader, {a.workers} workers: the workers' CPU (2nd epoch)", workers_us))
    rows.append(("TrainLoader: the training process's CPU (receiving, copying out)", main_us))
    return rows


# ------------------------------------------------------------------ main


def _summary(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:7.0f} ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else f"{med:7.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the photos and of the paper form")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma list of {', '.join(FORMS)}")
    p.add_argument("--pipelines", default="distalex,webdataset,imagefolder,pillow,torchvision",
                   help=f"comma list of {', '.join(PIPELINES)}")
    p.add_argument("--sources", default="local", help="distalex from local files, pipe:cat or HTTP: comma list")
    p.add_argument("--stages", action="store_true", help="the per-image cost of each stage instead")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--feeds", default=None, metavar="BENCH_JSON",
                   help="bench/bench.py's JSON: say how many cores it takes to feed the training step it measured")
    a = p.parse_args(argv)
    forms, pipelines = a.forms.split(","), a.pipelines.split(",")
    sources = a.sources.split(",")
    for name, given, allowed in (("--forms", forms, FORMS), ("--pipelines", pipelines, PIPELINES),
                                 ("--sources", sources, ("local", "pipe", "http"))):
        if not set(given) <= set(allowed):
            p.error(f"{name}: {sorted(set(given) - set(allowed))} not among {', '.join(allowed)}")

    import torch

    from distalex import allocator

    torch.set_num_threads(1)
    allocator.keep_freed_memory()  # as distalex.train does on the CPU (the loader's copies out reuse memory)
    cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    print(f"{a.images} photos in ImageNet's shapes, JPEG q{a.quality}; {a.workers} workers, batch {a.batch}, "
          f"resize {a.resize}, crop {a.size}, flip; {cores} CPU cores"
          f"{', CUDA: ' + torch.cuda.get_device_name(0) if cuda else ', no CUDA'}")
    originals = imagenet_like(a.images, quality=a.quality)
    result = {"config": vars(a), "cores": cores, "cuda": torch.cuda.get_device_name(0) if cuda else None,
              "forms": {}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        made = {}
        for name in forms:
            made[name] = form = Form(name, originals, Path(tmp), a.resize, a.quality, a.workers)
            wall, cpu = form.make_shards_s
            print(f"{name:9s}: {form.kib:5.1f} KiB mean; make_shards {wall:.1f} s, "
                  f"{cpu / len(originals) * 1e3:.2f} CPU-ms per image")
            result["forms"][name] = dict(kib=form.kib, make_shards_wall_s=wall, make_shards_cpu_s=cpu)
        if a.stages:
            for name, form in made.items():
                print(f"\n{name}: microseconds per image (CPU, one process unless said)")
                for stage, us in stages(form, a):
                    print(f"  {stage:66s} {us:7.0f}")
                    result["rows"].append(dict(form=name, stage=stage, us_per_image=us))
            return _write(result, a.json)
        runs = [(pipe, src) for pipe in pipelines for src in (sources if pipe.startswith("distalex") else ["local"])]
        if "distalex-gpu" in pipelines and not cuda:
            print("distalex-gpu: no CUDA device here; data.decode=gpu decodes on the CPU of the training process")
        rates = {(f, pipe, src): [] for f in forms for pipe, src in runs}
        walls = {k: [] for k in rates}
        with contextlib.ExitStack() as servers:
            epochs = {}  # each loader built once: the repeats are its epochs, as in training
            for name, form in made.items():
                for pipe, src in runs:
                    if src == "local":
                        epochs[name, pipe, src] = PIPELINE_BUILDERS[pipe](form, a)
                    else:
                        url = servers.enter_context(_served(form.shards)) if src == "http" else None
                        decode = "gpu" if pipe == "distalex-gpu" else "cpu"
                        epochs[name, pipe, src] = distalex_loader(form, a, decode=decode, source=src, url=url)
            for r in range(a.repeats):
                for key, epoch in epochs.items():
                    m = measure(epoch)
                    rates[key].append(m["images"] / m["cpu_s"])
                    walls[key].append(m["images"] / m["wall_s"])
                    result["rows"].append(dict(form=key[0], pipeline=key[1], source=key[2], repeat=r, **m))
        print(f"\nimages per CPU-second of all processes (median, min-max of {a.repeats}); images/s by wall clock")
        for name in made:
            best_bare = max((statistics.median(rates[name, p, "local"]) for p in ("pillow", "torchvision")
                             if (name, p, "local") in rates), default=None)
            wds = (name, "webdataset", "local")
            wds = statistics.median(rates[wds]) if wds in rates else None
            print(f"{name}:")
            for pipe, src in runs:
                label = pipe + (f" ({src})" if src != "local" else "")
                med = statistics.median(rates[name, pipe, src])
                ratios = []
                if best_bare and pipe.startswith("distalex"):
                    ratios.append(f"{med / best_bare:.2f}x the best bare decode")
                if wds and pipe.startswith("distalex"):
                    ratios.append(f"{med / wds:.2f}x webdataset")
                print(f"  {label:22s} {_summary(rates[name, pipe, src])} img/CPU-s  "
                      f"{statistics.median(walls[name, pipe, src]):6.0f} img/s  {'; '.join(ratios)}")
        result["summary"] = {f"{f}/{p}/{s}": dict(images_per_cpu_s=statistics.median(v),
                                                  images_per_s=statistics.median(walls[f, p, s]))
                             for (f, p, s), v in rates.items()}
        if a.feeds:
            result["feeds"] = feeds(a.feeds, result["summary"], cores)
    return _write(result, a.json)


def feeds(bench_json: str, summary: dict, cores: int) -> dict | None:
    """Whether this machine's cores can feed its accelerator: the training step's images/s (the
    fastest distalex row of bench/bench.py's JSON) against the loader's images per CPU-second."""
    try:
        rows = json.loads(Path(bench_json).read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        print(f"feeds: no training-step numbers ({bench_json}: {e})")
        return None
    steps = [r for r in rows if r.get("status") == "ok" and r["name"].startswith("distalex/") and r.get("images_per_s")]
    if not steps:
        print(f"feeds: no distalex row ran in {bench_json}")
        return None
    step = max(steps, key=lambda r: r["images_per_s"])
    need = step["images_per_s"]
    print(f"\nthe training step, {step['name']}: {need:.0f} images/s ({bench_json})")
    out = {"step": step["name"], "step_images_per_s": need, "cores": cores, "loaders": {}}
    for key, m in summary.items():
        form, pipe, _ = key.split("/")
        if not pipe.startswith("distalex"):
            continue
        cores_needed = need / m["images_per_cpu_s"]
        how = "CPU decode" if pipe == "distalex" else "data.decode=gpu"
        print(f"  {form:9s} {how:15s}: {m['images_per_cpu_s']:6.0f} img/CPU-s -> {cores_needed:5.1f} cores to feed it "
              f"({cores} here); one loading process gave {m['images_per_s']:.0f} img/s")
        out["loaders"][key] = dict(m, cores_needed=cores_needed)
    return out


def _write(result: dict, path: str | None) -> int:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
