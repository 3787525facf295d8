"""WebDataset shards -> uint8 batches, one pipeline per data-parallel group.

Who reads what in one training epoch (seed s, epoch e):

  1. The shard list is permuted with (s, e) and read as one virtual sequence of N samples
     (per-shard counts from ``_info.json``).
  2. Each step takes a global batch of B samples (``train.batch_size``), dp rank r b_r of them
     (``ParallelDims.dp_batches``: equal, or where dp does not divide B the first B mod dp ranks one
     more), and steps_per_epoch = N // B. dp rank r owns positions [S * o_r, S * (o_r + b_r)) of the
     sequence, S = steps_per_epoch and o_r = b_0 + ... + b_(r-1): the shards inside that window plus
     the parts of the (at most two) shards that straddle its edges. So dp ranks are disjoint, every
     rank has exactly S * b_r samples however uneven the shards are, and every rank runs S steps:
     no rank waits for another at the epoch's end. Only N mod B samples sit out an epoch, a
     different few each epoch.
  3. DataLoader worker w of W gets rank batches w, w + W, w + 2W, ... and reads its own contiguous
     slice of the window, so workers are disjoint too; the DataLoader's round robin over workers
     then hands out batches in step order.
  4. Per worker: the raw samples go through a shuffle buffer (``data.shuffle_buffer``), then each
     draws its crop and flip from the worker's RNG and is decoded. Both RNGs are seeded with
     (s, e, dp rank, worker), so an epoch is the same whenever it is replayed, and resuming at
     ``start_step`` replays the buffer and the RNG over the skipped samples without decoding them.
     With ``data.decode: gpu`` the worker only checks each image's header and sends the bytes with
     the crop's random numbers; the training rank decodes and crops the whole batch on its device
     (``decode.py``), to the same pixels.
  5. A sample that does not decode, lacks its image or label, or has a label outside the class
     list is skipped and counted, as is a tar member without an extension; a shard that ends early
     (truncated, or a remote read that failed after its retries) loses the rest of its part,
     counted as skipped samples. The worker then makes up the shortfall by reading its own slice
     again, so the step count never changes. A worker with no readable sample at all ends the run
     with a one-line DataError.

Shards are read from any URL ``read.py`` opens (local files, ``pipe:``, http(s), object stores).
tp rank 0 of each group runs the pipeline; the batch (uint8, a few MB) goes to its tp peers:
broadcast, so every tower sees the same pixels, or under ``parallel.layout: hybrid`` scattered,
each rank getting the samples it convolves (``parallel.plan.share_images``); labels are broadcast.
Batch i + 1 is fetched and on its way to the device (``feed.py``) before batch i is handed over.
Normalisation and lighting run later, on the device (``augment.normalize``). How a batch travels
from a worker to the training process: ``batches.py``. The worker processes end with the epoch,
however it ends (``workers.py``).

Known limits: a JPEG that only fails at decode time and lies in the skipped part of a resumed epoch
is not detected while skipping, so the resumed epoch runs one sample off from the uninterrupted
one after it (and its ``skipped`` count starts lower). With ``data.decode: gpu`` an image whose
header reads but whose data does not decode is found only on the device, after the batch is
formed: its slot gets a copy of another image of the batch (with its label), counted as skipped.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from distalex.data import augment
from distalex.data.augment import CorruptImage
from distalex.data.batches import BatchSlots, EvalBatch, PixelBatch, Pixels, Skips, WorkerError
from distalex.data.decode import Encoded, EncodedBatch, decode_batch, host_to_device, probe
from distalex.data.feed import SideStream, batch_meta
from distalex.data.info import DataError, Shard, dataset_info, resolve_shards
from distalex.data.read import ReadPolicy, Segment, parse_sample, read_segment
from distalex.data.workers import PREFETCH_FACTOR, WorkerPool, start_early
from distalex.parallel.plan import share_images

__all__ = ["Batch", "Segment", "TrainLoader", "ValLoader", "parse_sample", "plan_segments", "read_segment"]

@dataclass
class Batch:
    images: torch.Tensor
    """uint8 (B, 3, S, S), or (B, 10, 3, S, S) for ten-crop evaluation, on dims.device. Training
    under the hybrid layout with tp dividing B: on a tp peer only its own samples' rows are filled
    (the rest zero)."""
    labels: torch.Tensor
    """int64 (B,) on dims.device."""
    skipped: torch.Tensor
    """int64 0-d tensor on dims.device: samples skipped so far in this epoch (or validation pass)
    by this dp group (corrupt images, incomplete samples, samples lost to a broken shard). A tensor,
    so that reading it (a device sync) happens only where the caller logs it."""


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


# ------------------------------------------------------------------ worker side


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


class _TrainStream(IterableDataset):
    """One dp rank's training batches; runs inside the DataLoader workers (or inline with 0)."""

    def __init__(self, shards, *, seed, dp_rank, window_start, batch_size, steps, image_size, data_cfg, workers,
                 num_classes, encoded):
        super().__init__()
        self.shards, self.seed, self.dp_rank, self.window_start = shards, seed, dp_rank, window_start
        self.batch_size, self.steps, self.image_size, self.workers = batch_size, steps, image_size, workers
        self.resize, self.flip, self.buffer = data_cfg.resize, data_cfg.flip, data_cfg.shuffle_buffer
        self.label_key, self.policy, self.num_classes = data_cfg.label_key, ReadPolicy.of(data_cfg), num_classes
        self.encoded = encoded
        self.epoch, self.start_step = 0, 0
        self.slots: BatchSlots | None = None  # set by the training process before its workers start

    def epoch_order(self, epoch: int) -> list[Shard]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def worker_plan(self, epoch: int, logical: int) -> tuple[list[Segment], int]:
        """(segments, batches) of logical worker ``logical``: rank batches logical, logical + W, ..."""
        W, B = self.workers, self.batch_size
        counts = [len(range(w, self.steps, W)) for w in range(W)]
        start = self.window_start + B * sum(counts[:logical])
        return plan_segments(self.epoch_order(epoch), start, counts[logical] * B), counts[logical]

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        # The DataLoader asks its workers in turn starting from worker 0, so worker 0 must hold
        # batch start_step: rotate the logical ids (which fix the data and the RNG) by start_step.
        logical = (wid + self.start_step) % self.workers
        try:
            yield from self._batches(self.epoch, logical, len(range(logical, self.start_step, self.workers)), wid)
        except DataError as e:  # handed over as one line, not as a worker traceback
            yield WorkerError(str(e))

    def _batches(self, epoch: int, logical: int, skip: int, worker: int = 0):
        segments, n_batches = self.worker_plan(epoch, logical)
        B = self.batch_size
        need, skip_samples = n_batches * B, skip * B
        shuffle_rng = np.random.default_rng([self.seed, epoch, self.dp_rank, logical, 1])
        aug_rng = np.random.default_rng([self.seed, epoch, self.dp_rank, logical, 2])
        skips = Skips()
        reported = 0
        if self.encoded:
            batch = EncodedBatch()
        else:
            batch = PixelBatch(B, self.image_size, self.resize, self.slots, worker)
        used = 0
        while used < need:
            # One pass over this worker's slice; later passes only make up for skipped samples.
            good = 0
            raw = (s for seg in segments for s in read_segment(seg, skips, self.policy))
            for key, members in shuffled(raw, self.buffer, shuffle_rng):
                u, v, f = aug_rng.random(3)  # drawn for every sample, so skipping keeps the stream
                try:
                    data, label = parse_sample(key, members, self.label_key, self.num_classes)
                    if used >= skip_samples:
                        batch.add(data, label, u, v, self.flip and f < 0.5)
                except CorruptImage as e:
                    skips(1, f"{key}: {e}")
                    continue
                used += 1
                good += 1
                if batch.fill == B:
                    yield batch.take(skips.count - reported)
                    reported = skips.count
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


def _num_classes(spec: str, data_cfg) -> int | None:
    """The class count of the shards' _info.json (labels outside it are skipped), if there is one."""
    info = dataset_info(spec, data_cfg.info)
    return info.num_classes if info is not None else None


def _next_item(pool: WorkerPool):
    item = next(pool)
    if isinstance(item, WorkerError):
        raise DataError(item.message)
    return item


# ------------------------------------------------------------------ training stream


class TrainLoader:
    """Training batches of one dp group; ``epoch(e, start_step)`` replays epoch e from any step.

    Every rank builds one (it checks the shards and knows steps_per_epoch); only tp rank 0 reads.
    """

    def __init__(self, data_cfg, dims, global_batch: int, image_size: int, seed: int):
        _check_sizes(data_cfg, image_size)
        self.cfg, self.dims = data_cfg, dims
        self.global_batch, self.image_size, self.seed = global_batch, image_size, seed
        self.batch_size = dims.per_dp_batch(global_batch)
        """This dp group's images a step (``global_batch`` split over dp)."""
        self.shards = resolve_shards(data_cfg.train_shards, "train", "data.train_shards", data_cfg.info)
        self.num_samples = sum(s.count for s in self.shards)
        samples = data_cfg.train_samples or self.num_samples
        self.steps_per_epoch = samples // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{samples} training samples cannot fill one step of train.batch_size={global_batch} (dp={dims.dp}): "
                "lower train.batch_size or add data"
            )
        self.workers = data_cfg.workers
        if self.workers > 0 and dims.tp_rank == 0:
            start_early(data_cfg.start_method)  # the loading rank's workers start faster on the first epoch
        self.decode_device = self._decode_device() if data_cfg.decode == "gpu" and dims.tp_rank == 0 else None
        if dims.tp_rank == 0 and self.decode_device is None:
            augment.prepare_workers()
        self.stream = _TrainStream(
            self.shards, seed=seed, dp_rank=dims.dp_rank, batch_size=self.batch_size, steps=self.steps_per_epoch,
            window_start=self.steps_per_epoch * dims.dp_batch_offset(global_batch),
            image_size=image_size, data_cfg=data_cfg, workers=max(1, self.workers),
            num_classes=_num_classes(data_cfg.train_shards, data_cfg), encoded=self.decode_device is not None,
        )

    def _decode_device(self) -> torch.device:
        """Where data.decode=gpu decodes: the training device, or this process's CPU (with a note why)."""
        device = self.dims.device
        reason = "the run has no CUDA device" if device.type != "cuda" else probe(device)
        if reason is None:
            return device
        if self.dims.is_main:
            print(f"data.decode=gpu: {reason}; decoding each batch with torchvision on the CPU of the "
                  "training process instead", file=sys.stderr, flush=True)
        return torch.device("cpu")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0, prefetch: bool = True) -> Iterator[Batch]:
        """Batches for steps start_step .. steps_per_epoch - 1 of ``epoch``; the same on every replay."""
        batches = self.start(epoch, start_step, prefetch)
        try:
            yield from batches
        finally:
            batches.close()

    def start(self, epoch: int, start_step: int = 0, prefetch: bool = True) -> EpochBatches:
        """Start the workers for ``epoch`` from ``start_step``; see ``EpochBatches``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside 0..{self.steps_per_epoch}")
        return EpochBatches(self, epoch, start_step, prefetch)

    def decoded(self, item: Pixels | Encoded) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(uint8 images, labels, new skips) of a worker's batch, decoding it here if it is Encoded."""
        if isinstance(item, Pixels):
            labels = torch.frombuffer(bytearray(item.labels), dtype=torch.int64)  # a copy of the message's bytes
            if item.images is not None:
                return item.images, labels, item.skipped
            return self.stream.slots.take(item.worker, item.slot, self.dims.device), labels, item.skipped
        return decode_batch(item, self.cfg.resize, self.image_size, self.decode_device)

    def slots_for_epoch(self) -> BatchSlots:
        """The workers' batch slots, made at the first epoch and kept (their pages stay mapped)."""
        if self.stream.slots is None:
            S = self.image_size
            self.stream.slots = BatchSlots(self.workers, PREFETCH_FACTOR + 1, (self.batch_size, 3, S, S), self.cfg.start_method)
        self.stream.slots.reset()
        return self.stream.slots


class EpochBatches:
    """One epoch's batches from ``start_step`` on: iterate for them, ``close`` on every way out.

    On the loading rank the workers start at once and the first batch is fetched in the
    background (``workers.WorkerPool``): ``ready(timeout)`` waits for it in slices, so the
    training loop can act on a stop during a long start-up. Other ranks are always ready. A batch
    fetched ahead but not handed over when the epoch is closed is dropped with the workers.
    """

    def __init__(self, loader: TrainLoader, epoch: int, start_step: int, prefetch: bool = True):
        self.loader, self.start_step, self._pool = loader, start_step, None
        self.prefetch = prefetch  # fetch the next batch before handing over this one (False: the plain iteration)
        if loader.dims.tp_rank == 0 and start_step < loader.steps_per_epoch:
            loader.stream.epoch, loader.stream.start_step = epoch, start_step
            if loader.workers > 0 and not loader.stream.encoded:
                loader.slots_for_epoch()
            self._pool = WorkerPool(loader.stream, loader.workers, loader.dims.device, loader.cfg.start_method)

    def ready(self, timeout: float = 0.0) -> bool:
        return self._pool is None or self._pool.ready(timeout)

    def __iter__(self) -> Iterator[Batch]:
        """The batches in step order; with ``prefetch``, batch i + 1 fetched and on its way to the device
        before batch i is handed over. Each batch's tp exchange is queued as it is handed over, on
        every rank at the same point of the step sequence, so an error in fetching a batch is kept
        and raised when that batch is asked for, as without prefetching (docs/training.md)."""
        loader, dims = self.loader, self.loader.dims
        B, S = loader.batch_size, loader.image_size
        side = SideStream(dims.device)
        staged: deque = deque()  # (images, meta) on their way to the device, or the error that fetching them raised
        left, skipped = loader.steps_per_epoch - self.start_step, 0  # batches not staged yet, samples skipped

        def stage() -> None:
            nonlocal left, skipped
            if left == 0:
                return
            left -= 1
            if self._pool is None:
                staged.append(None)  # a tp peer: its batch arrives in the exchange
                return
            try:
                with side.side():
                    images, labels, new_skips = loader.decoded(_next_item(self._pool))
                    skipped += new_skips
                    staged.append((host_to_device(images, dims.device), batch_meta(labels, skipped, dims.device)))
            except Exception as e:  # noqa: BLE001 - raised in its turn, when its batch is asked for
                staged.append(e)

        stage()
        while staged:
            item = staged.popleft()
            if isinstance(item, Exception):
                raise item
            with side.side():
                if item is None:
                    images = torch.empty((B, 3, S, S), dtype=torch.uint8, device=dims.device)
                    meta = torch.empty((B + 1,), dtype=torch.int64, device=dims.device)
                else:
                    images, meta = item
                if dims.tp > 1:
                    # tp rank 0 -> its tp peers: the pixels each rank's layout convolves; every label.
                    share_images(images, dims)
                    dist.broadcast(meta, src=dims.tp_src, group=dims.tp_group)
            side.hand_over(images, meta)
            if self.prefetch:
                stage()
            yield Batch(images=images, labels=meta[:-1], skipped=meta[-1])
            if not self.prefetch:
                stage()  # the plain iteration: the next batch only when it is asked for

    def close(self) -> None:
        """Make the workers exit now, wherever they are (they hold nothing to save)."""
        if self._pool is not None:
            self._pool.close()


# ------------------------------------------------------------------ validation stream


class _ValStream(IterableDataset):
    """This dp rank's validation samples, in stored order; worker w takes a contiguous run of batches."""

    def __init__(self, segments, *, num, batch_size, image_size, data_cfg, ten, workers, num_classes):
        super().__init__()
        self.segments, self.num, self.batch_size = segments, num, batch_size
        self.image_size, self.resize, self.ten, self.workers = image_size, data_cfg.resize, ten, workers
        self.label_key, self.policy, self.num_classes = data_cfg.label_key, ReadPolicy.of(data_cfg), num_classes

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        B = self.batch_size
        n_batches = -(-self.num // B)
        k0, k1 = n_batches * w // self.workers, n_batches * (w + 1) // self.workers
        lo, hi = k0 * B, min(k1 * B, self.num)
        skips, reported = Skips(), 0
        batch = EvalBatch(B, self.image_size, self.resize, self.ten)
        for seg in _slice_segments(self.segments, lo, hi):
            for key, members in read_segment(seg, skips, self.policy):
                try:
                    data, label = parse_sample(key, members, self.label_key, self.num_classes)
                    batch.add(data, label)
                except CorruptImage as e:
                    skips(1, f"{key}: {e}")
                    continue
                if batch.fill == B:
                    yield batch.take(skips.count - reported)
                    reported = skips.count
        if batch.fill or skips.count > reported:
            yield batch.take(skips.count - reported)


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
        self.shards = resolve_shards(data_cfg.val_shards, "val", "data.val_shards", data_cfg.info)
        self.total_samples = sum(s.count for s in self.shards)
        lo = self.total_samples * dims.dp_rank // dims.dp
        hi = self.total_samples * (dims.dp_rank + 1) // dims.dp
        self.num_samples = hi - lo
        """Samples this dp rank evaluates (before corrupt ones are skipped)."""
        self.segments = plan_segments(self.shards, lo, hi - lo)
        self.workers = min(data_cfg.workers, max(1, -(-self.num_samples // batch_size)))
        self.num_classes = _num_classes(data_cfg.val_shards, data_cfg)
        if dims.tp_rank == 0:
            augment.prepare_workers()

    def __iter__(self) -> Iterator[Batch]:
        pool = None
        if self.dims.tp_rank == 0:
            stream = _ValStream(
                self.segments, num=self.num_samples, batch_size=self.batch_size, image_size=self.image_size,
                data_cfg=self.cfg, ten=self.ten_crop, workers=max(1, self.workers), num_classes=self.num_classes,
            )
            pool = WorkerPool(stream, self.workers, self.dims.device, self.cfg.start_method)
        try:
            yield from self._batches(pool)
        finally:
            if pool is not None:
                pool.close()

    def _batches(self, source: WorkerPool | None) -> Iterator[Batch]:
        dims, S = self.dims, self.image_size
        crops = (10, 3, S, S) if self.ten_crop else (3, S, S)
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
            n = int(header[0])  # device sync: once per eval batch
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
            yield Batch(images=images, labels=labels, skipped=header[1])
