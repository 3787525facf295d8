"""make_shards: ImageNet-layout folders -> tar shards, labels, the devkit mapping, bad inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from distalex.data.info import DataError, read_info, resolve_shards
from distalex.data.make_shards import main, make_shards

WNIDS = ["n02000000", "n01000000", "n03000000"]  # folder order on purpose not sorted


def jpeg(rng, w=40, h=30, mode="RGB", fmt="JPEG") -> bytes:
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def read_tars(folder: Path, split: str) -> dict[str, tuple[int, bytes, str]]:
    """key -> (label, jpg bytes, shard name) over every shard of the split, checking each key once."""
    out = {}
    for tar in sorted(folder.glob(f"imagenet-{split}-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name in members:
            key, ext = name.split(".", 1)
            assert ext in ("jpg", "cls"), name
            if ext == "jpg":
                assert key not in out, f"{key} in two places"
                out[key] = (int(members[key + ".cls"]), members[name], tar.name)
    return out


@pytest.fixture
def layout(tmp_path):
    """train/ with 3 classes of 5 images, among them a PNG, a CMYK and a grey JPEG, a garbage file
    and a truncated JPEG; val/ as class folders with 2 images each."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    expect = {}  # stem -> (label, source bytes, kind)
    for wnid in WNIDS:
        label = sorted(WNIDS).index(wnid)
        for split, n in (("train", 5), ("val", 2)):
            d = src / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                stem = f"{wnid}_{split}_{i}"
                data, kind = jpeg(rng, 40 + i, 30), "jpeg"
                d.joinpath(stem + ".JPEG").write_bytes(data)
                expect[stem] = (label, data, kind, split)
    special = {
        "png": jpeg(rng, fmt="PNG"),
        "cmyk": jpeg(rng, mode="CMYK"),
        "grey": jpeg(rng, mode="L"),
    }
    d = src / "train" / WNIDS[0]
    for kind, data in special.items():
        stem = f"odd.{kind}"  # a dot in the name: the key must not keep it
        d.joinpath(stem + ".JPEG").write_bytes(data)
        expect[f"odd_{kind}"] = (sorted(WNIDS).index(WNIDS[0]), data, kind, "train")
    d.joinpath("garbage.JPEG").write_bytes(b"this is not an image")
    d.joinpath("truncated.JPEG").write_bytes(jpeg(rng, 200, 150)[:600])
    return src, expect


def test_round_trip_every_image_once_with_its_label(layout, tmp_path):
    src, expect = layout
    out = tmp_path / "shards"
    info = make_shards(src, out, max_count=4, workers=2, seed=1, stats_samples=8)
    for split in ("train", "val"):
        got = read_tars(out, split)
        want = {k: v for k, v in expect.items() if v[3] == split}
        assert set(got) == set(want)
        for key, (label, data, kind, _) in want.items():
            assert got[key][0] == label, key
            if kind in ("jpeg", "grey"):
                assert got[key][1] == data, f"{key}: JPEG bytes must not be re-encoded"
            else:
                img = Image.open(io.BytesIO(got[key][1]))
                assert (img.format, img.mode) == ("JPEG", "RGB"), key
        # _info.json agrees with the tars
        s = info["splits"][split]
        assert s["count"] == len(want)
        per_shard = {}
        for key, (_, _, shard) in got.items():
            per_shard[shard] = per_shard.get(shard, 0) + 1
        assert [(sh["name"], sh["count"]) for sh in s["shards"]] == sorted(per_shard.items())
        assert all(sh["count"] <= 4 for sh in s["shards"])
    train = info["splits"]["train"]
    assert train["skipped"] == 2 and train["converted"] == 2
    assert sorted(Path(f["path"]).name for f in train["skipped_files"]) == ["garbage.JPEG", "truncated.JPEG"]
    assert all(f["reason"] for f in train["skipped_files"])
    assert info["classes"] == sorted(WNIDS)
    # read back through the loader's view of the folder
    ri = read_info(out)
    assert ri.classes == sorted(WNIDS) and ri.count("train") == len(read_tars(out, "train"))
    last = len(info["splits"]["train"]["shards"]) - 1
    shards = resolve_shards(str(out / f"imagenet-train-{{000000..{last:06d}}}.tar"), "train")
    assert len(shards) == 5 and sum(s.count for s in shards) == ri.count("train")
    with pytest.raises(DataError, match="1 of 6 shards not found"):
        resolve_shards(str(out / "imagenet-train-{000000..000005}.tar"), "train")
    assert len(ri.stats["mean_rgb"]) == 3 and np.load(out / ri.stats["mean_image"]).shape == (256, 256, 3)


def test_shuffle_is_global_and_seeded(layout, tmp_path):
    src, _ = layout

    def order(seed, name):
        make_shards(src, tmp_path / name, splits=("train",), max_count=100, seed=seed, stats_samples=0)
        with tarfile.open(tmp_path / name / "imagenet-train-000000.tar") as tf:
            return [m.name for m in tf if m.name.endswith(".jpg")]

    a, b, c = order(3, "a"), order(3, "b"), order(4, "c")
    assert a == b and a != c and sorted(a) == sorted(c)
    labels = [k.split("_")[0] for k in a]
    assert labels != sorted(labels), "classes must be interleaved, not in folder order"


def fake_devkit(folder: Path, id_to_wnid: dict[int, str], ground_truth: list[int]) -> None:
    """The two devkit files make_shards reads, in the real layout (data/ subfolder)."""
    data = folder / "data"
    data.mkdir(parents=True)
    data.joinpath("ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ground_truth)) + "\n")
    rows = [(i, w, f"words {w}", 0) for i, w in id_to_wnid.items()]
    rows.append((1001, "n99999999", "an ancestor synset", 3))  # not a class: it has children
    synsets = np.array(
        rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    )
    scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})


def test_flat_val_maps_devkit_ids_through_meta(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for w in WNIDS:
        (src / "train" / w).mkdir(parents=True)
        (src / "train" / w / f"{w}_0.JPEG").write_bytes(jpeg(rng))
    # devkit ids are in another order than the sorted wnids: id 1 is the last class
    id_to_wnid = {1: "n03000000", 2: "n01000000", 3: "n02000000"}
    truth = [2, 1, 3, 1, 2, 3, 3]
    (src / "val").mkdir()
    for n in range(1, len(truth) + 1):
        (src / "val" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg(rng))
    fake_devkit(src / "ILSVRC2012_devkit_t12", id_to_wnid, truth)
    make_shards(src, tmp_path / "out", stats_samples=0)
    got = read_tars(tmp_path / "out", "val")
    classes = sorted(WNIDS)
    for n, gt in enumerate(truth, 1):
        assert got[f"ILSVRC2012_val_{n:08d}"][0] == classes.index(id_to_wnid[gt])
    assert [got[f"ILSVRC2012_val_{n:08d}"][0] for n in range(1, 8)] == [0, 2, 1, 2, 0, 1, 1]
    # the devkit also names the classes (meta.mat's words), in the order of the labels
    assert read_info(tmp_path / "out").class_names == [f"words {w}" for w in classes]


def test_class_names_from_a_synset_mapping_else_the_folder_names(layout, tmp_path):
    src, _ = layout
    info = make_shards(src, tmp_path / "plain", splits=("val",), stats_samples=0)
    assert info["class_names"] == info["classes"] == sorted(WNIDS)
    # LOC_synset_mapping.txt in SRC (Kaggle's ImageNet); a class it does not list keeps its id
    (src / "LOC_synset_mapping.txt").write_text("n01000000 tench, Tinca tinca\nn03000000 goldfish\n")
    make_shards(src, tmp_path / "named", splits=("val",), stats_samples=0)
    assert read_info(tmp_path / "named").class_names == ["tench, Tinca tinca", "n02000000", "goldfish"]
    other = tmp_path / "names.txt"
    other.write_text("n02000000 great white shark\n")
    make_shards(src, tmp_path / "given", splits=("val",), stats_samples=0, class_names_file=str(other))
    assert read_info(tmp_path / "given").class_names == ["n01000000", "great white shark", "n03000000"]
    with pytest.raises(DataError, match="--class-names .*nowhere.txt: no such file"):
        make_shards(src, tmp_path / "given", splits=("val",), class_names_file=str(tmp_path / "nowhere.txt"), overwrite=True)
    assert read_info(tmp_path / "given").class_names[1] == "great white shark", "a bad option must not cost the old shards"
    # an _info.json written before class names existed reads as class ids
    raw = json.loads((tmp_path / "named" / "_info.json").read_text())
    del raw["class_names"]
    (tmp_path / "named" / "_info.json").write_text(json.dumps(raw))
    assert read_info(tmp_path / "named").class_names == sorted(WNIDS)


def test_bad_sources_are_clear_errors(layout, tmp_path):
    src, _ = layout
    out = tmp_path / "out"
    make_shards(src, out, splits=("val",), stats_samples=0)
    with pytest.raises(DataError, match="not empty.*--overwrite"):
        make_shards(src, out, splits=("val",))
    info = make_shards(src, out, splits=("val",), overwrite=True, stats_samples=0)
    assert info["splits"]["val"]["count"] == 6
    # a missing split
    (src / "val").rename(tmp_path / "val_away")
    with pytest.raises(DataError, match=r"val: missing"):
        make_shards(src, tmp_path / "o2")
    (src / "val").mkdir()
    with pytest.raises(DataError, match="val: no images"):
        make_shards(src, tmp_path / "o3")
    (src / "train" / "n09999999").mkdir()
    with pytest.raises(DataError, match="empty class folder.*n09999999"):
        make_shards(src, tmp_path / "o4", splits=("train",))
    # the CLI reports the error and exits with status 2, no traceback
    with pytest.raises(SystemExit) as e:
        main([str(src), str(tmp_path / "o5"), "--splits", "train", "--no-progress"])
    assert e.value.code == 2


def test_flat_val_without_devkit_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    (src / "train" / "n1").mkdir(parents=True)
    (src / "train" / "n1" / "a.JPEG").write_bytes(jpeg(rng))
    (src / "val").mkdir()
    (src / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg(rng))
    with pytest.raises(DataError, match="devkit"):
        make_shards(src, tmp_path / "out")


def test_resize_option_reencodes_shorter_side(layout, tmp_path):
    src, _ = layout
    make_shards(src, tmp_path / "out", splits=("val",), resize=20, stats_samples=0)
    for _, data, _ in read_tars(tmp_path / "out", "val").values():
        assert min(Image.open(io.BytesIO(data)).size) == 20


def _quantization(data: bytes) -> dict:
    return Image.open(io.BytesIO(data)).quantization


def test_square_option_stores_the_papers_form(layout, tmp_path):
    """--square N: every image is the loader's centre square of its source (shorter side N, the
    central N x N), a JPEG at the stated quality; one already N x N is kept; bad files still skipped."""
    from distalex.data.augment import centre_square

    src, expect = layout
    side, quality = 24, 80
    kept = jpeg(np.random.default_rng(1), side, side)
    src.joinpath("train", WNIDS[1], "already_square.JPEG").write_bytes(kept)
    expect["already_square"] = (sorted(WNIDS).index(WNIDS[1]), kept, "jpeg", "train")
    out = tmp_path / "paper"
    info = make_shards(src, out, square=side, quality=quality, max_count=4, workers=2, stats_samples=100)
    assert json.loads((out / "_info.json").read_text())["square"] == side
    assert info["quality"] == quality and info["resize"] is None
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality)
    tables = _quantization(buf.getvalue())
    for split in ("train", "val"):
        got = read_tars(out, split)
        assert set(got) == {k for k, v in expect.items() if v[3] == split}
        for key, (label, data, _) in got.items():
            assert label == expect[key][0]
            if key == "already_square":
                assert data == kept, "an image already in the paper's form is not re-encoded"
                continue
            img = Image.open(io.BytesIO(data))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (side, side)), key
            assert _quantization(data) == tables, f"{key}: not quality {quality}"
            want = io.BytesIO()
            Image.fromarray(centre_square(expect[key][1], side)).save(want, "JPEG", quality=quality)
            assert data == want.getvalue(), f"{key}: not the centre square of its source"
    train = info["splits"]["train"]
    assert train["skipped"] == 2 and train["converted"] == train["count"] - 1
    # The statistics describe the stored squares: their pixels' mean, and the original form's within noise.
    stored = [np.asarray(Image.open(io.BytesIO(d))) / 255.0 for _, d, _ in read_tars(out, "train").values()]
    assert info["stats"]["samples"] == len(stored)
    assert np.allclose(info["stats"]["mean_rgb"], np.mean([s.mean(axis=(0, 1)) for s in stored], axis=0), atol=0.02)
    original = make_shards(src, tmp_path / "original", splits=("train",), stats_samples=100)
    assert np.allclose(info["stats"]["mean_rgb"], original["stats"]["mean_rgb"], atol=0.02)
    assert original["square"] is None
    with pytest.raises(DataError, match="choose one"):
        make_shards(src, tmp_path / "both", square=side, resize=side)


def test_cli_writes_info(layout, tmp_path):
    src, _ = layout
    main([str(src), str(tmp_path / "out"), "--max-count", "3", "--workers", "1", "--no-progress"])
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["val"]["count"] == 6 and len(info["splits"]["val"]["shards"]) == 2


def test_demo_dataset_is_a_small_imagenet_layout(tmp_path):
    from distalex.data.demo import class_name, write_demo

    counts = write_demo(tmp_path / "src", train_per_class=4, val_per_class=2, size=40, seed=0)
    assert counts == {"train": 40, "val": 20}
    for split, n in (("train", 4), ("val", 2)):
        folders = sorted((tmp_path / "src" / split).iterdir())
        assert [f.name for f in folders] == [class_name(d) for d in range(10)]
        for f in folders:
            files = sorted(f.iterdir())
            assert len(files) == n
            img = Image.open(files[0])
            assert (img.format, img.mode) == ("JPEG", "RGB") and 36 <= min(img.size) <= 44
    info = make_shards(tmp_path / "src", tmp_path / "shards", max_count=15, stats_samples=10)
    got = read_tars(tmp_path / "shards", "train")
    assert len(got) == 40 and info["splits"]["val"]["count"] == 20
    assert all(label == int(key[1:9]) for key, (label, _, _) in got.items()), "label = digit"
