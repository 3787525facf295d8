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
"""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

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
    scales = torch.tensor(lighting_scales(input_scale), device=device)
    eigvec = torch.tensor(PCA_EIGVEC, device=device)
    return (alpha * scales) @ eigvec.T  # (n, 3): row i = eigvec @ (alpha_i * s)


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
