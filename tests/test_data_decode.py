"""data.decode=gpu: the device path's crops against the CPU workers' PIL crops, run on the CPU here.

Measured on this machine (torchvision and Pillow both decode with libjpeg-turbo): where Pillow does
not downscale in the DCT domain (source shorter side < 2 x data.resize, as for most of ImageNet at
256) the two paths give the same bytes, max |diff| = 0. Where it does (500x375 photos at resize
128 or 72), max |diff| was 30-47 levels and the mean 2-3: the CPU path then resamples from
libjpeg's 1/2-1/8 scale decode, the device path from the full image.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distalex.data.augment import crop_box, train_crop
from distalex.data.decode import decode_crops, resample_box
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
    out, bad = decode_crops(torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([0, len(data)]),
                            crops, resize, size, device)
    assert bad == []
    return out[0].cpu()


def pil_crop(data: bytes, resize: int, size: int, u: float, v: float, flip: bool) -> torch.Tensor:
    return torch.from_numpy(np.array(train_crop(data, resize, size, u, v, flip))).permute(2, 0, 1)


def test_resample_box_is_pillows_bilinear_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(40):
        w, h = (int(x) for x in rng.integers(6, 160, 2))
        if trial % 4 == 0:
            h = w * 4  # tall: Pillow then resizes vertically first
        size = int(rng.integers(3, 90))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if trial % 2:
            x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            box = (x0, y0, rng.uniform(x0 + 0.5, w), rng.uniform(y0 + 0.5, h))
        else:
            box = crop_box(w, h, int(rng.integers(size, 2 * size + 1)), size, rng.random(), rng.random())
        want = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR, box=box))
        got = resample_box(torch.from_numpy(a).permute(2, 0, 1).contiguous(), box, size).permute(1, 2, 0).numpy()
        assert np.array_equal(want, got), f"trial {trial}: {w}x{h} box {box} -> {size}"


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
