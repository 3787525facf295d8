"""data.decode=gpu: the device path's batched crops against Pillow's and the CPU workers' crops, run
on the CPU device here (the same tensor ops as on CUDA; only the JPEG decoder differs there).

From the same decoded pixels the batched crops are Pillow's bit for bit: tolerance 0, whatever the
batch's mix of sizes, scales, flips and pass orders. Measured on this machine (torchvision and Pillow both decode with libjpeg-turbo): where Pillow does
not downscale in the DCT domain (source shorter side < 2 x data.resize, as for most of ImageNet at
256) the two paths give the same bytes, max |diff| = 0. Where it does (500x375 photos at resize
128 or 72), max |diff| was 30-47 levels and the mean 2-3: the CPU path then resamples from
libjpeg's 1/2-1/8 scale decode, the device path from the full image.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from distalex.data.augment import crop_box, decode_crop_into, train_crop
from distalex.data.decode import Encoded, EncodedBatch, decode_batch, decode_crops, resample_batch
from distalex.data.loader import TrainLoader
from tests.test_data_loader import CLASSES, SIZE, cfg_for, dims, epoch_ids, id_jpeg, write_shards

CPU = torch.device("cpu")


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[seed % 2]).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def device_crop(data: bytes, resize: int, size: int, u: float, v: float, flip: bool, device=CPU) -> torch.Tensor:
    crops = torch.tensor([[u, v, float(flip)]], dtype=torch.float64)
    return batch_crops([data], [(u, v, flip)], resize, size, device)[0].cpu()


def encoded(jpegs: list[bytes], crops) -> Encoded:
    batch = EncodedBatch()
    for i, (data, (u, v, flip)) in enumerate(zip(jpegs, crops)):
        batch.add(data, i, u, v, bool(flip))
    return batch.take(0)


def batch_crops(jpegs: list[bytes], crops, resize: int, size: int, device=CPU) -> torch.Tensor:
    """The batched device path's crops of ``jpegs`` decoded as one batch."""
    batch = encoded(jpegs, crops)
    out, stand_in = decode_crops(batch.data, batch.offsets, batch.crops, resize, size, device)
    assert stand_in == {}
    return out


def workers_crop(data: bytes, resize: int, size: int, u: float, v: float, flip: bool) -> torch.Tensor:
    """The CPU loader workers' crop (augment.decode_crop_into)."""
    out = np.empty((3, size, size), np.uint8)
    decode_crop_into(out, data, resize, size, u, v, flip)
    return torch.from_numpy(out)


def pil_crop(data: bytes, resize: int, size: int, u: float, v: float, flip: bool) -> torch.Tensor:
    return torch.from_numpy(np.array(train_crop(data, resize, size, u, v, flip))).permute(2, 0, 1)


def test_resample_batch_is_pillows_bilinear_bit_for_bit():
    """Random images of mixed sizes (some tall: Pillow's vertical pass first), random boxes at
    every scale, flips: each batch's crops equal Pillow's resize, whatever else is in the batch."""
    rng = np.random.default_rng(0)
    for trial in range(6):
        size = int(rng.integers(3, 90))
        images, boxes, flips = [], [], []
        for i in range(8):
            w, h = (int(x) for x in rng.integers(6, 160, 2))
            if i % 4 == 0:
                h = w * 4  # tall
            if i % 2:
                x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
                boxes.append((x0, y0, rng.uniform(x0 + 0.5, w), rng.uniform(y0 + 0.5, h)))
            else:
                boxes.append(crop_box(w, h, int(rng.integers(size, 2 * size + 1)), size, rng.random(), rng.random()))
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            flips.append(bool(rng.random() < 0.5))
        got = resample_batch([torch.from_numpy(a).permute(2, 0, 1) for a in images], np.array(boxes), np.array(flips), size)
        for i, (a, box, flip) in enumerate(zip(images, boxes, flips)):
            want = Image.fromarray(a).resize((size, size), Image.BILINEAR, box=box)
            want = want.transpose(Image.FLIP_LEFT_RIGHT) if flip else want
            assert np.array_equal(np.asarray(want), got[i].permute(1, 2, 0).numpy()), f"trial {trial} image {i}: {a.shape} {box}"


MIXED = ((500, 375), (375, 500), (300, 260), (256, 341), (341, 256), (1000, 300), (300, 1000), (256, 256))
"""Photos below twice data.resize=256 (no DCT downscale on the CPU path): wide, tall (vertical
pass first), at the crop's scale with a whole-pixel square (a slice) and with a half-pixel one."""


def random_crops(n: int, seed: int) -> list[tuple[float, float, bool]]:
    rng = np.random.default_rng(seed)
    return [(float(u), float(v), bool(f < 0.5)) for u, v, f in rng.random((n, 3))]


def test_batched_crops_of_mixed_sizes_are_the_cpu_workers_and_pillows():
    jpegs = [photo_jpeg(w, h, i) for i, (w, h) in enumerate(MIXED)]
    crops = random_crops(len(jpegs), 3)
    got = batch_crops(jpegs, crops, 256, 224)
    for i, (data, (u, v, flip)) in enumerate(zip(jpegs, crops)):
        assert torch.equal(got[i], workers_crop(data, 256, 224, u, v, flip)), f"image {i}: {MIXED[i % len(MIXED)]}"
        assert torch.equal(got[i], pil_crop(data, 256, 224, u, v, flip)), f"image {i}"


def test_batched_crops_of_the_papers_form_are_slices():
    """256 x 256 squares (make_shards --square 256) at resize 256: the batch is one gather, and each
    crop is the decoded square's pixels, as the CPU workers and Pillow cut them."""
    from distalex.data.make_shards import paper_form

    squares = [paper_form(photo_jpeg(w, h, i), 256, 90)[0] for i, (w, h) in enumerate(MIXED * 2)]
    crops = random_crops(len(squares), 4)
    got = batch_crops(squares, crops, 256, 224)
    for i, (data, (u, v, flip)) in enumerate(zip(squares, crops)):
        x, y = int(u * 33), int(v * 33)
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)
        cut = decoded[:, y : y + 224, x : x + 224]
        assert torch.equal(got[i], cut.flip(-1) if flip else cut), f"image {i}"
        assert torch.equal(got[i], workers_crop(data, 256, 224, u, v, flip))
    # one image that needs resampling turns the batch into a resampled one: the squares' crops hold
    mixed = batch_crops(squares[:5] + [photo_jpeg(500, 375, 0)], crops[:6], 256, 224)
    assert torch.equal(mixed[:5], got[:5])


def test_a_crop_depends_only_on_its_images_random_numbers():
    """Resume-safe: the same bytes and (u, v, flip) give the same crop in any batch (alone, in
    another order, beside other sizes) and on every call."""
    jpegs = [photo_jpeg(w, h, i) for i, (w, h) in enumerate(MIXED)]
    crops = random_crops(len(jpegs), 5)
    whole = batch_crops(jpegs, crops, 256, 224)
    assert torch.equal(batch_crops(jpegs, crops, 256, 224), whole)
    order = [5, 2, 7, 0, 6, 1, 4, 3]
    assert torch.equal(batch_crops([jpegs[i] for i in order], [crops[i] for i in order], 256, 224), whole[order])
    for i in (0, 6, 7):
        assert torch.equal(batch_crops([jpegs[i]], [crops[i]], 256, 224)[0], whole[i])


def test_resampling_runs_fit_their_budget_and_give_the_same_crops(monkeypatch):
    """Images are resampled in consecutive runs whose padded temporaries fit RESAMPLE_BUDGET: a
    large photo pads its own run, not the batch, and every budget gives the same crops."""
    from distalex.data import decode

    jpegs = [photo_jpeg(w, h, i) for i, (w, h) in enumerate(MIXED[:4] + ((1600, 1200),) + MIXED[4:])]
    crops = random_crops(len(jpegs), 9)
    one_by_one = batch_crops(jpegs, crops, 256, 224)  # the CPU device's default
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    boxes = np.array([crop_box(w, h, 256, 224, u, v) for (w, h), (u, v, _) in zip(sizes, crops)])
    g = decode._geometry(np.array([w for w, _ in sizes]), np.array([h for _, h in sizes]), boxes, 224)
    budget = int(3 * 3 * g.rows[:4].max() * g.span[:4].max())  # about three of the ordinary photos
    runs = decode._runs(g, 224, budget)
    assert [r for r in runs if r.start <= 4 < r.stop] == [slice(4, 5)]  # the large photo alone
    assert len(runs) < len(jpegs) - 1 and sum(r.stop - r.start for r in runs) == len(jpegs)
    assert all(r.stop - r.start == 1 or (r.stop - r.start) * 3 * g.rows[r].max() * max(g.span[r].max(), 224) <= budget
               for r in runs)
    for limit in (budget, 1 << 27):
        monkeypatch.setitem(decode.RESAMPLE_BUDGET, "cpu", limit)
        assert torch.equal(batch_crops(jpegs, crops, 256, 224), one_by_one)


@pytest.mark.parametrize("form", ["paper", "mixed"])
def test_channels_first_images_give_the_same_crops(form):
    """nvjpeg hands out channels-first images, the CPU decoder a channels-last view: the batch is
    laid out in the decoder's order, and both give the same crops (here both on the CPU device)."""
    from distalex.data.decode import crop_batch, decode_images
    from distalex.data.make_shards import paper_form

    jpegs = [photo_jpeg(w, h, i) for i, (w, h) in enumerate(MIXED)]
    if form == "paper":
        jpegs = [paper_form(j, 256, 90)[0] for j in jpegs]
    crops = np.array(random_crops(len(jpegs), 8), dtype=np.float64)
    images = decode_images([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs], CPU)
    assert not images[0].is_contiguous()  # (3, H, W) over libjpeg's HWC buffer
    first = [img.contiguous() for img in images]
    assert torch.equal(crop_batch(first, crops, 256, 224), crop_batch(images, crops, 256, 224))


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Every op torch dispatches, by name; views and the JPEG decoder's own ops aside."""

    def __init__(self):
        super().__init__()
        self.kernels, self.from_host, self.host_reads = Counter(), 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func is torch.ops.aten.lift_fresh.default:
            self.from_host += 1  # a tensor made from host data (torch.tensor, torch.from_numpy)
        elif func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                      torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default):
            self.host_reads.append(name)  # .item(), .tolist(), bool(), data-dependent shapes: a sync on CUDA
        elif not func.is_view and not name.startswith(("image.", "torchvision.")):
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["paper", "mixed"])
def test_a_batch_costs_the_same_ops_whatever_its_size(form, monkeypatch):
    """The work of a batch is a constant number of tensor ops, not a loop over its images: 4 and 12
    images dispatch the same ops, none reads a value back, and one tensor (the per-batch table)
    comes from the host. (The CPU device's torchvision decodes a list one image at a time; its ops
    are left out, as on CUDA one call decodes the list. The CPU device resamples image by image,
    for its caches: here it takes the whole batch, as a GPU does.)"""
    from distalex.data import decode
    from distalex.data.make_shards import paper_form

    monkeypatch.setitem(decode.RESAMPLE_BUDGET, "cpu", 1 << 27)

    shapes = ((500, 375), (375, 500), (300, 260), (341, 256))  # none tall: a tall image costs one transposing copy
    jpegs = [photo_jpeg(w, h, i) for i, (w, h) in enumerate(shapes * 3)]
    if form == "paper":
        jpegs = [paper_form(j, 256, 90)[0] for j in jpegs]
    crops = random_crops(12, 6)
    counts = []
    for n in (4, 12):
        batch = encoded(jpegs[:n], crops[:n])
        with OpCounter() as ops:
            images, labels, skipped = decode_batch(batch, 256, 224, CPU)
        assert images.shape == (n, 3, 224, 224) and torch.equal(labels, torch.arange(n)) and skipped == 0
        assert ops.host_reads == [] and ops.from_host == 1, (ops.host_reads, ops.from_host)
        counts.append(ops.kernels)
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) < (30 if form == "paper" else 150), counts[0]


@pytest.mark.parametrize("resize,size,draft", [(256, 224, False), (128, 112, True), (72, 64, True)])
def test_device_crop_equals_pil_crop(resize, size, draft):
    rng = np.random.default_rng(1)
    diffs = []
    for i in range(4):
        data = photo_jpeg(500, 375, i)
        u, v, f = rng.random(3)
        diff = (device_crop(data, resize, size, u, v, f < 0.5).int() - pil_crop(data, resize, size, u, v, f < 0.5).int()).abs()
        diffs.append((int(diff.max()), float(diff.float().mean())))
    worst, mean = max(d[0] for d in diffs), max(d[1] for d in diffs)
    print(f"resize {resize}, crop {size}: max |diff| {worst}, mean {mean:.2f}")
    if draft:  # PIL decodes at a DCT scale of 1/2 or less: close, not equal
        assert 0 < worst <= 64 and mean < 3.0
    else:
        assert worst == 0


def test_gpu_decode_loader_gives_the_cpu_loaders_batches(tmp_path, capsys):
    write_shards(tmp_path, [9, 14, 5, 12])
    for dp_rank in (0, 1):
        cpu = TrainLoader(cfg_for(tmp_path, workers=2), dims(2, dp_rank), 8, SIZE, seed=3)
        gpu = TrainLoader(cfg_for(tmp_path, workers=2, decode="gpu"), dims(2, dp_rank), 8, SIZE, seed=3)
        assert gpu.decode_device == CPU and cpu.decode_device is None
        for a, b in zip(cpu.epoch(1), gpu.epoch(1, 0)):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        resumed = list(gpu.epoch(1, 2))
        assert [torch.equal(a.images, b.images) for a, b in zip(list(cpu.epoch(1))[2:], resumed)] == [True] * 3
    assert "data.decode=gpu: the run has no CUDA device" in capsys.readouterr().err


def test_gpu_decode_reads_the_papers_form(tmp_path):
    """Shards in the paper's stored form (make_shards --square 256, real photos): data.decode=gpu
    (here on the CPU device) gives the CPU workers' batches, its crops sliced, not resampled."""
    from distalex.config import DataConfig
    from distalex.data.make_shards import make_shards, paper_form

    for split, n in (("train", 24), ("val", 2)):
        for c in range(2):
            (tmp_path / "src" / split / f"n{c}").mkdir(parents=True)
        for i in range(n):
            w, h = ((500, 375), (375, 500), (500, 333), (800, 600))[i % 4]
            (tmp_path / "src" / split / f"n{i % 2}" / f"{i}.JPEG").write_bytes(photo_jpeg(w, h, i))
    make_shards(tmp_path / "src", tmp_path / "shards", square=256, quality=90, max_count=8, stats_samples=0)
    cfg = dict(train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), resize=256, workers=2)
    cpu = TrainLoader(DataConfig(**cfg), dims(), 4, 224, seed=1)
    gpu = TrainLoader(DataConfig(**cfg, decode="gpu"), dims(), 4, 224, seed=1)
    pairs = list(zip(cpu.epoch(0), gpu.epoch(0)))
    assert len(pairs) == 6
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in pairs)
    square = paper_form((tmp_path / "src" / "train" / "n0" / "0.JPEG").read_bytes(), 256, 90)[0]
    crop = device_crop(square, 256, 224, 0.4, 0.7, True)
    x, y = int(0.4 * 33), int(0.7 * 33)
    decoded = torch.from_numpy(np.asarray(Image.open(io.BytesIO(square)))).permute(2, 0, 1)
    assert torch.equal(crop, decoded[:, y : y + 224, x : x + 224].flip(-1))


def test_gpu_decode_skips_and_counts_undecodable_images(tmp_path):
    jpeg = id_jpeg(7)
    scan = jpeg.find(b"\xff\xda")
    broken_body = jpeg[:scan] + b"\xff\xda\x00\x02" + bytes(50)  # header reads, the data does not decode
    with tarfile.open(tmp_path / "imagenet-train-000000.tar", "w") as tf:
        for i in range(12):
            data = {3: b"\xff\xd8 no header", 8: broken_body}.get(i, id_jpeg(i))
            for ext, payload in (("jpg", data), ("cls", str(i % CLASSES).encode())):
                ti = tarfile.TarInfo(f"s{i:05d}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    info = {"classes": [str(c) for c in range(CLASSES)], "splits": {"train": {"count": 12, "shards": [
        {"name": "imagenet-train-000000.tar", "count": 12}]}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    ld = TrainLoader(cfg_for(tmp_path, workers=1, decode="gpu", shuffle_buffer=0), dims(), 4, SIZE, seed=0)
    ids, batches = epoch_ids(ld, 0)  # images still match their labels
    assert len(batches) == 3
    flat = sum(ids, [])
    assert 3 not in flat and 8 not in flat  # the header-less one is replaced by the next sample, the other by a copy
    assert int(batches[-1].skipped) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg); the CPU tests above run the same code")
def test_nvjpeg_crops_are_close_to_the_cpu_crops():
    rng = np.random.default_rng(2)
    worst, mean = 0, 0.0
    for i in range(4):
        data = photo_jpeg(500, 375, i)
        u, v, f = rng.random(3)
        gpu = device_crop(data, 256, 224, u, v, f < 0.5, torch.device("cuda"))
        diff = (gpu.int() - pil_crop(data, 256, 224, u, v, f < 0.5).int()).abs()
        worst, mean = max(worst, int(diff.max())), max(mean, float(diff.float().mean()))
    print(f"nvjpeg vs PIL at 256/224: max |diff| {worst}, mean {mean:.3f}")
    assert worst <= 16 and mean < 1.0  # the decoders' IDCT and chroma upsampling differ slightly
