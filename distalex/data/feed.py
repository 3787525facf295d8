"""Where a training batch goes to the device while the step before it computes.

The loading rank copies batch i + 1 to the device (and a tp peer receives its share of batch i) on a
CUDA side stream, so the copy runs beside the step's kernels instead of in line before them. The
stream ordering: the side stream waits on nothing (a new batch depends on no step); before the step
uses a batch, the consumer (current) stream waits for everything queued on the side stream so far,
which is that batch's copy and exchange and nothing later (the next batch is queued after the hand
over); the batch's tensors, allocated on the side stream, are marked as used on the consumer stream
(``record_stream``), so that the caching allocator does not hand their memory to a side-stream
allocation while the step still reads them. Pinned host memory is safe as it is: torch's caching
host allocator keeps a pinned block until the copy queued from it is done.

On any other device there is no stream: the same code runs in order (``side()`` is a no-op).
"""

from __future__ import annotations

import contextlib

import torch


class SideStream:
    """The stream batches travel on to ``device`` (none on a CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def side(self):
        """Context in which copies and collectives for a batch are queued on the side stream."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def hand_over(self, *tensors: torch.Tensor) -> None:
        """The consumer stream waits for all work queued on the side stream so far; ``tensors``
        (allocated on the side stream) are kept until the consumer stream's work on them is done."""
        if self.stream is None:
            return
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.stream)
        for t in tensors:
            if t.device.type == "cuda":
                t.record_stream(consumer)


def batch_meta(labels: torch.Tensor, skipped: int, device: torch.device) -> torch.Tensor:
    """int64 (B + 1,) on ``device``: the CPU ``labels``, then the skipped count. Made in pinned host
    memory for a GPU and copied without waiting; no tensor is made from a Python value."""
    meta = torch.empty(len(labels) + 1, dtype=torch.int64, pin_memory=device.type == "cuda")
    meta[:-1].copy_(labels)
    meta[-1].fill_(skipped)
    return meta.to(device, non_blocking=True)
