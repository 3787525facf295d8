"""Training crops decoded on the device (``data.decode: gpu``), pixel for pixel the CPU path's.

The loader workers only read: they send a batch's image bytes with each crop's random numbers
(u, v, flip). The training rank decodes the batch with one ``torchvision.io.decode_jpeg`` call
on its device (nvjpeg on CUDA; PNG and WebP on the CPU), cuts each image to ``augment.crop_box``
and resamples it with Pillow's bilinear filter computed as Pillow computes it: the same taps,
22-bit fixed-point weights, each pass rounded to uint8, in Pillow's order of the passes. So
from the same decoded pixels the crop equals ``augment.train_crop``'s bit for bit; what differs is
the decoder (none on the CPU: torchvision and Pillow use the same libjpeg-turbo), and Pillow's
DCT-domain downscale (``draft``), which the CPU path uses for images at least twice the crop's
scale and this path does not (measured in tests/test_data_decode.py). An image already at the
crop's scale (the paper's stored form, ``make_shards --square``) is sliced, not resampled, as on the CPU.
"""

from __future__ import annotations

import io
import logging
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from distalex.data import resample
from distalex.data.augment import at_scale, check_header, crop_box, torchvision_io
from distalex.data.info import DataError
from distalex.data.resample import PRECISION_BITS

log = logging.getLogger("distalex.data")

JPEG_MAGIC = (0xFF, 0xD8)


class Taps(NamedTuple):
    """How one axis is resampled: output i = sum_j weight[i, j] * source[index[i, j]] (fixed point)."""

    index: torch.Tensor  # int64 (out, k)
    weight: torch.Tensor  # int32 (out, k), sums to about 2**22 per row
    start: int  # the first source pixel any output reads
    stop: int  # one past the last


def _taps(in_size: int, lo: float, hi: float, out_size: int, device: torch.device) -> Taps:
    """Pillow's weights (``resample.pillow_taps``) for output pixels covering [lo, hi) of the source,
    sent to ``device`` without a sync."""
    start, count, weight = resample.pillow_taps(in_size, lo, hi, out_size)
    start_t = torch.from_numpy(start)
    index = (start_t[:, None] + torch.arange(weight.shape[1])).clamp(max=in_size - 1)  # taps past the edge weigh 0
    return Taps(host_to_device(index, device), host_to_device(torch.from_numpy(weight), device),
                int(start[0]), int(start[-1] + count[-1]))


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without waiting for the device: a copy from pageable memory would
    first synchronize the stream, so it is pinned (torch's caching host allocator) on CUDA."""
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _pass(src: torch.Tensor, taps: Taps, offset: int = 0) -> torch.Tensor:
    """One separable pass along dim 0 of an int32 (L, M) array whose row 0 is source pixel ``offset``
    -> (out, M), rounded to 0..255 as Pillow does.

    The products fit int32 as in Pillow: 255 * 2**22 plus the rounding term stays below 2**31.
    """
    out, k = taps.index.shape
    index = (taps.index - offset).clamp_(0, src.shape[0] - 1)  # only zero-weight taps are clamped
    picked = src.index_select(0, index.reshape(-1)).view(out, k, -1)  # whole rows: contiguous copies
    acc = (picked * taps.weight[:, :, None]).sum(1, dtype=torch.int32) + (1 << (PRECISION_BITS - 1))
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def resample_box(image: torch.Tensor, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): ``PIL.Image.resize((size, size), BILINEAR, box=box)``."""
    _, h, w = image.shape
    xs = _taps(w, box[0], box[2], size, image.device)
    ys = _taps(h, box[1], box[3], size, image.device)
    # The first pass covers only the rows (columns) the second reads; the values do not depend on it.
    if h > size and h - size > 2 * (w - size):  # Pillow's rule for doing the vertical pass first
        cols = image[:, :, xs.start : xs.stop].to(torch.int32).permute(1, 0, 2).reshape(h, -1)  # (H, 3 * cols)
        tall = _pass(cols, ys).view(size, 3, xs.stop - xs.start)
        flat = tall.permute(2, 1, 0).reshape(xs.stop - xs.start, -1)  # (cols, 3 * size)
        return _pass(flat, xs, xs.start).view(size, 3, size).permute(1, 2, 0).to(torch.uint8)
    rows = image[:, ys.start : ys.stop].to(torch.int32).permute(2, 0, 1).reshape(w, -1)  # (W, 3 * rows)
    wide = _pass(rows, xs).view(size, 3, ys.stop - ys.start)
    flat = wide.permute(2, 1, 0).reshape(ys.stop - ys.start, -1)  # (rows, 3 * size)
    return _pass(flat, ys, ys.start).view(size, 3, size).permute(1, 0, 2).to(torch.uint8)


def _is_jpeg(blob: torch.Tensor) -> bool:
    return blob.numel() > 2 and tuple(blob[:2].tolist()) == JPEG_MAGIC


def _decode_one(blob: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """(3, H, W) uint8 on ``device``, or None if no decoder can read the bytes."""
    tvio = torchvision_io()
    if _is_jpeg(blob) and device.type != "cpu":
        try:
            return tvio.decode_jpeg(blob, mode=tvio.ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # e.g. CMYK, which nvjpeg may refuse: try the CPU decoder
    try:
        return tvio.decode_image(blob, mode=tvio.ImageReadMode.RGB).to(device)
    except RuntimeError:
        return None


def decode_images(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a batch of encoded images (1-D uint8 CPU tensors): JPEGs in one call, the rest one by one."""
    tvio = torchvision_io()
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, b in enumerate(blobs) if _is_jpeg(b)]
    try:
        for i, img in zip(jpegs, tvio.decode_jpeg([blobs[i] for i in jpegs], mode=tvio.ImageReadMode.RGB, device=device)):
            out[i] = img
    except RuntimeError:  # one bad image fails the whole call: decode them singly to find it
        for i in jpegs:
            out[i] = _decode_one(blobs[i], device)
    for i in sorted(set(range(len(blobs))) - set(jpegs)):
        out[i] = _decode_one(blobs[i], device)
    return out


def decode_crops(
    data: torch.Tensor, offsets: torch.Tensor, crops: torch.Tensor, resize: int, size: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Encoded batch -> (uint8 (B, 3, size, size) on ``device``, indices of images that did not decode).

    ``data`` holds the B images' bytes back to back, image i at offsets[i]:offsets[i + 1];
    ``crops`` (B, 3) float64 holds u, v and flip (0 or 1) as drawn by the worker.
    """
    b = len(offsets) - 1
    bounds = offsets.tolist()
    images = decode_images([data[bounds[i] : bounds[i + 1]] for i in range(b)], device)
    out = torch.empty((b, 3, size, size), dtype=torch.uint8, device=device)
    bad = []
    for i, (img, (u, v, flip)) in enumerate(zip(images, crops.tolist())):
        if img is None:
            bad.append(i)
            continue
        box = crop_box(img.shape[2], img.shape[1], resize, size, u, v)
        if at_scale(img.shape[2], img.shape[1], resize, box[0], box[1]):  # the paper's stored form: a slice
            crop = img[:, int(box[1]) : int(box[1]) + size, int(box[0]) : int(box[0]) + size]
        else:
            crop = resample_box(img, box, size)
        out[i] = crop.flip(-1) if flip else crop
    return out, bad


class Encoded(NamedTuple):
    """A training batch as a worker sends it with data.decode=gpu: bytes and random numbers."""

    data: torch.Tensor  # uint8 (total bytes,): the B images back to back
    offsets: torch.Tensor  # int64 (B + 1,): image i is data[offsets[i]:offsets[i + 1]]
    crops: torch.Tensor  # float64 (B, 3): u, v, flip (0/1) as drawn by the worker
    labels: torch.Tensor  # int64 (B,)
    skipped: int  # samples the worker skipped since its previous batch


class EncodedBatch:
    """Collects one Encoded batch in a worker; only the image header is checked there."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []
        self.crops: list[tuple[float, float, float]] = []
        self.labels: list[int] = []

    @property
    def fill(self) -> int:
        return len(self.blobs)

    def add(self, data: bytes, label: int, u: float, v: float, flip: bool) -> None:
        check_header(data)  # raises CorruptImage; the pixels are decoded by the training rank
        self.blobs.append(data)
        self.crops.append((u, v, float(flip)))
        self.labels.append(label)

    def take(self, skipped: int) -> Encoded:
        offsets = np.cumsum([0] + [len(b) for b in self.blobs])
        out = Encoded(
            torch.frombuffer(bytearray(b"".join(self.blobs)), dtype=torch.uint8),
            torch.from_numpy(offsets.astype(np.int64)),
            torch.tensor(self.crops, dtype=torch.float64),
            torch.tensor(self.labels, dtype=torch.int64),
            skipped,
        )
        self.blobs, self.crops, self.labels = [], [], []
        return out


def decode_batch(batch: Encoded, resize: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 (B, 3, size, size) on ``device``, labels, skipped) of an Encoded batch.

    An image that does not decode leaves its slot to a copy of another image of the batch, with
    that image's label, and counts as skipped: the batch keeps its size, so the step count holds.
    """
    images, bad = decode_crops(batch.data, batch.offsets, batch.crops, resize, size, device)
    labels = batch.labels.clone()
    good = [i for i in range(len(labels)) if i not in set(bad)]
    if not good:
        raise DataError(f"no image of a training batch decodes on {device}")
    for i in bad:
        j = good[i % len(good)]
        images[i], labels[i] = images[j], labels[j]
        log.warning("skipped 1 sample: image %d of a training batch does not decode on %s", i, device)
    return images, labels, batch.skipped + len(bad)


def probe(device: torch.device) -> str | None:
    """None when ``decode_jpeg`` works on ``device``, else the reason it does not."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "JPEG")
    try:
        torchvision_io().decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device=device)
    except Exception as e:  # torchvision built without nvjpeg, driver problems, ...
        return f"{type(e).__name__}: {e}"
    return None
