"""Training crops decoded on the device (``data.decode: gpu``), batch by batch, Pillow's pixels.

The loader workers only read: they send a batch's image bytes with each crop's random numbers
(u, v, flip). The training rank decodes the batch's JPEGs with one ``torchvision.io.decode_jpeg``
call on its device (nvjpeg on CUDA; PNG and WebP one by one on the CPU) and cuts every image to
``augment.crop_box`` with a constant number of tensor ops for the whole batch (``crop_batch``):

- every image at the crop's scale (the paper's stored form, ``make_shards --square``): one copy of
  the crops' rows, then the flips (``slice_batch``);
- otherwise Pillow's bilinear box resize for all of them at once (``resample_batch``; in runs that
  fit ``RESAMPLE_BUDGET``): Pillow's taps and 22-bit fixed-point weights computed on the device in
  float64 by the same operations as Pillow's C, each pass rounded to uint8, in Pillow's order of
  the passes.

Nothing in a batch's crop reads a value back from the device; the host sends one small table
(offsets, sizes, boxes, flips) per batch (per run). So from the same decoded pixels the crop equals
``augment.train_crop``'s bit for bit (tolerance 0, tests/test_data_decode.py). What differs is the
decoder (none on the CPU: torchvision and Pillow use the same libjpeg-turbo; nvjpeg's IDCT and
chroma upsampling on CUDA), and Pillow's DCT-domain downscale (``draft``), which the CPU path
uses for images at least twice the crop's scale and this path does not.
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

JPEG_MAGIC = b"\xff\xd8"


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without waiting for the device: a copy from pageable memory would
    first synchronize the stream, so it is pinned (torch's caching host allocator) on CUDA."""
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _is_jpeg(blob: torch.Tensor) -> bool:
    return blob.numel() > 2 and bytes(blob.numpy()[:2]) == JPEG_MAGIC  # host bytes: no tensor op


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
        if jpegs:
            decoded = tvio.decode_jpeg([blobs[i] for i in jpegs], mode=tvio.ImageReadMode.RGB, device=device)
            for i, img in zip(jpegs, decoded):
                out[i] = img
    except RuntimeError:  # one bad image fails the whole call: decode them singly to find it
        for i in jpegs:
            out[i] = _decode_one(blobs[i], device)
    for i in sorted(set(range(len(blobs))) - set(jpegs)):
        out[i] = _decode_one(blobs[i], device)
    return out


# ------------------------------------------------------------------ crops of a whole batch
# The images are laid end to end in one flat uint8 tensor; each output pixel's source is found by
# index arithmetic from a per-image table (one host-to-device copy a batch). Per-image Python is
# bookkeeping only (boxes, offsets, the table's rows); every tensor op covers the whole batch.


class Flat(NamedTuple):
    """Images (3, H, W) laid end to end in one uint8 tensor, each in the memory order of the first:
    pixel (c, y, x) of image i at base[i] + c * channel[i] + (y * W_i + x) * step."""

    data: torch.Tensor  # then ``pad`` zero bytes, for reads just past the last image
    base: np.ndarray  # int64 (B,)
    channel: np.ndarray  # int64 (B,): H * W (channels first) or 1 (channels last)
    step: int  # one pixel to the right: 1 (channels first) or 3 (channels last)


def _windows(flat: Flat, length: int) -> torch.Tensor:
    """(N, length) view of ``flat``: row n holds ``length`` pixels of one channel from byte n on, so a
    row segment of any image is one row of it (``index_select`` copies whole segments)."""
    return flat.data.as_strided((flat.data.numel() - (length - 1) * flat.step, length), (1, flat.step))


def _flat(images: list[torch.Tensor], pad: int = 0) -> Flat:
    """The images in one tensor with one copy (``torch.cat``) in the decoder's own layout: channels
    first from nvjpeg, channels last (a view of libjpeg's HWC buffer) from the CPU decoder."""
    channels_last = not images[0].is_contiguous() and images[0].permute(1, 2, 0).is_contiguous()
    parts = [(img.permute(1, 2, 0) if channels_last else img).reshape(-1) for img in images]
    if pad:
        parts.append(images[0].new_zeros(pad))
    base = np.cumsum([0] + [img.numel() for img in images[:-1]], dtype=np.int64)
    planes = np.array([img.shape[1] * img.shape[2] for img in images], np.int64)
    return Flat(torch.cat(parts), base, np.ones_like(planes) if channels_last else planes, 3 if channels_last else 1)


def slice_batch(images: list[torch.Tensor], left: np.ndarray, top: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size): image i's pixels [top_i : top_i + size, left_i : left_i + size],
    mirrored left-right where ``flips``: one copy of the crops' rows for the batch, then the mirroring."""
    device = images[0].device
    flat = _flat(images)
    widths = np.array([img.shape[2] for img in images], np.int64)
    table = np.stack([flat.base, flat.channel, widths, left, top, flips]).astype(np.int64).T
    base, channel, w, x0, y0, flip = host_to_device(torch.from_numpy(np.ascontiguousarray(table)), device).unbind(1)
    ar = torch.arange(size, device=device)
    rows = ((y0[:, None] + ar) * w[:, None] + x0[:, None]) * flat.step  # (B, S): each crop row's first pixel
    starts = (base[:, None] + channel[:, None] * torch.arange(3, device=device))[:, :, None] + rows[:, None, :]
    out = _windows(flat, size).index_select(0, starts.view(-1)).view(-1, 3, size, size)
    return torch.where(flip[:, None, None, None] != 0, out.flip(-1), out)


def _taps_batch(in_size: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``resample.pillow_taps`` for B axes at once, on their device: (start (B, size) int64,
    weight (B, size, k) int32), output i = sum_j weight[i, j] * source[start[i] + j].

    The same float64 operations in the same order as Pillow's C, so the same fixed-point weights;
    taps past an output's count weigh 0. ``lo`` is the box's start and ``scale`` its length over
    ``size``, both as Pillow computes them from the box's C floats (``_pillow_box``).
    """
    filterscale = scale.clamp(min=1.0)[:, None, None]
    support = filterscale * 1.0  # the triangle filter's support is 1
    ss = 1.0 / filterscale
    center = lo[:, None, None] + (torch.arange(size, device=lo.device, dtype=torch.float64)[:, None] + 0.5) * scale[:, None, None]
    xmin = (center - support + 0.5).to(torch.int64).clamp_(min=0)  # C's truncating casts: (B, size, 1)
    xmax = torch.minimum((center + support + 0.5).to(torch.int64), in_size[:, None, None])
    tap = torch.arange(k, device=lo.device)
    d = (((xmin + tap).to(torch.float64) - center + 0.5) * ss).abs()  # (B, size, k)
    w = torch.where((d < 1.0) & (tap < xmax - xmin), 1.0 - d, 0.0)
    total = w[..., 0]
    for j in range(1, k):  # summed one tap after another, as Pillow sums them
        total = total + w[..., j]
    total = torch.where(total != 0.0, total, 1.0)[..., None]
    return xmin[..., 0], (0.5 + w / total * (1 << PRECISION_BITS)).to(torch.int32)


def _pillow_box(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, scale) in float64 of boxes' [lo, hi) as Pillow takes them: C floats, subtracted in float."""
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    return lo32.astype(np.float64), (hi32 - lo32).astype(np.float64) / size


def _rounded(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a fixed-point sum (the half already added) to 0..255, in place."""
    return acc.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255)


class Geometry(NamedTuple):
    """Per image (arrays of B), what its two passes need: Pillow's box as it takes it, the pass order,
    and how many source rows the first pass covers (``rows``), how many pixels of each it reads
    (``span``) and the taps per output pixel (``taps``), each a bound that holds whatever the box."""

    widths: np.ndarray
    heights: np.ndarray
    x_lo: np.ndarray
    x_scale: np.ndarray
    y_lo: np.ndarray
    y_scale: np.ndarray
    transposed: np.ndarray  # bool: resized vertically first, laid out transposed
    row_lo: np.ndarray  # the first source row (of the laid-out image) the first pass covers
    rows: np.ndarray
    span: np.ndarray
    taps: np.ndarray


def _geometry(widths: np.ndarray, heights: np.ndarray, boxes: np.ndarray, size: int) -> Geometry:
    transposed = np.array([resample.vertical_first(w, h, size) for w, h in zip(widths, heights)], dtype=bool)
    x_lo, x_scale = _pillow_box(boxes[:, 0], boxes[:, 2], size)
    y_lo, y_scale = _pillow_box(boxes[:, 1], boxes[:, 3], size)
    taps = np.ceil(np.maximum(np.maximum(x_scale, y_scale), 1.0)).astype(np.int64) * 2 + 1
    # The second pass's taps read source rows from >= floor(lo - support) to < lo + size * scale + support + 1.
    lo2, scale2 = np.where(transposed, x_lo, y_lo), np.where(transposed, x_scale, y_scale)
    support2 = np.maximum(scale2, 1.0)
    len2 = np.where(transposed, widths, heights)
    row_lo = np.maximum(0, np.floor(lo2 - support2)).astype(np.int64)
    row_hi = np.minimum(len2, np.floor(lo2 + size * scale2 + support2 + 0.5).astype(np.int64) + 1)
    # The first pass's taps, from the first one's start to the last one's end, with room to spare.
    scale1 = np.where(transposed, y_scale, x_scale)
    span = np.ceil(size * scale1 + 2 * np.maximum(scale1, 1.0)).astype(np.int64) + taps + 2
    return Geometry(widths, heights, x_lo, x_scale, y_lo, y_scale, transposed, row_lo, row_hi - row_lo, span, taps)


def resample_batch(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size): image i (3, H, W) resized as ``PIL.Image.resize((size, size), BILINEAR,
    box=boxes[i])``, mirrored left-right where ``flips``; bit for bit Pillow's.

    Pillow's two passes in its order (vertical first for much taller than wide images, per
    ``resample.vertical_first``): an image resized vertically first is laid out transposed, so that
    every image's first pass runs along its rows, and its result transposed back. The first pass
    covers, for every image, as many source rows as the batch's widest row range needs (the rest
    of its rows are clamped copies that the second pass weighs 0); both passes have as many taps
    as the batch's largest scale needs. Its products fit int32 as in Pillow.
    """
    device = images[0].device
    b = len(images)
    widths = np.array([img.shape[2] for img in images], np.int64)
    heights = np.array([img.shape[1] for img in images], np.int64)
    g = _geometry(widths, heights, boxes, size)
    transposed, row_lo = g.transposed, g.row_lo
    taps, rows, span = int(g.taps.max()), int(g.rows.max()), int(g.span.max())
    x_lo, x_scale, y_lo, y_scale = g.x_lo, g.x_scale, g.y_lo, g.y_scale
    len1, len2 = np.where(transposed, heights, widths), np.where(transposed, widths, heights)
    flat = _flat([img.mT if t else img for img, t in zip(images, transposed)], pad=3 * span)
    table = np.stack([flat.base, flat.channel, widths, heights, x_lo, x_scale, y_lo, y_scale, flips, transposed,
                      row_lo, len1, len2], 1)
    cols = host_to_device(torch.from_numpy(table.astype(np.float64)), device).unbind(1)
    w, h, x_lo_t, x_scale_t, y_lo_t, y_scale_t, flip, trans = cols[2:10]
    base_t, channel_t, row_lo_t, len1_t, len2_t = (c.to(torch.int64) for c in cols[:2] + cols[10:])
    starts, weights = _taps_batch(torch.cat([w, h]).to(torch.int64), torch.cat([x_lo_t, y_lo_t]),
                                  torch.cat([x_scale_t, y_scale_t]), size, taps)
    (x_start, y_start), (x_weight, y_weight) = starts.chunk(2), weights.chunk(2)
    flip, trans = (flip != 0)[:, None], (trans != 0)[:, None]
    x_start = torch.where(flip, x_start.flip(1), x_start)  # mirrored: output x reads the taps of size - 1 - x
    x_weight = torch.where(flip[..., None], x_weight.flip(1), x_weight)
    start1, weight1 = torch.where(trans, y_start, x_start), torch.where(trans[..., None], y_weight, x_weight)
    start2, weight2 = torch.where(trans, x_start, y_start), torch.where(trans[..., None], x_weight, y_weight)

    # First pass, along each image's (laid out) rows: (B, 3, size, rows) as (first axis out, rows
    # in). The row segments its taps read are copied out first, ``span`` pixels from the image's
    # first tap on (the batch's widest span: a segment may run past its row, into pixels that only
    # 0-weight taps read).
    step = flat.step
    r = torch.minimum(row_lo_t[:, None] + torch.arange(rows, device=device), len2_t[:, None] - 1)  # (B, rows)
    seg_lo = start1.amin(1)  # (B,)
    start = base_t[:, None] + channel_t[:, None] * torch.arange(3, device=device)  # (B, 3)
    seg_starts = start[:, :, None] + ((r * len1_t[:, None] + seg_lo[:, None]) * step)[:, None, :]  # (B, 3, rows)
    segments = _windows(flat, span).index_select(0, seg_starts.view(-1)).view(b, 3, rows, span)
    # Each tap's pixels are then whole rows of the transposed segments, so both passes copy rows.
    columns = segments.transpose(2, 3).to(torch.int32, memory_format=torch.contiguous_format)
    columns = columns.view(-1, rows)  # (B * 3 * span, rows)
    planes = torch.arange(b * 3, device=device).view(b, 3, 1, 1)
    pick = (planes * span + (start1 - seg_lo[:, None])[:, None, :, None]) + torch.arange(taps, device=device)
    acc = torch.full((b, 3, size, rows), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=device)
    for j in range(taps):  # products and sums in int32, as Pillow's
        picked = columns.index_select(0, pick[..., j].reshape(-1)).view(b, 3, size, rows)
        acc.addcmul_(picked, weight1[:, None, :, None, j])
    first = _rounded(acc).transpose(2, 3).contiguous().view(-1, size)  # (B * 3 * rows, size)

    # Second pass, across those rows: (B, 3, size, size) as (second axis, first axis).
    pick = (start2[..., None] + torch.arange(taps, device=device) - row_lo_t[:, None, None]).clamp_(0, rows - 1)
    pick = planes * rows + pick[:, None]  # (B, 3, size, taps): rows of ``first``
    acc = torch.full((b, 3, size, size), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=device)
    for j in range(taps):  # only 0-weight taps are clamped
        picked = first.index_select(0, pick[..., j].reshape(-1)).view(b, 3, size, size)
        acc.addcmul_(picked, weight2[:, None, :, None, j])
    out = _rounded(acc).to(torch.uint8)
    return torch.where(trans[:, :, None, None], out.mT, out) if transposed.any() else out


RESAMPLE_BUDGET = {"cpu": 0}
"""int32 elements of the first pass's largest temporary (images x 3 x rows x span, each padded to
the chunk's largest) that images resampled together may take, by device type; 2**27 (512 MiB)
elsewhere. Images are resampled in runs of the batch that fit, so one very large photo pads a few
images, not the batch. On the CPU one image at a time: a batch's temporaries stream through memory
once per tap, where one image's stay in the caches (4.5x faster per image than 64 at once on the
photos of bench/decode.py, docs/benchmarks.md)."""


def _runs(g: Geometry, size: int, budget: int) -> list[slice]:
    """Consecutive runs of the images whose padded first pass fits ``budget`` (at least one image each)."""
    runs, start, rows, span = [], 0, 0, 0
    for i in range(len(g.rows)):
        r, s = max(rows, int(g.rows[i])), max(span, int(g.span[i]), size)
        if i > start and (i + 1 - start) * 3 * r * s > budget:
            runs.append(slice(start, i))
            start, r, s = i, int(g.rows[i]), max(int(g.span[i]), size)
        rows, span = r, s
    return runs + [slice(start, len(g.rows))]


def crop_batch(images: list[torch.Tensor], crops: np.ndarray, resize: int, size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size): the training crops (``augment.crop_box``) of decoded (3, H, W)
    images, ``crops`` (B, 3) holding each one's u, v and flip (0/1) as drawn by the worker.

    A batch whose every image is at the crop's scale (the paper's stored form) is sliced; otherwise
    every image is resampled, which for an image at the crop's scale gives its slice too (Pillow's
    weights are then 1 and 0), in runs of images that fit ``RESAMPLE_BUDGET`` (the same pixels).
    """
    boxes = np.array([crop_box(img.shape[2], img.shape[1], resize, size, u, v) for img, (u, v, _) in zip(images, crops)])
    flips = crops[:, 2] != 0
    if all(at_scale(img.shape[2], img.shape[1], resize, x, y) for img, (x, y, _, _) in zip(images, boxes)):
        return slice_batch(images, boxes[:, 0].astype(np.int64), boxes[:, 1].astype(np.int64), flips, size)
    widths = np.array([img.shape[2] for img in images], np.int64)
    heights = np.array([img.shape[1] for img in images], np.int64)
    budget = RESAMPLE_BUDGET.get(images[0].device.type, 1 << 27)
    parts = [resample_batch(images[run], boxes[run], flips[run], size)
             for run in _runs(_geometry(widths, heights, boxes, size), size, budget)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def decode_crops(
    data: torch.Tensor, offsets: torch.Tensor, crops: torch.Tensor, resize: int, size: int, device: torch.device
) -> tuple[torch.Tensor, dict[int, int]]:
    """Encoded batch -> (uint8 (B, 3, size, size) on ``device``, {image that did not decode: the image
    whose crop fills its slot}).

    ``data`` holds the B images' bytes back to back, image i at offsets[i]:offsets[i + 1];
    ``crops`` (B, 3) float64 holds u, v and flip (0 or 1) as drawn by the worker. An image that
    does not decode takes another image's pixels and random numbers, so its slot is that crop.
    """
    bounds = offsets.numpy()
    images = decode_images([data[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)], device)
    crops_np = crops.numpy()
    good = [i for i, img in enumerate(images) if img is not None]
    if not good:
        raise DataError(f"no image of a training batch decodes on {device}")
    stand_in = {i: good[i % len(good)] for i, img in enumerate(images) if img is None}
    if stand_in:
        images = [images[stand_in.get(i, i)] for i in range(len(images))]
        crops_np = crops_np[[stand_in.get(i, i) for i in range(len(images))]]
    return crop_batch(images, crops_np, resize, size), stand_in


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
    images, stand_in = decode_crops(batch.data, batch.offsets, batch.crops, resize, size, device)
    labels = batch.labels
    if stand_in:
        labels = labels[[stand_in.get(i, i) for i in range(len(labels))]]
    for i in stand_in:
        log.warning("skipped 1 sample: image %d of a training batch does not decode on %s", i, device)
    return images, labels, batch.skipped + len(stand_in)


def probe(device: torch.device) -> str | None:
    """None when ``decode_jpeg`` works on ``device``, else the reason it does not."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "JPEG")
    try:
        torchvision_io().decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device=device)
    except Exception as e:  # torchvision built without nvjpeg, driver problems, ...
        return f"{type(e).__name__}: {e}"
    return None
