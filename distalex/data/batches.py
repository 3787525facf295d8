"""A batch's way from a loader worker to the training process.

Training batches are written by the workers straight into shared-memory slots that live as long as
the loader (``BatchSlots``), and the workers send only their labels and slot numbers; validation
batches go in fresh shared memory, as the DataLoader would send them. Both collect their crops
through the fast decoders of ``augment`` where they load (``augment.fast_crops``), else through
Pillow.
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from distalex.data import augment
from distalex.data.augment import centre_crop, centre_square, hwc_to_chw, ten_crop, train_crop
from distalex.data.info import DataError
from distalex.data.workers import loader_context

log = logging.getLogger("distalex.data")


class Skips:
    """Skipped-sample counter of one worker; reports each skip once as a warning."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, n: int, reason: str) -> None:
        self.count += n
        log.warning("skipped %d sample(s): %s", n, reason)


class Pixels(NamedTuple):
    """A training batch decoded and cropped by a worker: the images in ``BatchSlots`` row (worker, slot),
    or, when the stream runs in the training process itself (no workers), in ``images``."""

    images: torch.Tensor | None  # uint8 (B, 3, S, S)
    labels: bytes  # int64 (B,), raw: inside the message (the DataLoader passes tensors and arrays by shared memory)
    skipped: int  # samples skipped since the worker's previous batch
    worker: int = 0
    slot: int = -1


class WorkerError(NamedTuple):
    """Bad data found in a worker: the training process raises DataError(message)."""

    message: str


SLOT_WAIT_S = 300.0
"""How long a worker waits for one of its batch slots to be copied out before it gives up (a slot is
always free within a step; this only turns a bug into an error instead of a hang)."""


def shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 tensor in shared memory whose pages are touched only where it is written: made as
    torch's DataLoader makes its shared batches (``share_memory_`` would first copy the whole of it)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(math.prod(shape))).view(shape)


class BatchSlots:
    """Training batches in shared memory, written by the workers, copied out by the training process.

    A batch in fresh shared memory costs a page fault per 4 KiB page where the worker first writes
    it (about 120 us per 224 px image here, half of what decoding a 256 px JPEG costs), and another
    where the training process first reads it. These buffers are made once per loader and reused:
    a worker fills the first of its ``per_worker`` slots that is free, the training process copies
    a slot out as it receives the batch (into pinned memory when the batch goes to a GPU) and frees
    it. A worker holds at most the DataLoader's prefetch of undelivered batches plus the one it
    fills, so ``per_worker`` = prefetch + 1 never makes one wait for more than that copy; and when
    the training process keeps up, a worker cycles through one or two slots, whose pages a new
    worker process (one per epoch) maps once.
    """

    def __init__(self, workers: int, per_worker: int, batch_shape: tuple[int, ...], start_method: str = "auto"):
        self.images = shared_empty((workers, per_worker, *batch_shape))
        self.busy = torch.zeros((workers, per_worker), dtype=torch.uint8).share_memory_()  # 1: not copied out yet
        # Flags change hands under a lock: its release orders the copy out before the worker's next
        # writes, also where memory ordering is weak (ARM). Made in the workers' own context.
        self.lock = loader_context(start_method).Lock()

    def reset(self) -> None:
        """All slots free: at the start of an epoch, when no worker of the last one is left."""
        self.busy.zero_()

    def claim(self, worker: int) -> tuple[int, torch.Tensor]:
        """Worker side: (slot, its images) to fill, the first slot the training process has copied out."""
        deadline = time.monotonic() + SLOT_WAIT_S
        while True:
            with self.lock:
                busy = self.busy[worker].numpy()
                if not busy.all():
                    slot = int(busy.argmin())
                    busy[slot] = 1
                    return slot, self.images[worker, slot]
            if time.monotonic() > deadline:
                raise DataError(f"loader worker {worker}: no batch slot copied out within {SLOT_WAIT_S:g} s")
            time.sleep(0.0005)

    def take(self, worker: int, slot: int, device: torch.device) -> torch.Tensor:
        """Training-process side: a copy of the batch in that slot (pinned for a CUDA device); frees the slot."""
        images = self.images[worker, slot]
        images = images.pin_memory() if device.type == "cuda" else images.clone()
        with self.lock:
            self.busy[worker, slot].fill_(0)  # not ``= 0``: that makes a tensor of the 0 first
        return images


class PixelBatch:
    """Collects one training batch in a worker, each crop written into its row of the batch (a slot of
    ``slots`` in a worker process, else a tensor of its own)."""

    def __init__(self, size: int, image_size: int, resize: int, slots: BatchSlots | None, worker: int):
        self.size, self.resize, self.image_size = size, resize, image_size
        self.slots, self.worker, self.slot = slots, worker, -1
        self.fast = augment.fast_crops()
        self.images = None
        self.labels = np.empty(size, np.int64)
        self.fill = 0

    def add(self, data: bytes, label: int, u: float, v: float, flip: bool) -> None:
        if self.images is None:
            if self.slots is not None:
                self.slot, self.images = self.slots.claim(self.worker)
            else:
                self.images = torch.empty((self.size, 3, self.image_size, self.image_size), dtype=torch.uint8)
            self._rows = self.images.numpy()
        if self.fast:  # raises CorruptImage
            augment.decode_crop_into(self._rows[self.fill], data, self.resize, self.image_size, u, v, flip)
        else:
            self.images[self.fill].copy_(hwc_to_chw(train_crop(data, self.resize, self.image_size, u, v, flip)))
        self.labels[self.fill] = label
        self.fill += 1

    def take(self, skipped: int) -> Pixels:
        labels = self.labels.tobytes()
        if self.slots is None:
            out = Pixels(self.images, labels, skipped)
        else:
            out = Pixels(None, labels, skipped, self.worker, self.slot)
        self.images, self.fill = None, 0
        return out


class EvalBatch:
    """Collects one validation batch in a worker: the centre crop or the ten crops of each image."""

    def __init__(self, size: int, image_size: int, resize: int, ten: bool):
        self.size, self.resize, self.image_size = size, resize, image_size
        self.shape = (10, 3, image_size, image_size) if ten else (3, image_size, image_size)
        self.fast = augment.fast_crops()
        self.images = None
        self.labels: list[int] = []

    @property
    def fill(self) -> int:
        return len(self.labels)

    def add(self, data: bytes, label: int) -> None:
        if self.images is None:  # in a worker, in shared memory: sent to the training process as it is
            shape = (self.size, *self.shape)
            in_worker = get_worker_info() is not None
            self.images = shared_empty(shape) if in_worker else torch.empty(shape, dtype=torch.uint8)
            self._rows = self.images.numpy()
        row = self.fill
        if self.fast:  # raises CorruptImage
            augment.eval_crops_into(self._rows[row], data, self.resize, self.image_size)
        else:
            sq = centre_square(data, self.resize)
            S = self.image_size
            self.images[row].copy_(hwc_to_chw(ten_crop(sq, S) if len(self.shape) == 4 else centre_crop(sq, S)))
        self.labels.append(label)

    def take(self, skipped: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images, labels, skipped) of the samples added since the last take (maybe fewer than size)."""
        n = self.fill
        images = self.images[:n] if self.images is not None else torch.empty((0, *self.shape), dtype=torch.uint8)
        labels = torch.tensor(self.labels, dtype=torch.int64)
        self.images, self.labels = None, []
        return images, labels, skipped
