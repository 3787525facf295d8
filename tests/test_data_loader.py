"""The loader: dp split, equal step counts, tp broadcast, resume, bad data.

Every sample is a flat-colour JPEG whose colour encodes its id, so the test reads back which
sample each rank got from the uint8 batch itself, after crop and flip.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from distalex.config import DataConfig
from distalex.data.info import DataError, Shard
from distalex.data.loader import TrainLoader, ValLoader, plan_segments
from distalex.parallel.dims import ParallelDims
from tests.distributed import run_workers

CLASSES = 5
SIZE, RESIZE = 16, 20


def id_jpeg(i: int) -> bytes:
    colour = (16 + 7 * (i % 32), 16 + 7 * (i // 32), 128)
    buf = io.BytesIO()
    Image.new("RGB", (26, 20), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def ids_of(images: torch.Tensor) -> list[int]:
    """(B, 3, S, S) uint8 -> the ids their flat colours encode."""
    rgb = images.float().mean(dim=(-1, -2))  # (B, 3)
    ids = []
    for r, g, _ in rgb.tolist():
        assert abs(r - 16 - 7 * round((r - 16) / 7)) < 2.5, "not a flat id colour"
        ids.append(round((r - 16) / 7) + 32 * round((g - 16) / 7))
    return ids


def write_shards(folder: Path, sizes: list[int], split: str = "train", corrupt: tuple[int, ...] = (),
                 truncate: dict[int, float] | None = None) -> dict:
    """Shards of consecutive ids with the given sizes; ``corrupt`` ids get garbage bytes;
    ``truncate`` {shard: fraction} cuts that shard's file. Returns {lost: ids lost to the cuts}."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, i, lost = [], 0, []
    for s, n in enumerate(sizes):
        name = f"imagenet-{split}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name), mtime=0) as w:
            for _ in range(n):
                data = b"\xff\xd8 not really a jpeg" if i in corrupt else id_jpeg(i)
                w.write({"__key__": f"s{i:05d}", "jpg": data, "cls": str(i % CLASSES).encode()})
                i += 1
        shards.append({"name": name, "count": n})
        if truncate and s in truncate:
            path = folder / name
            raw = path.read_bytes()
            path.write_bytes(raw[: int(len(raw) * truncate[s])])
            kept = set()
            try:
                with tarfile.open(path) as tf:
                    for m in tf:
                        if m.name.endswith(".jpg") and len(tf.extractfile(m).read()) == m.size:
                            kept.add(int(m.name[1:6]))
            except tarfile.TarError:
                pass
            first = i - n
            lost += [j for j in range(first, i) if j not in kept]
    info_path = folder / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"classes": [f"c{k}" for k in range(CLASSES)], "splits": {}}
    info["splits"][split] = {"count": sum(sizes), "shards": shards}
    info_path.write_text(json.dumps(info))
    return {"lost": lost, "total": i}


def cfg_for(folder: Path, **kw) -> DataConfig:
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("workers", 0)
    return DataConfig(train_shards=str(folder), val_shards=str(folder), resize=RESIZE, **kw)


def dims(dp: int = 1, rank: int = 0) -> ParallelDims:
    return ParallelDims(dp=dp, tp=1, rank=rank)  # no mesh: a dp layout without processes


def epoch_ids(loader: TrainLoader, epoch: int, start: int = 0):
    batches = list(loader.epoch(epoch, start))
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape == (loader.batch_size, 3, SIZE, SIZE)
        assert b.images.is_contiguous() and b.labels.dtype == torch.int64
        assert [i % CLASSES for i in ids_of(b.images)] == b.labels.tolist(), "label does not match image"
    return [ids_of(b.images) for b in batches], batches


def test_plan_segments_windows_wrap_around():
    shards = [Shard("a", 3), Shard("b", 0), Shard("c", 5)]
    assert [(s.url, s.begin, s.end) for s in plan_segments(shards, 2, 3)] == [("a", 2, 3), ("c", 0, 2)]
    segs = [(s.url, s.begin, s.end) for s in plan_segments(shards, 6, 7)]
    assert segs == [("c", 3, 5), ("a", 0, 3), ("c", 0, 2)]


@pytest.mark.parametrize("workers", [0, 2])
def test_dp_ranks_disjoint_cover_and_equal_steps_with_uneven_shards(tmp_path, workers):
    write_shards(tmp_path, [3, 20, 7, 1, 13, 4])  # 48 samples, very uneven shards
    cfg = cfg_for(tmp_path, workers=workers)
    loaders = [TrainLoader(cfg, dims(2, r), global_batch=8, image_size=SIZE, seed=7) for r in range(2)]
    assert [ld.steps_per_epoch for ld in loaders] == [6, 6]
    seen_epochs = []
    for epoch in (0, 1):
        per_rank = [sum(epoch_ids(ld, epoch)[0], []) for ld in loaders]
        assert [len(p) for p in per_rank] == [24, 24]
        assert not set(per_rank[0]) & set(per_rank[1]), "dp ranks overlap"
        assert sorted(per_rank[0] + per_rank[1]) == list(range(48)), "the epoch is not covered exactly once"
        seen_epochs.append(per_rank)
    assert seen_epochs[0] != seen_epochs[1], "epochs must be shuffled differently"
    # same seed and epoch -> the same batches; the order is not the shard order
    again = sum(epoch_ids(loaders[0], 0)[0], [])
    assert again == seen_epochs[0][0] and again != sorted(again)


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_dp_split_windows_follow_the_per_rank_batches(tmp_path, workers):
    """dp=3 does not divide a global batch of 10: the ranks take 4, 3 and 3 a step, all for the same
    number of steps, from disjoint windows that together are the first steps * 10 samples of the
    epoch's shard order, each rank's window where its offset in the global batch puts it."""
    write_shards(tmp_path, [3, 20, 7, 1, 13, 4])  # 48 samples: 4 steps of 10, 8 sit out
    cfg = cfg_for(tmp_path, workers=workers)
    loaders = [TrainLoader(cfg, dims(3, r), global_batch=10, image_size=SIZE, seed=7) for r in range(3)]
    assert [ld.batch_size for ld in loaders] == [4, 3, 3]
    assert [ld.steps_per_epoch for ld in loaders] == [4, 4, 4]
    for epoch in (0, 1):
        order = loaders[0].stream.epoch_order(epoch)
        written = sorted(order, key=lambda s: s.url)  # ids run on through the shards in the order written
        first_id = {s.url: sum(t.count for t in written[:i]) for i, s in enumerate(written)}
        sequence = [first_id[s.url] + k for s in order for k in range(s.count)]  # the epoch's virtual sequence
        windows = [sequence[0:16], sequence[16:28], sequence[28:40]]  # 4 steps x (4, 3, 3), in dp rank order
        per_rank = []
        for ld, window in zip(loaders, windows):
            ids, batches = epoch_ids(ld, epoch)
            assert len(batches) == 4 and all(len(b.labels) == ld.batch_size for b in batches)
            per_rank.append(sum(ids, []))
            assert sorted(per_rank[-1]) == sorted(window), f"dp rank {ld.dims.dp_rank} read outside its window"
        assert len(set(sum(per_rank, []))) == 40, "dp ranks overlap"
    # a resumed epoch replays a short rank's batches from the saved step
    _, full = epoch_ids(loaders[2], 1)
    _, tail = epoch_ids(loaders[2], 1, 2)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(full[2:], tail))
    assert len(tail) == 2


def test_resume_mid_epoch_replays_the_same_batches(tmp_path):
    write_shards(tmp_path, [9, 14, 5, 12])
    ld = TrainLoader(cfg_for(tmp_path, workers=2, shuffle_buffer=6), dims(), global_batch=4, image_size=SIZE, seed=3)
    assert ld.steps_per_epoch == 10
    _, full = epoch_ids(ld, 2)
    for start in (3, 4, 9):
        _, tail = epoch_ids(ld, 2, start)
        assert len(tail) == 10 - start
        for a, b in zip(full[start:], tail):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert list(ld.epoch(2, 10)) == []


def test_batches_the_caller_keeps_are_never_overwritten(tmp_path):
    """Workers fill reused shared-memory slots; what the training process receives is a copy: all
    the batches of an epoch kept at once (far more than the slots) hold their own samples, and
    another epoch, refilling the same slots, leaves them as they were."""
    from distalex.data.workers import PREFETCH_FACTOR

    write_shards(tmp_path, [30, 26, 40])
    ld = TrainLoader(cfg_for(tmp_path, workers=2), dims(), 4, SIZE, seed=5)
    assert ld.steps_per_epoch == 24 > 2 * (PREFETCH_FACTOR + 1)
    ids, kept = epoch_ids(ld, 0)  # checks each batch's images against its labels
    assert sorted(sum(ids, [])) == list(range(96))
    before = [b.images.clone() for b in kept]
    list(ld.epoch(1))
    assert all(torch.equal(b.images, c) for b, c in zip(kept, before)), "a kept batch changed"
    assert all(torch.equal(b.images, a.images) for b, a in zip(kept, ld.epoch(0))), "epoch 0 replays otherwise"


@pytest.mark.parametrize("resize", [RESIZE, RESIZE - 2])  # the images' own scale (a slice), or resampled
def test_workers_fast_crops_give_pillows_batches(tmp_path, monkeypatch, resize):
    """The training and validation batches of the workers' road (torchvision's decoder, the compiled
    resample or a slice, straight into the batch) equal those of Pillow's (train_crop, centre_square)."""
    from distalex.data import augment

    write_shards(tmp_path, [9, 14, 5, 12])
    write_shards(tmp_path, [7, 6], split="val")

    def batches(fast: bool):
        monkeypatch.setattr(augment, "fast_crops", lambda: fast)
        cfg = cfg_for(tmp_path).model_copy(update={"resize": resize})
        train = [b.images for b in TrainLoader(cfg, dims(), 4, SIZE, seed=2).epoch(1)]
        val = [b.images for ten in (False, True) for b in ValLoader(cfg, dims(), 4, SIZE, ten)]
        return train + val

    fast, pillow = batches(True), batches(False)
    assert len(fast) == len(pillow) == 10 + 4 + 4
    assert all(torch.equal(a, b) for a, b in zip(fast, pillow))


def test_batch_slot_claims_take_the_first_free_slot_and_give_up_when_none_frees(monkeypatch):
    from distalex.data import batches
    from distalex.data.batches import BatchSlots

    slots = BatchSlots(workers=2, per_worker=3, batch_shape=(2, 3, 4, 4))
    assert [slots.claim(1)[0] for _ in range(3)] == [0, 1, 2]
    slots.images[1, 1].fill_(7)
    out = slots.take(1, 1, torch.device("cpu"))
    slots.images[1, 1].fill_(9)  # the worker refills the slot: the copy taken out stays
    assert torch.equal(out, torch.full((2, 3, 4, 4), 7, dtype=torch.uint8))
    assert slots.claim(1)[0] == 1 and slots.claim(0)[0] == 0
    monkeypatch.setattr(batches, "SLOT_WAIT_S", 0.05)
    with pytest.raises(DataError, match="loader worker 1: no batch slot copied out"):
        slots.claim(1)
    slots.reset()
    assert slots.claim(1)[0] == 0


def test_train_samples_overrides_the_epoch_length(tmp_path):
    write_shards(tmp_path, [10, 10])
    ld = TrainLoader(cfg_for(tmp_path, train_samples=12), dims(), global_batch=4, image_size=SIZE, seed=0)
    assert ld.steps_per_epoch == 3 and len(epoch_ids(ld, 0)[0]) == 3


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path):
    info = write_shards(tmp_path, [10, 12, 8, 10], corrupt=(5,), truncate={1: 0.55})
    lost = info["lost"]
    assert 0 < len(lost) < 12 and 5 not in lost
    good = sorted(set(range(40)) - set(lost) - {5})
    # validation reads every sample once: exact counts (the same shards, as the val split)
    assert write_shards(tmp_path / "v", [10, 12, 8, 10], "val", corrupt=(5,), truncate={1: 0.55}) == info
    val = list(ValLoader(cfg_for(tmp_path / "v"), dims(), batch_size=8, image_size=SIZE, ten_crop=False))
    seen = sum((ids_of(b.images) for b in val), [])
    assert sorted(seen) == good, "a truncated tar must lose only the rest of that shard"
    assert val[-1].skipped == 1 + len(lost)
    # training: the step count holds; the shortfall is made up from the rank's own samples
    ld = TrainLoader(cfg_for(tmp_path, workers=2), dims(), global_batch=4, image_size=SIZE, seed=1)
    ids, batches = epoch_ids(ld, 0)
    flat = sum(ids, [])
    assert len(batches) == ld.steps_per_epoch == 10
    assert set(flat) <= set(good) and set(flat) == set(good)
    assert batches[-1].skipped >= 1 + len(lost)
    assert [b.skipped for b in batches] == sorted(b.skipped for b in batches), "skipped counts up"


def test_val_loader_splits_by_dp_rank_and_ten_crops(tmp_path):
    write_shards(tmp_path, [7, 6, 9], split="val")
    parts = []
    for r in range(2):
        batches = list(ValLoader(cfg_for(tmp_path, workers=2), dims(2, r), batch_size=4, image_size=SIZE, ten_crop=True))
        for b in batches:
            assert b.images.shape[1:] == (10, 3, SIZE, SIZE)
            assert torch.equal(b.images[:, 5], b.images[:, 0].flip(-1))
        parts.append(sum((ids_of(b.images[:, 4]) for b in batches), []))
    assert len(parts[0]) == 11 and len(parts[1]) == 11
    assert sorted(parts[0] + parts[1]) == list(range(22))


def test_missing_or_no_shards_are_errors_before_training(tmp_path):
    write_shards(tmp_path, [4, 4])
    cfg = DataConfig(train_shards=str(tmp_path / "imagenet-train-{000000..000002}.tar"), resize=RESIZE)
    with pytest.raises(DataError, match="1 of 3 shards not found"):
        TrainLoader(cfg, dims(), 2, SIZE, 0)
    with pytest.raises(DataError, match="matches no shards"):
        TrainLoader(DataConfig(train_shards=str(tmp_path / "nothing-*.tar"), resize=RESIZE), dims(), 2, SIZE, 0)
    with pytest.raises(DataError, match="image_size"):
        TrainLoader(cfg_for(tmp_path), dims(), 2, RESIZE + 1, 0)
    with pytest.raises(DataError, match="cannot fill one step"):
        TrainLoader(cfg_for(tmp_path), dims(2, 0), 16, SIZE, 0)


# ------------------------------------------------------------------ 2 dp x 2 tp processes


def _ranks_worker(root: str):
    from distalex.parallel.dims import init_parallel

    d = init_parallel(tp=2, towers=2, device="cpu")
    out = {"dp_rank": d.dp_rank, "tp_rank": d.tp_rank}
    cfg = cfg_for(Path(root) / "even", workers=1)
    ld = TrainLoader(cfg, d, global_batch=8, image_size=SIZE, seed=11)
    out["steps"] = ld.steps_per_epoch
    out["train"] = [(b.images.clone(), b.labels.clone(), b.skipped) for b in ld.epoch(0)]
    out["resumed"] = [(b.images.clone(), b.labels.clone()) for b in ld.epoch(0, 4)]
    val = ValLoader(cfg, d, batch_size=4, image_size=SIZE, ten_crop=False)
    out["val"] = [(b.images.clone(), b.labels.clone()) for b in val]
    bad = TrainLoader(cfg_for(Path(root) / "bad"), d, global_batch=8, image_size=SIZE, seed=11)
    out["bad"] = [(b.images.clone(), b.labels.clone(), b.skipped) for b in bad.epoch(0)]
    d.barrier()
    return out


def test_two_dp_by_two_tp_processes(tmp_path):
    write_shards(tmp_path / "even", [5, 19, 2, 11, 3, 8])  # 48: 6 steps of 4 per dp rank
    write_shards(tmp_path / "even", [6, 7, 8], split="val")
    bad = write_shards(tmp_path / "bad", [10, 14, 8, 8], corrupt=(30,), truncate={1: 0.5})
    outs = run_workers(_ranks_worker, 4, str(tmp_path), timeout=240)
    assert [(o["dp_rank"], o["tp_rank"]) for o in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for key in ("train", "bad"):
        assert len({len(o[key]) for o in outs}) == 1, f"{key}: ranks ran different step counts"
    assert [o["steps"] for o in outs] == [6] * 4 and len(outs[0]["train"]) == 6
    # tp peers: byte-identical batches
    for a, b in ((outs[0], outs[1]), (outs[2], outs[3])):
        for key in ("train", "resumed", "val", "bad"):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                if key in ("train", "bad"):
                    assert x[2] == y[2]
    # dp ranks: disjoint, together the whole epoch
    ids = [sum((ids_of(im) for im, _, _ in o["train"]), []) for o in (outs[0], outs[2])]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(48))
    for o in (outs[0], outs[2]):
        for (im, lab, _), (rim, rlab) in zip(o["train"][4:], o["resumed"]):
            assert torch.equal(im, rim) and torch.equal(lab, rlab)
    val = [sum((ids_of(im) for im, _ in o["val"]), []) for o in (outs[0], outs[2])]
    assert sorted(val[0] + val[1]) == list(range(21)) and abs(len(val[0]) - len(val[1])) <= 1
    # bad data: skipped and counted, never served, no rank stuck
    bad_ids = [sum((ids_of(im) for im, _, _ in o["bad"]), []) for o in (outs[0], outs[2])]
    assert 30 not in bad_ids[0] + bad_ids[1] and not set(bad_ids[0]) & set(bad_ids[1])
    assert not set(bad["lost"]) & set(bad_ids[0] + bad_ids[1])
    assert outs[0]["bad"][-1][2] + outs[2]["bad"][-1][2] >= 1 + len(bad["lost"])
