"""The paper's augmentations (section 4.1), split where they are cheapest.

On CPU workers, per image, from the JPEG bytes to uint8:
  decode -> shorter side to ``data.resize`` -> central ``resize`` square -> random ``image_size``
  crop -> horizontal flip (train), or the centre crop / the ten crops (eval).
  (``data.decode: gpu`` does the training crop on the device instead, from the same ``crop_box``:
  ``distalex/data/decode.py``.)
On the device, per batch (``normalize``): to float, PCA lighting (train), mean subtraction, in
the units ``data.input_scale`` names: ``raw`` pixels 0-255 and nothing divided (the paper's
"centred raw RGB values"), or ``standardized`` pixels in [0, 1] divided by the per-channel std.

The resize happens at load time (``data.resize``), not at shard time: the shards keep the original
JPEG bytes, so one set of shards serves the paper (256) and the small demo runs (e.g. 72).
``make_shards --resize`` can shrink large sources once to save decode time.

Decode and crop cost one JPEG decode (with PIL's DCT-domain ``draft`` downscale when the source is
at least twice the target) and one resampling of just the crop's box: cropping before resizing
gives the same pixels as resize-then-crop, at a fraction of the work.

The loader workers take a faster road to the same pixels (``decode_crop_into``, ``eval_crops_into``):
JPEGs that need no downscale are decoded by ``torchvision.io.decode_jpeg`` (the same libjpeg-turbo,
without Pillow's 4-byte pixels and its copy out), the box is resampled by ``resample.py``'s compiled
copy of Pillow's arithmetic, and the crop is written straight into the batch. An image already at the
crop's scale (shorter side ``resize``, the paper's stored form) is not resampled at all: its crop is
a slice. ``train_crop`` and ``centre_square`` stay the reference they are tested against.
"""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

from distalex.data import resample
from distalex.data.info import DataError, read_info
from distalex.data.read import CorruptImage, read_bytes

# PCA of ImageNet RGB pixels in [0, 1] (docs/paper.md, "Data"): rows R, G, B; columns are eigenvectors.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PIXEL_MAX = 255.0
"""A uint8 pixel's largest value: the unit of ``data.input_scale: raw``, and what standardized divides by."""
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# Used when the shards carry no statistics of their own (not written by make_shards).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ CPU side: bytes -> uint8


def open_rgb(data: bytes, min_side: int) -> Image.Image:
    """Decode to RGB, letting libjpeg downscale by 2/4/8 while the shorter side stays >= min_side."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        scale = min_side / min(w, h)
        if scale < 0.5 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise CorruptImage(f"{type(e).__name__}: {e}") from None
    return img


def check_header(data: bytes) -> None:
    """Raise CorruptImage unless the bytes start like an image PIL can read (no pixels decoded)."""
    try:
        Image.open(io.BytesIO(data))
    except Exception as e:  # UnidentifiedImageError, or whatever a broken header raises
        raise CorruptImage(f"{type(e).__name__}: {e}") from None


def _square(width: int, height: int) -> tuple[float, float, int]:
    """Top-left corner and side of the central square of a width x height image, in its pixels."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side


def crop_box(width: int, height: int, resize: int, size: int, u: float, v: float) -> tuple[float, float, float, float]:
    """The training crop's box (left, top, right, bottom) in the pixels of a width x height image.

    The crop is size x size pixels of the image scaled to shorter side ``resize`` and cut to its
    central square, at offset (floor(u * (resize - size + 1)), floor(v * (resize - size + 1))).
    """
    x0, y0, side = _square(width, height)
    s = side / resize  # source pixels per output pixel
    span = resize - size + 1
    ox, oy = int(u * span), int(v * span)
    return (x0 + ox * s, y0 + oy * s, x0 + (ox + size) * s, y0 + (oy + size) * s)


def train_crop(data: bytes, resize: int, size: int, u: float, v: float, flip: bool) -> np.ndarray:
    """Random crop as in the paper: (size, size, 3) uint8, mirrored if ``flip`` (see ``crop_box``).

    u, v in [0, 1) are drawn by the caller so that skipping a sample (resume) costs no decode.
    """
    img = open_rgb(data, resize)
    out = img.resize((size, size), Image.BILINEAR, box=crop_box(*img.size, resize, size, u, v))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def square_image(img: Image.Image, resize: int) -> Image.Image:
    """Shorter side to ``resize`` and the central square, as a resize x resize image."""
    x0, y0, side = _square(*img.size)
    return img.resize((resize, resize), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))


def centre_square(data: bytes, resize: int) -> np.ndarray:
    """Shorter side to ``resize`` and the central square: (resize, resize, 3) uint8."""
    return np.asarray(square_image(open_rgb(data, resize), resize))


def crop_offsets(resize: int, size: int) -> list[tuple[int, int]]:
    """(x, y) of the five patches: top-left, top-right, bottom-left, bottom-right, centre."""
    m = resize - size
    c = m // 2
    return [(0, 0), (m, 0), (0, m), (m, m), (c, c)]


def centre_crop(square: np.ndarray, size: int) -> np.ndarray:
    """(R, R, C) -> (size, size, C), the central patch."""
    c = (square.shape[0] - size) // 2
    return square[c : c + size, c : c + size]


def ten_crop(square: np.ndarray, size: int) -> np.ndarray:
    """(R, R, C) -> (10, size, size, C): the five patches of ``crop_offsets``, then their mirrors.

    Patch 5 + i is patch i flipped left-right (the paper: "the four corner patches and the center
    patch as well as their horizontal reflections"). torchvision's ten_crop yields the same set of
    ten in another order.
    """
    five = [square[y : y + size, x : x + size] for x, y in crop_offsets(square.shape[0], size)]
    return np.stack(five + [p[:, ::-1] for p in five])


def hwc_to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(arr, requirements=["C", "W"])).movedim(-1, -3)  # PIL arrays are read-only


# ------------------------------------------------------------------ CPU side: bytes -> the batch


def torchvision_io():
    """torchvision.io, imported on first use: importing torchvision takes seconds (``prepare_workers``
    does it before the loader's workers are forked)."""
    import torchvision.io

    return torchvision.io


@functools.lru_cache(maxsize=None)
def _jpeg_to_rgb():
    """libjpeg-turbo's decode to RGB as torchvision registers it (``torch.ops.image.decode_jpeg``, what
    ``torchvision.io.decode_jpeg`` calls after per-call checks and a deprecation warning), or None
    where this torchvision has no such op: Pillow then decodes everything."""
    try:
        tvio = torchvision_io()
        op, rgb = torch.ops.image.decode_jpeg, tvio.ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError, OSError):  # no torchvision, or one without its image library
        return None
    return lambda blob: op(blob, rgb, False)  # (data, mode, apply_exif_orientation): Pillow ignores EXIF too


JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15 less DHT, JPG, DAC


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header; None if the bytes are no JPEG or none is found."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 9 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_FRAMES:
            return (data[pos + 7] << 8 | data[pos + 8], data[pos + 5] << 8 | data[pos + 6], data[pos + 9])
        if marker == 0xD9 or marker == 0xDA:  # end of image, or scan data before any frame header
            return None
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return None


def decode_hwc(data: bytes, min_side: int) -> np.ndarray:
    """(H, W, 3) uint8: the pixels of ``open_rgb(data, min_side)``.

    A YCbCr or grey JPEG that ``open_rgb`` would decode at full scale goes through
    ``torchvision.io.decode_jpeg``; anything else (a DCT downscale, CMYK, PNG, WebP), or a JPEG that
    libjpeg only warns about (an error to torchvision), through Pillow, which also judges what is corrupt.
    """
    frame = jpeg_frame(data)
    decode = _jpeg_to_rgb()
    if decode and frame and frame[2] in (1, 3) and min(frame[:2]) > 0 and min_side / min(frame[:2]) >= 0.5:
        try:  # (3, H, W): a view of the decoded (H, W, 3) buffer
            blob = data if isinstance(data, bytearray) else bytearray(data)  # writable, as torch.frombuffer wants
            return decode(torch.frombuffer(blob, dtype=torch.uint8)).permute(1, 2, 0).numpy()
        except RuntimeError:
            pass
    return np.asarray(open_rgb(data, min_side))


def at_scale(width: int, height: int, resize: int, left: float, top: float) -> bool:
    """Whether a box of the image's own scale at (left, top) is a slice: Pillow's weights are then all 1."""
    return min(width, height) == resize and float(left).is_integer() and float(top).is_integer()


def decode_crop_into(out: np.ndarray, data: bytes, resize: int, size: int, u: float, v: float, flip: bool) -> None:
    """``out`` (3, size, size) uint8 = ``train_crop(data, resize, size, u, v, flip)`` in channel-first layout."""
    image = decode_hwc(data, resize)
    height, width = image.shape[:2]
    box = crop_box(width, height, resize, size, u, v)
    if at_scale(width, height, resize, box[0], box[1]):
        resample.slice_into(out, image, int(box[0]), int(box[1]), flip)
    else:
        resample.resample_into(out, image, box, flip)


def eval_crops_into(out: np.ndarray, data: bytes, resize: int, size: int) -> None:
    """``out`` (3, S, S): ``centre_crop`` of ``centre_square(data, resize)``; or (10, 3, S, S): its
    ``ten_crop``; channel-first."""
    image = decode_hwc(data, resize)
    x0, y0, side = _square(image.shape[1], image.shape[0])
    if at_scale(image.shape[1], image.shape[0], resize, x0, y0):
        square, x0, y0 = image, int(x0), int(y0)
    else:
        square, x0, y0 = resample.resample_hwc(image, (x0, y0, x0 + side, y0 + side), resize), 0, 0
    if out.ndim == 3:
        c = (resize - size) // 2
        resample.slice_into(out, square, x0 + c, y0 + c, False)
        return
    for i, (x, y) in enumerate(crop_offsets(resize, size) * 2):
        resample.slice_into(out[i], square, x0 + x, y0 + y, i >= 5)


def fast_crops() -> bool:
    """Whether ``decode_crop_into`` and ``eval_crops_into`` can run here (they need numba)."""
    return resample.AVAILABLE


def prepare_workers() -> None:
    """Import torchvision.io and compile the crop loops in this process, so that loader workers
    forked from it start with both (seconds otherwise, in every worker of every epoch)."""
    if fast_crops():
        _jpeg_to_rgb()
        resample.warm_up()


# ------------------------------------------------------------------ device side: per batch


def lighting_scales(input_scale: str) -> tuple[float, float, float]:
    """What the lighting's alpha_j multiplies, per principal component, in the units of ``input_scale``.

    standardized: the eigenvalue lambda_j, pixels in [0, 1] (the form public ImageNet code uses).
    raw: the component's standard deviation in pixel units, sqrt(lambda_j) x 255, as the authors'
    cuda-convnet2 drew it (N(0, 1) x stdevs x 0.1): about (118.9, 35.0, 17.1) from these
    eigenvalues, against the authors' own (121.8, 37.1, 19.7). Measured in pixels, that is a shift
    1 / sqrt(lambda_j) times the standardized form's: 2.1, 7.3 and 14.9 times (docs/paper.md, "Conventions").
    """
    if input_scale == "raw":
        return tuple(math.sqrt(v) * PIXEL_MAX for v in PCA_EIGVAL)
    return PCA_EIGVAL


def lighting_shift(
    n: int, std: float, generator: torch.Generator | None, device: torch.device, input_scale: str = "standardized"
) -> torch.Tensor:
    """PCA lighting, (n, 3): per image the RGB offset  sum_j alpha_j * s_j * p_j,  alpha_j ~ N(0, std^2),
    with s = ``lighting_scales(input_scale)``.

    Its covariance is  P diag(std^2 s^2) P^T  (P = PCA_EIGVEC), in the units of ``input_scale``
    (pixels in [0, 1], or 0-255 for raw). alpha is drawn on the generator's device, so tp peers
    holding the same generator state get the same offsets; both scales draw the same alpha.
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    alpha = torch.randn(n, 3, generator=generator, device=gen_device).to(device) * std  # (n, 3)
    scales, eigvec = _lighting_constants(input_scale, torch.device(device))
    return (alpha * scales) @ eigvec.T  # (n, 3): row i = eigvec @ (alpha_i * s)


@functools.lru_cache(maxsize=16)
def _lighting_constants(input_scale: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, eigvec) of the lighting on ``device``, made once: made per batch, each would be a
    copy from pageable host memory that waits for a GPU."""
    return torch.tensor(lighting_scales(input_scale), device=device), torch.tensor(PCA_EIGVEC, device=device)


def training_stats(
    train_shards: str, need_mean_image: bool, info_at: str | None = None
) -> tuple[list[float], list[float], np.ndarray | None]:
    """(mean_rgb, std_rgb, mean image or None) measured for these training shards (``_info.json``
    beside them, or at ``info_at``: data.info).

    Pixels in [0, 1]; the mean image is (H, W, 3) float32, read only when asked for. Without the
    statistics in ``_info.json`` (make_shards, or ``distalex.data.index --stats``) the usual
    ImageNet mean/std, with a warning.
    """
    try:
        info = read_info(train_shards, info_at)
        stats = info.stats
    except DataError:
        info, stats = None, {}
    if "mean_rgb" in stats and "std_rgb" in stats:
        mean_rgb, std_rgb = list(stats["mean_rgb"]), list(stats["std_rgb"])
    else:
        warnings.warn(
            f"data.train_shards={train_shards!r}: no training statistics in its _info.json; "
            "using the usual ImageNet mean/std",
            stacklevel=4,  # the caller of normalize()
        )
        mean_rgb, std_rgb = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if not need_mean_image:
        return mean_rgb, std_rgb, None
    if info is None or not stats.get("mean_image"):
        raise DataError(f"data.mean=pixel needs the mean image of make_shards beside {train_shards!r}")
    return mean_rgb, std_rgb, np.load(io.BytesIO(read_bytes(info.path_of(stats["mean_image"])))).astype(np.float32)


def mean_and_std(
    mean_rgb, std_rgb, mean_image: np.ndarray | None, resize: int, size: int, ten: bool,
    input_scale: str = "standardized",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) to subtract and divide by, broadcastable to (3, S, S) or (10, 3, S, S), in the
    units of ``input_scale``: [0, 1] for standardized; for raw, pixel units and a std of ones
    (nothing is divided, and dividing by one changes no bit).

    Per channel when ``mean_image`` is None, else per pixel: the mean image at ``resize``, cropped
    like the images.
    """
    raw = input_scale == "raw"
    std = torch.ones(3, 1, 1) if raw else torch.tensor(std_rgb, dtype=torch.float32).view(3, 1, 1)
    if mean_image is None:
        mean = torch.tensor(mean_rgb, dtype=torch.float32).view(3, 1, 1)
        return (mean * PIXEL_MAX if raw else mean), std
    # For random training crops the centre patch stands in for the crop's own patch, as in the
    # authors' code: the device sees only the crop, and the ImageNet mean image is smooth, so this
    # moves the mean by far less than the lighting noise does.
    sq = torch.nn.functional.interpolate(
        torch.from_numpy(mean_image).permute(2, 0, 1)[None], size=(resize, resize), mode="bilinear",
        antialias=True, align_corners=False,
    )[0].permute(1, 2, 0).numpy()
    mean = hwc_to_chw(ten_crop(sq, size) if ten else centre_crop(sq, size))
    return (mean * PIXEL_MAX if raw else mean), std


@functools.lru_cache(maxsize=16)
def _stats(train_shards: str, info_at: str | None, mean_mode: str, resize: int, size: int, ten: bool, device: str,
           input_scale: str):
    mean_rgb, std_rgb, mean_image = training_stats(train_shards, mean_mode == "pixel", info_at)
    mean, std = mean_and_std(mean_rgb, std_rgb, mean_image, resize, size, ten, input_scale)
    return mean.to(device), std.to(device)


def to_input_units(images: torch.Tensor, input_scale: str) -> torch.Tensor:
    """uint8 -> a new float32 tensor in the units of ``input_scale``: 0-255 (raw) or [0, 1] (standardized)."""
    x = images.float()
    return x if input_scale == "raw" else x.div(PIXEL_MAX)


def normalize(
    images: torch.Tensor, train: bool, data_cfg, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (B, 3, S, S) or (B, 10, 3, S, S) -> float32 ((x + lighting) - mean) / std, with x the
    pixels in the units of ``data.input_scale`` (raw: 0-255, std 1; standardized: x / 255).

    Lighting (train only, ``data.lighting_std`` > 0) draws alpha from ``generator``: pass a
    generator with the same state on every tp peer, or the towers see different pixels. Mean is
    per channel or per pixel (``data.mean``); std is per channel. Statistics come from the training
    shards' ``_info.json`` (measured by make_shards or ``distalex.data.index --stats``), else ImageNet's.
    The same call serves ``data.decode: gpu``, whose decoded batch is the same uint8 crops.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if images.dim() not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(f"normalize expects (B, 3, S, S) or (B, 10, 3, S, S), got {tuple(images.shape)}")
    scale = data_cfg.input_scale
    x = to_input_units(images, scale)
    b = x.shape[0]
    if train and data_cfg.lighting_std > 0:
        shift = lighting_shift(b, data_cfg.lighting_std, generator, x.device, scale)  # (B, 3)
        x.add_(shift.view(b, *([1] * (x.dim() - 4)), 3, 1, 1))
    ten = x.dim() == 5
    mean, std = _stats(
        data_cfg.train_shards, data_cfg.info, data_cfg.mean, data_cfg.resize, x.shape[-1], ten, str(x.device), scale
    )
    return x.sub_(mean).div_(std)
