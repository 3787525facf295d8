"""The paper's augmentations: crop geometry, ten-crop, PCA lighting statistics, normalisation."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from distalex.config import DataConfig
from distalex.data import augment
from distalex.data.augment import (
    PCA_EIGVAL,
    PCA_EIGVEC,
    CorruptImage,
    centre_crop,
    centre_square,
    hwc_to_chw,
    lighting_scales,
    lighting_shift,
    normalize,
    ten_crop,
    train_crop,
)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # lossless, so pixels can be compared exactly
    return buf.getvalue()


def coords_image(w: int, h: int) -> np.ndarray:
    """Each pixel holds its own (x, y): any crop or flip mistake changes the values."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, (xx + 3 * yy) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(80, 64), (64, 90)])
@pytest.mark.parametrize("u,v,flip", [(0.0, 0.0, False), (0.99, 0.5, True), (0.3, 0.99, False)])
def test_train_crop_is_the_papers_crop(w, h, u, v, flip):
    # shorter side already == resize: the crop must be an exact window of the central square
    arr = coords_image(w, h)
    resize, size = 64, 48
    out = train_crop(png(arr), resize, size, u, v, flip)
    x0, y0 = (w - 64) // 2, (h - 64) // 2
    ox, oy = int(u * 17), int(v * 17)
    want = arr[y0 + oy : y0 + oy + size, x0 + ox : x0 + ox + size]
    if flip:
        want = want[:, ::-1]
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, want)


def test_train_crop_rescales_the_shorter_side():
    # a 2x larger image: the same window, at half the resolution (up to bilinear rounding)
    small = coords_image(80, 64).astype(np.float64)
    big = np.asarray(Image.fromarray(coords_image(80, 64)).resize((160, 128), Image.NEAREST))
    out = train_crop(png(big), 64, 48, 0.5, 0.25, False).astype(np.float64)
    want = small[4 : 4 + 48, 8 + 8 : 8 + 8 + 48]
    assert np.abs(out[..., :2] - want[..., :2]).max() <= 1.0


def test_ten_crop_returns_corners_centre_and_mirrors():
    sq = np.arange(10 * 10).reshape(10, 10, 1)
    crops = ten_crop(sq, 6)
    assert crops.shape == (10, 6, 6, 1)
    tl, tr, bl, br, c = sq[0:6, 0:6], sq[0:6, 4:10], sq[4:10, 0:6], sq[4:10, 4:10], sq[2:8, 2:8]
    for i, patch in enumerate([tl, tr, bl, br, c]):
        np.testing.assert_array_equal(crops[i], patch)
        np.testing.assert_array_equal(crops[5 + i], patch[:, ::-1])
    np.testing.assert_array_equal(centre_crop(sq, 6), c)
    # through the JPEG path: the square is shorter side -> resize, centred
    arr = coords_image(90, 64)
    np.testing.assert_array_equal(centre_square(png(arr), 64), arr[:, 13:77])


def test_corrupt_bytes_raise_corrupt_image():
    good = png(coords_image(40, 40))
    for bad in (b"", b"garbage", good[: len(good) // 2]):
        with pytest.raises(CorruptImage):
            train_crop(bad, 32, 24, 0.1, 0.1, False)


# ------------------------------------------------------------------ the workers' road to the same pixels

SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (800, 600), (256, 301))  # the last: a half-pixel square


def photo(w: int, h: int, seed: int, quality: int = 90, mode: str = "RGB", **save) -> bytes:
    """A view of one of scikit-learn's two real photos as a w x h JPEG."""
    from sklearn.datasets import load_sample_images

    src = Image.fromarray(load_sample_images().images[seed % 2])
    rng = np.random.default_rng(seed)
    bw = min(src.width, src.height * w / h) * rng.uniform(0.6, 1.0)
    bh = bw * h / w
    x, y = rng.uniform(0, src.width - bw), rng.uniform(0, src.height - bh)
    buf = io.BytesIO()
    src.resize((w, h), Image.BILINEAR, box=(x, y, x + bw, y + bh)).convert(mode).save(buf, "JPEG", quality=quality, **save)
    return buf.getvalue()


def test_compiled_resample_is_pillows_bilinear_bit_for_bit():
    """resample.py against PIL.Image.resize(BILINEAR, box): shrinking and growing, fractional boxes,
    images tall enough for Pillow's vertical-first order, mirrored into channel-first layout."""
    from distalex.data import resample

    rng = np.random.default_rng(0)
    vertical_first = 0
    for trial in range(120):
        w, h = (int(x) for x in rng.integers(1, 300, 2))
        if trial % 3 == 0:
            h = int(rng.integers(300, 700))  # tall: Pillow resizes vertically first
        size = int(rng.integers(1, 90))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
        box = (x0, y0, rng.uniform(x0 + 0.1, w), rng.uniform(y0 + 0.1, h))
        want = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR, box=box))
        assert np.array_equal(resample.resample_hwc(a, box, size), want), f"trial {trial}: {w}x{h} {box} -> {size}"
        out = np.empty((3, size, size), np.uint8)
        resample.resample_into(out, a, box, True)
        assert np.array_equal(out, want[:, ::-1].transpose(2, 0, 1)), f"trial {trial}: mirrored"
        vertical_first += resample.vertical_first(w, h, size)
    assert vertical_first > 20  # both of Pillow's pass orders were compared


def both_forms() -> list[tuple[str, bytes]]:
    """Real photos in ImageNet's shapes, and the same in the paper's stored form (make_shards --square 256)."""
    from distalex.data.make_shards import paper_form

    out = []
    for i, (w, h) in enumerate(SHAPES):
        data = photo(w, h, i)
        out += [(f"{w}x{h}", data), (f"{w}x{h} as 256x256", paper_form(data, 256, 90)[0])]
    return out


@pytest.mark.parametrize("resize,size", [(256, 224), (128, 112)])
def test_worker_crops_equal_the_pillow_crops_on_photos_in_both_forms(resize, size):
    """decode_crop_into / eval_crops_into (torchvision's decoder, the compiled resample or, at scale,
    a slice) give train_crop's and centre_square's pixels bit for bit; the paper's form at resize
    256 takes the slice, the originals (and an image whose square sits at a half pixel) the resample."""
    rng = np.random.default_rng(1)
    sliced = []
    for name, data in both_forms():
        image = augment.decode_hwc(data, resize)
        assert np.array_equal(image, np.asarray(augment.open_rgb(data, resize))), name
        h, w = image.shape[:2]
        for _ in range(3):
            u, v, f = rng.random(3)
            out = np.empty((3, size, size), np.uint8)
            augment.decode_crop_into(out, data, resize, size, u, v, f < 0.5)
            assert np.array_equal(out, train_crop(data, resize, size, u, v, f < 0.5).transpose(2, 0, 1)), (name, u, v)
        square = centre_square(data, resize)
        one, ten = np.empty((3, size, size), np.uint8), np.empty((10, 3, size, size), np.uint8)
        augment.eval_crops_into(one, data, resize, size)
        augment.eval_crops_into(ten, data, resize, size)
        assert np.array_equal(one, centre_crop(square, size).transpose(2, 0, 1)), name
        assert np.array_equal(ten, ten_crop(square, size).transpose(0, 3, 1, 2)), name
        box = augment.crop_box(w, h, resize, size, 0.5, 0.5)
        sliced.append(augment.at_scale(w, h, resize, box[0], box[1]))
    assert sum(sliced) == (len(SHAPES) if resize == 256 else 0), sliced


def test_decode_hwc_reads_every_image_as_pillow_does():
    """Grey, CMYK, progressive and 4:4:4 JPEGs, a PNG, one large enough for Pillow's DCT downscale:
    the pixels of open_rgb; broken or truncated bytes raise CorruptImage."""
    cases = {
        "grey": photo(300, 260, 0, mode="L"), "cmyk": photo(300, 260, 1, mode="CMYK"),
        "progressive": photo(300, 260, 2, progressive=True), "4:4:4": photo(300, 260, 3, subsampling=0),
        "png": png(np.asarray(Image.open(io.BytesIO(photo(300, 260, 4))))), "large": photo(1200, 900, 5),
    }
    for name, data in cases.items():
        want = np.asarray(augment.open_rgb(data, 256))
        got = augment.decode_hwc(data, 256)
        assert got.shape == want.shape and got.dtype == np.uint8 and np.array_equal(got, want), name
    assert augment.decode_hwc(cases["large"], 256).shape[:2] == (450, 600)  # decoded at 1/2 scale
    assert augment.jpeg_frame(cases["grey"]) == (300, 260, 1) and augment.jpeg_frame(cases["cmyk"])[2] == 4
    assert augment.jpeg_frame(cases["png"]) is None
    good = photo(300, 260, 6)
    for bad in (b"", b"garbage", good[: len(good) // 2], good[:600], b"\xff\xd8" + b"\x00" * 40):
        with pytest.raises(CorruptImage):
            augment.decode_crop_into(np.empty((3, 224, 224), np.uint8), bad, 256, 224, 0.1, 0.1, False)


@pytest.mark.parametrize("scale", ["standardized", "raw"])
def test_lighting_noise_has_the_covariance_of_the_eigen_decomposition(scale):
    n, std = 200_000, 0.1
    g = torch.Generator().manual_seed(1234)
    shift = lighting_shift(n, std, g, torch.device("cpu"), scale).double()  # (n, 3)
    p = torch.tensor(PCA_EIGVEC, dtype=torch.float64)
    lam = torch.tensor(lighting_scales(scale), dtype=torch.float64)
    want = p @ torch.diag((std * lam) ** 2) @ p.T
    sd = want.diagonal().sqrt()
    # mean: 0 within 5 standard errors per channel
    assert (shift.mean(0).abs() < 5 * sd / n**0.5).all(), shift.mean(0)
    cov = torch.cov(shift.T)
    # each entry within 3% of the largest variance (sampling error is ~0.5% at this n)
    assert (cov - want).abs().max() < 0.03 * want.max(), (cov, want)
    # in the eigenbasis the noise is uncorrelated with variances (std * scale)^2
    eig = p.T @ cov @ p
    np.testing.assert_allclose(eig.diagonal(), (std * lam) ** 2, rtol=0.03)
    assert eig.triu(1).abs().max() < 0.03 * eig.diagonal().min() ** 0.5 * eig.diagonal().max() ** 0.5
    # and it is not a degenerate draw: std 0 gives no noise, the wrong std shows
    assert lighting_shift(10, 0.0, g, torch.device("cpu"), scale).abs().max() == 0
    assert (torch.cov(lighting_shift(n, 0.2, g, torch.device("cpu"), scale).double().T) - want).abs().max() > 0.5 * want.max()


def test_lighting_magnitudes_are_the_documented_ones():
    """docs/paper.md, "Conventions": raw draws alpha x sqrt(eigenvalue) in pixels, the authors' form
    (their own stdevs were 121.78, 37.09, 19.72); standardized alpha x eigenvalue in [0, 1] units."""
    g = torch.Generator().manual_seed(7)
    to_components = torch.linalg.inv(torch.tensor(PCA_EIGVEC, dtype=torch.float64).T)  # RGB -> alpha_j s_j
    raw = lighting_shift(100_000, 0.1, g, "cpu", "raw").double() @ to_components  # (n, 3)
    g.manual_seed(7)  # the same alpha
    unit = lighting_shift(100_000, 0.1, g, "cpu", "standardized").double() @ to_components
    np.testing.assert_allclose(raw.std(0), [11.89, 3.496, 1.711], rtol=0.02)  # pixels
    np.testing.assert_allclose(unit.std(0) * 255, [5.546, 0.4794, 0.1148], rtol=0.02)  # pixels
    # from the same alpha, the raw shift is the standardized one x 255 / sqrt(eigenvalue): 2.1, 7.3, 14.9 x
    ratio = raw.std(0) / (unit.std(0) * 255)
    np.testing.assert_allclose(ratio, 1 / torch.tensor(PCA_EIGVAL).double().sqrt(), rtol=1e-4)
    authors = torch.tensor([121.78, 37.09, 19.72], dtype=torch.float64)
    assert ((torch.tensor(lighting_scales("raw")) / authors - 1).abs() < 0.14).all()


def no_stats_cfg(**kw) -> DataConfig:
    return DataConfig(train_shards="/nonexistent/imagenet-train-000000.tar", **kw)


def test_normalize_applies_one_lighting_offset_per_image_and_channel_stats():
    cfg = no_stats_cfg()
    imgs = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = normalize(imgs, False, cfg, None)
        lit = normalize(imgs, True, cfg, torch.Generator().manual_seed(5))
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(plain, (imgs.float() / 255 - mean) / std)
    offset = (lit - plain) * std  # (6, 3, 8, 8), constant over the pixels of each image/channel
    per_image = offset[:, :, 0, 0]
    torch.testing.assert_close(offset, per_image[:, :, None, None].expand_as(offset), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_image, lighting_shift(6, 0.1, torch.Generator().manual_seed(5), "cpu"), atol=1e-5, rtol=0)
    assert per_image.std(0).min() > 0, "each image draws its own alpha"
    # same generator state -> identical output (what tp peers rely on); another state differs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = normalize(imgs, True, cfg, torch.Generator().manual_seed(5))
        other = normalize(imgs, True, cfg, torch.Generator().manual_seed(6))
        ten = normalize(imgs.view(1, 6, 3, 8, 8).expand(2, 6, 3, 8, 8).contiguous(), False, cfg, None)
    assert torch.equal(again, lit) and not torch.equal(other, lit)
    assert ten.shape == (2, 6, 3, 8, 8) and torch.equal(ten[1], plain)
    assert torch.equal(normalize(imgs, True, no_stats_cfg(lighting_std=0.0), None), plain)


def test_normalize_uses_the_shards_statistics_per_pixel(tmp_path):
    mean_img = np.zeros((256, 256, 3), np.float32)
    mean_img[:, 128:] = 0.5  # left half 0, right half 0.5
    np.save(tmp_path / "_mean_image.npy", mean_img)
    info = {"classes": ["a"], "splits": {"train": {"count": 1, "shards": []}},
            "stats": {"mean_rgb": [0.25] * 3, "std_rgb": [0.5] * 3, "mean_image": "_mean_image.npy"}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    imgs = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    chan = normalize(imgs, False, DataConfig(train_shards=str(tmp_path), resize=32, mean="channel"), None)
    assert torch.allclose(chan, torch.full_like(chan, (1 - 0.25) / 0.5))
    pix = normalize(imgs, False, DataConfig(train_shards=str(tmp_path), resize=32, mean="pixel"), None)
    # centre 16 of a 32 square: columns 0..7 left of the middle, 8..15 right of it
    assert torch.allclose(pix[..., 2:6], torch.full_like(pix[..., 2:6], 1 / 0.5), atol=1e-3)
    assert torch.allclose(pix[..., 10:14], torch.full_like(pix[..., 10:14], 0.5 / 0.5), atol=1e-3)
    ten = normalize(imgs[:, None].expand(2, 10, 3, 16, 16).contiguous(), False,
                    DataConfig(train_shards=str(tmp_path), resize=32, mean="pixel"), None)
    # crop 0 is the top-left corner (left half), crop 1 the top-right (right half); the columns
    # next to the middle are blended by the resize of the mean image
    left, right = ten[..., :13], ten[..., 3:]
    assert torch.allclose(left[:, 0], torch.full_like(left[:, 0], 2.0), atol=1e-3)
    assert torch.allclose(right[:, 1], torch.full_like(right[:, 1], 1.0), atol=1e-3)
    assert torch.allclose(left[:, 6], torch.full_like(left[:, 6], 1.0), atol=1e-3)  # mirror of crop 1
    assert torch.equal(ten[:, 6], ten[:, 1].flip(-1))


# ------------------------------------------------------------------ data.input_scale: raw


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def halves_stats(folder, left, right) -> str:
    """Shard statistics whose mean image is ``left`` (RGB in [0, 1]) on its left half and ``right``
    on its right, and whose std (0.25) must not divide a raw batch."""
    mean_img = np.zeros((256, 256, 3), np.float32)
    mean_img[:, :128], mean_img[:, 128:] = left, right
    np.save(folder / "_mean_image.npy", mean_img)
    info = {"classes": ["a"], "splits": {"train": {"count": 1, "shards": []}},
            "stats": {"mean_rgb": [0.4] * 3, "std_rgb": [0.25] * 3, "mean_image": "_mean_image.npy"}}
    (folder / "_info.json").write_text(json.dumps(info))
    return str(folder)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_raw_batch_is_pixels_minus_the_mean_images_centre_patch(tmp_path, decode):
    """The paper's input: 0-255 pixels, the lighting in pixels, minus the mean image x 255, nothing
    divided; the same from the CPU workers' crops and from data.decode=gpu's (on the CPU here)."""
    from distalex.data.decode import EncodedBatch, decode_batch

    left, right = np.array([0.2, 0.3, 0.4]), np.array([0.6, 0.5, 0.1])
    cfg = DataConfig(train_shards=halves_stats(tmp_path, left, right), resize=64, mean="pixel", input_scale="raw")
    sources = [jpeg_bytes(np.random.default_rng(i).integers(0, 256, (64, 80 + 8 * i, 3), dtype=np.uint8)) for i in range(4)]
    crops = [(0.0, 0.0, False), (0.99, 0.99, True), (0.5, 0.2, False), (0.1, 0.7, True)]  # corners, too
    if decode == "cpu":
        images = torch.stack([hwc_to_chw(train_crop(b, 64, 48, *c)) for b, c in zip(sources, crops)])
    else:
        encoded = EncodedBatch()
        for b, c in zip(sources, crops):
            encoded.add(b, 0, *c)
        images, _, skipped = decode_batch(encoded.take(0), 64, 48, torch.device("cpu"))
        assert skipped == 0
        # sources under twice data.resize (no DCT downscale): the device path's crops are the CPU path's bytes
        assert torch.equal(images, torch.stack([hwc_to_chw(train_crop(b, 64, 48, *c)) for b, c in zip(sources, crops)]))
    g = torch.Generator().manual_seed(3)
    x = normalize(images, True, cfg, g)
    shift = lighting_shift(4, 0.1, torch.Generator().manual_seed(3), "cpu", "raw")  # (4, 3) pixels
    pixels = images.double() + shift.double()[:, :, None, None]
    # every crop, wherever it was cut, gets the centre 48 of the 64 square: columns 8..55 of the mean
    # image, left half up to column 31; the columns next to the middle are blended by its resize
    got, want_left, want_right = x.double(), torch.tensor(left * 255), torch.tensor(right * 255)
    torch.testing.assert_close(got[..., :20], pixels[..., :20] - want_left[:, None, None], atol=2e-3, rtol=0)
    torch.testing.assert_close(got[..., 28:], pixels[..., 28:] - want_right[:, None, None], atol=2e-3, rtol=0)
    assert x.abs().max() > 50, "pixel units, not [0, 1]"
    # without lighting, the standardized batch is the raw one / 255 / std
    plain_raw = normalize(images, False, cfg)
    plain_std = normalize(images, False, DataConfig(train_shards=cfg.train_shards, resize=64, mean="pixel"))
    torch.testing.assert_close(plain_std, plain_raw / 255 / 0.25, atol=1e-5, rtol=1e-5)


def test_raw_scale_with_the_channel_mean(tmp_path):
    cfg = DataConfig(train_shards=halves_stats(tmp_path, 0.0, 0.0), resize=32, mean="channel", input_scale="raw")
    imgs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(normalize(imgs, False, cfg), imgs.float() - 0.4 * 255)
    ten = imgs[:, None].expand(2, 10, 3, 16, 16).contiguous()
    assert torch.equal(normalize(ten, False, cfg), ten.float() - 0.4 * 255)
