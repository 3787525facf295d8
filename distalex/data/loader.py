"""WebDataset shards -> uint8 batches, one pipeline per data-parallel group.

Who reads what in one training epoch (seed s, epoch e):

  1. The shard list is permuted with (s, e) and read as one virtual sequence of N samples
     (per-shard counts from ``_info.json``).
  2. dp rank r owns positions [r * M, (r + 1) * M) of it, M = steps_per_epoch * batch_size: the
     shards inside that window plus the parts of the (at most two) shards that straddle its edges.
     So dp ranks are disjoint and every rank has exactly M samples however uneven the shards are,
     and no rank waits for another at the epoch's end. Only N mod (dp * batch) samples sit out an
     epoch, a different few each epoch.
  3. DataLoader worker w of W gets rank batches w, w + W, w + 2W, ... and reads its own contiguous
     slice of the window, so workers are disjoint too; the DataLoader's round robin over workers
     then hands out batches in step order.
  4. Per worker: the raw samples go through a shuffle buffer (``data.shuffle_buffer``), then each
     draws its crop and flip from the worker's RNG and is decoded. Both RNGs are seeded with
     (s, e, dp rank, worker), so an epoch is the same whenever it is replayed, and resuming at
     ``start_step`` replays the buffer and the RNG over the skipped samples without decoding them.
  5. A sample that does not decode, or lacks its jpg/cls, is skipped and counted; a tar that ends
     early (truncated) loses the rest of that shard, counted as skipped samples. The worker then
     makes up the shortfall by reading its own slice again, so the step count never changes.

tp rank 0 of each group runs the pipeline; the batch (uint8, a few MB) is broadcast over the tp
group so every tower sees the same pixels. Normalisation and lighting run later, on the device
(``augment.normalize``).

Known limit: a JPEG that only fails at decode time and lies in the skipped part of a resumed epoch
is not detected while skipping, so the resumed epoch runs one sample off from the uninterrupted
one after it (and its ``skipped`` count starts lower).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from distalex.data.augment import CorruptImage, centre_crop, centre_square, hwc_to_chw, ten_crop, train_crop
from distalex.data.info import DataError, Shard, resolve_shards, sample_key
from distalex.data.workers import Prefetched, make_loader

log = logging.getLogger("distalex.data")


@dataclass
class Batch:
    images: torch.Tensor
    """uint8 (B, 3, S, S), or (B, 10, 3, S, S) for ten-crop evaluation, on dims.device."""
    labels: torch.Tensor
    """int64 (B,) on dims.device."""
    skipped: int = 0
    """Samples skipped so far in this epoch (or validation pass) by this dp group: corrupt images,
    incomplete samples, and samples lost to a truncated tar."""


@dataclass(frozen=True)
class Segment:
    """Samples [begin, end) of one shard, in the order they are stored."""

    url: str
    begin: int
    end: int


def plan_segments(shards: list[Shard], start: int, length: int) -> list[Segment]:
    """Positions [start, start + length) of the concatenated shards, wrapping around at the end."""
    total = sum(s.count for s in shards)
    if length <= 0:
        return []
    if total == 0:
        raise DataError("no samples in the shard list")
    offsets = np.cumsum([0] + [s.count for s in shards])
    pos, left, out = start % total, length, []
    while left > 0:
        i = int(np.searchsorted(offsets, pos, side="right")) - 1  # shard holding position pos
        local = pos - int(offsets[i])
        take = min(left, shards[i].count - local)
        out.append(Segment(shards[i].url, local, local + take))
        left -= take
        pos = (pos + take) % total
    return out


# ------------------------------------------------------------------ reading shards


def read_segment(seg: Segment, on_skip: Callable[[int, str], None]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for samples seg.begin .. seg.end - 1 of a shard.

    Samples before ``begin`` are passed over by their tar headers (the file seeks, no data read).
    If the tar ends or breaks before ``end``, ``on_skip(lost, reason)`` reports the samples lost.
    """
    done = seg.begin  # samples in [begin, done) have been yielded or reported
    index, key, members = -1, None, {}
    reason = "tar ended early (truncated?)"
    try:
        with open(seg.url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for ti in tf:
                tf.members = []  # keep the member list from growing over a large shard
                if not ti.isreg() or ti.name.rpartition("/")[2].startswith("__"):
                    continue
                k = sample_key(ti.name)
                if k != key:
                    if seg.begin <= index < seg.end:
                        yield key, members
                        done = index + 1
                    index, key, members = index + 1, k, {}
                    if index >= seg.end:
                        break
                if index < seg.begin:
                    continue
                data = tf.extractfile(ti).read()
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"{ti.name}: short read")
                members[ti.name.rpartition("/")[2].split(".", 1)[1].lower()] = data
            else:
                if seg.begin <= index < seg.end:
                    yield key, members
                    done = index + 1
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = f"{type(e).__name__}: {e}"
    if done < seg.end:
        on_skip(seg.end - done, f"{seg.url}: samples {done}..{seg.end - 1} lost: {reason}")


def shuffled(items, size: int, rng: np.random.Generator):
    """A shuffle buffer of ``size`` items (0 or 1: no shuffle), deterministic given ``rng``."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


def parse_sample(key: str, members: dict[str, bytes]) -> tuple[bytes, int]:
    """(jpeg bytes, label) of a raw sample, or CorruptImage naming what is wrong."""
    data = members.get("jpg", members.get("jpeg"))
    if data is None or "cls" not in members:
        raise CorruptImage(f"sample {key!r} has {sorted(members)}, needs jpg and cls")
    try:
        return data, int(members["cls"])
    except ValueError:
        raise CorruptImage(f"sample {key!r}: cls is not an integer") from None


class _Skips:
    """Skipped-sample counter of one worker; reports each skip once as a warning."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, n: int, reason: str) -> None:
        self.count += n
        log.warning("skipped %d sample(s): %s", n, reason)


# ------------------------------------------------------------------ training stream


class _TrainStream(IterableDataset):
    """One dp rank's training batches; runs inside the DataLoader workers (or inline with 0)."""

    def __init__(self, shards, *, seed, dp_rank, batch_size, steps, image_size, resize, flip, buffer, workers):
        super().__init__()
        self.shards, self.seed, self.dp_rank = shards, seed, dp_rank
        self.batch_size, self.steps, self.image_size, self.resize = batch_size, steps, image_size, resize
        self.flip, self.buffer, self.workers = flip, buffer, workers
        self.epoch, self.start_step = 0, 0

    def epoch_order(self, epoch: int) -> list[Shard]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def worker_plan(self, epoch: int, logical: int) -> tuple[list[Segment], int]:
        """(segments, batches) of logical worker ``logical``: rank batches logical, logical + W, ..."""
        W, B = self.workers, self.batch_size
        counts = [len(range(w, self.steps, W)) for w in range(W)]
        rank_start = self.dp_rank * self.steps * B
        start = rank_start + B * sum(counts[:logical])
        return plan_segments(self.epoch_order(epoch), start, counts[logical] * B), counts[logical]

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        # The DataLoader asks its workers in turn starting from worker 0, so worker 0 must hold
        # batch start_step: rotate the logical ids (which fix the data and the RNG) by start_step.
        logical = (wid + self.start_step) % self.workers
        yield from self._batches(self.epoch, logical, skip=len(range(logical, self.start_step, self.workers)))

    def _batches(self, epoch: int, logical: int, skip: int):
        segments, n_batches = self.worker_plan(epoch, logical)
        B, S = self.batch_size, self.image_size
        need, skip_samples = n_batches * B, skip * B
        shuffle_rng = np.random.default_rng([self.seed, epoch, self.dp_rank, logical, 1])
        aug_rng = np.random.default_rng([self.seed, epoch, self.dp_rank, logical, 2])
        skips = _Skips()
        reported = 0
        images = torch.empty((B, 3, S, S), dtype=torch.uint8)
        labels = torch.empty((B,), dtype=torch.int64)
        used, fill = 0, 0
        while used < need:
            # One pass over this worker's slice; later passes only make up for skipped samples.
            good = 0
            raw = (s for seg in segments for s in read_segment(seg, skips))
            for key, members in shuffled(raw, self.buffer, shuffle_rng):
                u, v, f = aug_rng.random(3)  # drawn for every sample, so skipping keeps the stream
                try:
                    data, label = parse_sample(key, members)
                    if used >= skip_samples:
                        img = train_crop(data, self.resize, S, u, v, self.flip and f < 0.5)
                        images[fill].copy_(hwc_to_chw(img))
                        labels[fill] = label
                        fill += 1
                except CorruptImage as e:
                    skips(1, f"{key}: {e}")
                    continue
                used += 1
                good += 1
                if fill == B:
                    yield images.clone(), labels.clone(), skips.count - reported
                    reported, fill = skips.count, 0
                if used == need:
                    break
            if good == 0 and used < need:
                raise DataError(
                    f"dp rank {self.dp_rank} worker {logical}: no readable sample in its "
                    f"{sum(s.end - s.begin for s in segments)} samples of {sorted({s.url for s in segments})}"
                )


def _check_sizes(data_cfg, image_size: int) -> None:
    if image_size > data_cfg.resize:
        raise DataError(
            f"model.image_size={image_size} is larger than data.resize={data_cfg.resize}: "
            "the crop is taken from the resize x resize centre square"
        )


class TrainLoader:
    """Training batches of one dp group; ``epoch(e, start_step)`` replays epoch e from any step.

    Every rank builds one (it checks the shards and knows steps_per_epoch); only tp rank 0 reads.
    """

    def __init__(self, data_cfg, dims, batch_size: int, image_size: int, seed: int):
        _check_sizes(data_cfg, image_size)
        self.cfg, self.dims = data_cfg, dims
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.shards = resolve_shards(data_cfg.train_shards, "train", "data.train_shards")
        self.num_samples = sum(s.count for s in self.shards)
        samples = data_cfg.train_samples or self.num_samples
        self.steps_per_epoch = samples // (batch_size * dims.dp)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{samples} training samples cannot fill one step of {batch_size} x dp={dims.dp}: "
                "lower train.batch_size or add data"
            )
        self.workers = data_cfg.workers
        self.stream = _TrainStream(
            self.shards, seed=seed, dp_rank=dims.dp_rank, batch_size=batch_size, steps=self.steps_per_epoch,
            image_size=image_size, resize=data_cfg.resize, flip=data_cfg.flip, buffer=data_cfg.shuffle_buffer,
            workers=max(1, self.workers),
        )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches for steps start_step .. steps_per_epoch - 1 of ``epoch``; the same on every replay."""
        batches = self.start(epoch, start_step)
        try:
            yield from batches
        finally:
            batches.close()

    def start(self, epoch: int, start_step: int = 0) -> EpochBatches:
        """Start the workers for ``epoch`` from ``start_step``; see ``EpochBatches``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside 0..{self.steps_per_epoch}")
        return EpochBatches(self, epoch, start_step)


class EpochBatches:
    """One epoch's batches from ``start_step`` on: iterate for them, ``close`` on every way out.

    On the loading rank the workers start at once and the first batch is fetched in the
    background (``workers.Prefetched``): ``ready(timeout)`` waits for it in slices, so the
    training loop can act on a stop during a long start-up. Other ranks are always ready.
    """

    def __init__(self, loader: TrainLoader, epoch: int, start_step: int):
        self.loader, self.start_step, self._source = loader, start_step, None
        if loader.dims.tp_rank == 0 and start_step < loader.steps_per_epoch:
            loader.stream.epoch, loader.stream.start_step = epoch, start_step
            self._source = Prefetched(loader.stream, loader.workers, loader.dims.device)

    def ready(self, timeout: float = 0.0) -> bool:
        return self._source is None or self._source.ready(timeout)

    def __iter__(self) -> Iterator[Batch]:
        loader, dims = self.loader, self.loader.dims
        B, S = loader.batch_size, loader.image_size
        skipped = 0
        for _ in range(self.start_step, loader.steps_per_epoch):
            if self._source is not None:
                images, labels, new_skips = next(self._source)
                skipped += new_skips
                images = images.to(dims.device, non_blocking=True)
                meta = torch.cat([labels, torch.tensor([skipped])]).to(dims.device)  # (B + 1,) labels, skipped
            else:
                images = torch.empty((B, 3, S, S), dtype=torch.uint8, device=dims.device)
                meta = torch.empty((B + 1,), dtype=torch.int64, device=dims.device)
            if dims.tp > 1:
                # tp rank 0 -> its tp peers: the same pixels for every tower.
                dist.broadcast(images, src=dims.tp_src, group=dims.tp_group)
                dist.broadcast(meta, src=dims.tp_src, group=dims.tp_group)
                if self._source is None:
                    skipped = int(meta[-1])  # device sync on CUDA; one int per step
            yield Batch(images=images, labels=meta[:-1], skipped=skipped)

    def close(self) -> None:
        """Make the workers exit now, wherever they are (they hold nothing to save)."""
        if self._source is not None:
            self._source.close()


# ------------------------------------------------------------------ validation stream


class _ValStream(IterableDataset):
    """This dp rank's validation samples, in stored order; worker w takes a contiguous run of batches."""

    def __init__(self, segments, *, num, batch_size, image_size, resize, ten, workers):
        super().__init__()
        self.segments, self.num, self.batch_size = segments, num, batch_size
        self.image_size, self.resize, self.ten, self.workers = image_size, resize, ten, workers

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        B, S = self.batch_size, self.image_size
        n_batches = -(-self.num // B)
        k0, k1 = n_batches * w // self.workers, n_batches * (w + 1) // self.workers
        lo, hi = k0 * B, min(k1 * B, self.num)
        skips, reported = _Skips(), 0
        images, labels = [], []
        for seg in _slice_segments(self.segments, lo, hi):
            for key, members in read_segment(seg, skips):
                try:
                    data, label = parse_sample(key, members)
                    sq = centre_square(data, self.resize)
                except CorruptImage as e:
                    skips(1, f"{key}: {e}")
                    continue
                images.append(hwc_to_chw(ten_crop(sq, S) if self.ten else centre_crop(sq, S)))
                labels.append(label)
                if len(images) == B:
                    yield torch.stack(images), torch.tensor(labels), skips.count - reported
                    images, labels, reported = [], [], skips.count
        if images or skips.count > reported:
            shape = (0, 10, 3, S, S) if self.ten else (0, 3, S, S)
            imgs = torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8)
            yield imgs, torch.tensor(labels, dtype=torch.int64), skips.count - reported


def _slice_segments(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    """Positions [lo, hi) of the concatenation of ``segments``."""
    out, pos = [], 0
    for seg in segments:
        n = seg.end - seg.begin
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Segment(seg.url, seg.begin + a - pos, seg.begin + b - pos))
        pos += n
    return out


class ValLoader:
    """Validation batches: dp rank r gets samples [N r / dp, N (r + 1) / dp) of the val shards.

    Iterate once per evaluation. Batch counts may differ across dp ranks (sum counts with one
    all_reduce afterwards); tp peers get the same batches: a header (batch size, skipped; size 0
    ends the pass) is broadcast before each batch. Batches may be smaller than batch_size (the
    last one, or one with corrupt samples removed).
    """

    def __init__(self, data_cfg, dims, batch_size: int, image_size: int, ten_crop: bool):
        _check_sizes(data_cfg, image_size)
        self.cfg, self.dims = data_cfg, dims
        self.batch_size, self.image_size, self.ten_crop = batch_size, image_size, ten_crop
        self.shards = resolve_shards(data_cfg.val_shards, "val", "data.val_shards")
        self.total_samples = sum(s.count for s in self.shards)
        lo = self.total_samples * dims.dp_rank // dims.dp
        hi = self.total_samples * (dims.dp_rank + 1) // dims.dp
        self.num_samples = hi - lo
        """Samples this dp rank evaluates (before corrupt ones are skipped)."""
        self.segments = plan_segments(self.shards, lo, hi - lo)
        self.workers = min(data_cfg.workers, max(1, -(-self.num_samples // batch_size)))

    def __iter__(self) -> Iterator[Batch]:
        dims, S = self.dims, self.image_size
        crops = (10, 3, S, S) if self.ten_crop else (3, S, S)
        source = None
        if dims.tp_rank == 0:
            stream = _ValStream(
                self.segments, num=self.num_samples, batch_size=self.batch_size, image_size=S,
                resize=self.cfg.resize, ten=self.ten_crop, workers=max(1, self.workers),
            )
            source = iter(make_loader(stream, self.workers, dims.device))
        skipped = 0
        while True:
            if source is not None:
                item = next(source, None)
                while item is not None and len(item[1]) == 0:  # a batch that was all corrupt
                    skipped += item[2]
                    item = next(source, None)
                if item is None:
                    header = torch.tensor([0, skipped], device=dims.device)
                else:
                    images, labels, new_skips = item
                    skipped += new_skips
                    header = torch.tensor([len(labels), skipped], device=dims.device)
            else:
                header = torch.empty(2, dtype=torch.int64, device=dims.device)
            if dims.tp > 1:
                dist.broadcast(header, src=dims.tp_src, group=dims.tp_group)
            n, skipped = (int(v) for v in header.tolist())  # device sync: once per eval batch
            if n == 0:
                return
            if source is not None:
                images = images.to(dims.device, non_blocking=True)
                labels = labels.to(dims.device, non_blocking=True)
            else:
                images = torch.empty((n, *crops), dtype=torch.uint8, device=dims.device)
                labels = torch.empty((n,), dtype=torch.int64, device=dims.device)
            if dims.tp > 1:
                dist.broadcast(images, src=dims.tp_src, group=dims.tp_group)
                dist.broadcast(labels, src=dims.tp_src, group=dims.tp_group)
            yield Batch(images=images, labels=labels, skipped=skipped)
