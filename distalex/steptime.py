"""Where each rank's training time goes: waiting for its batch, and its own compute.

In a synchronous job every rank's step takes as long as the slowest one's, so the step time alone
names no culprit. Each rank therefore measures, per step:

- **data**: the time from asking the loader for the batch to having it on this rank, on the host
  clock: the time the host is blocked in the feed, whatever the device does. The loading rank
  fetches one batch ahead (``data.loader.EpochBatches``), so its wait is for the next batch from
  its workers; a tp peer's is for the batch's exchange;
- **compute**: from having the batch to the end of this rank's own backward (the first layer's
  weight gradient is the last one the backward makes), before it waits for the other dp groups'
  gradients: its own forward and backward with its tp group's exchanges, the work that a slow GPU
  or a busy host makes longer. On the CPU the host clock (``time.perf_counter``) at a gradient hook;
  on CUDA a pair of events, read at the log points, which synchronise already: nothing here adds a
  host sync to the step.

``StepTimes.window`` returns this rank's sums since the last call (at each log point; its wall time
runs from the window's first fetch, so validation and checkpoints between epochs are not in it);
``gather`` brings every rank's to rank 0 over the control group (host-side gloo, at log points
only), which logs ``perf/*`` metrics, shows ``data N%`` in the progress line and, at each epoch's
end, names a rank whose data wait or compute is clearly above the median rank's (``stragglers``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

SLOWER_BY = 1.25
"""A rank is named when its compute (or data wait) per step exceeds the median rank's by this factor..."""
SLOWER_SHARE = 0.05
"""...and by at least this share of the epoch's wall time (a few ms of noise on a fast step is no straggler)."""


@dataclass
class Times:
    """Seconds summed over ``steps`` steps of one rank."""

    data: float = 0.0
    compute: float = 0.0
    wall: float = 0.0
    steps: int = 0

    def __add__(self, other: Times) -> Times:
        return Times(self.data + other.data, self.compute + other.compute, self.wall + other.wall,
                     self.steps + other.steps)

    @property
    def data_percent(self) -> float:
        return 100.0 * self.data / self.wall if self.wall > 0 else 0.0


class StepTimes:
    """This rank's data wait and compute per step; ``fetch`` the batch through it."""

    def __init__(self, module: nn.Module, device: torch.device):
        self._cuda = device.type == "cuda"
        self._data = 0.0
        self._compute = 0.0
        self._steps = 0
        self._started: float | torch.cuda.Event | None = None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._window_start: float | None = None  # the first fetch since the last window (validation is not in it)
        self.epoch = Times()
        last = last_gradient(module)
        self._hook = last.register_post_accumulate_grad_hook(self._backward_done)

    def fetch(self, batches):
        """The next batch of the iterator ``batches`` (StopIteration at its end), timed."""
        t0 = time.perf_counter()
        if self._window_start is None:
            self._window_start = t0
        batch = next(batches)
        now = time.perf_counter()
        self._data += now - t0
        self._steps += 1
        if self._cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = now
        return batch

    def _backward_done(self, _param: torch.Tensor) -> None:
        started, self._started = self._started, None
        if started is None:  # a backward outside a fetched step (none in training)
            return
        if self._cuda:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
            self._events.append((started, done))
        else:
            self._compute += time.perf_counter() - started

    def window(self) -> Times:
        """This rank's sums since the last call; call where the device is synchronised (a log point)."""
        now = time.perf_counter()
        compute = self._compute + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        wall = now - self._window_start if self._window_start is not None else 0.0
        times = Times(self._data, compute, wall, self._steps)
        self._data = self._compute = 0.0
        self._steps = 0
        self._events.clear()
        self._window_start = None
        self.epoch = self.epoch + times
        return times

    def end_epoch(self) -> Times:
        """This rank's sums over the epoch (since the last call)."""
        times, self.epoch = self.epoch, Times()
        return times

    def close(self) -> None:
        self._hook.remove()


def last_gradient(module: nn.Module) -> nn.Parameter:
    """The parameter whose gradient the backward makes last: the first layer's weight (conv1)."""
    return next(p for p in module.parameters() if p.requires_grad)


def host_names(dims) -> list[str] | None:
    """On rank 0, every rank's host (``where_am_i``: the node and host name); None elsewhere."""
    from distalex.parallel.liveness import where_am_i

    if not dims.distributed:
        return [where_am_i()]
    names = [None] * dims.world_size if dims.is_main else None
    dist.gather_object(where_am_i(), names, dst=0, group=dims.control_group)
    return names


def gather(times: Times, dims) -> list[Times] | None:
    """Every rank's ``times`` on rank 0 (None elsewhere); host-side, over the control group."""
    mine = torch.tensor([times.data, times.compute, times.wall, float(times.steps)], dtype=torch.float64)
    if not dims.distributed:
        return [times]
    parts = [torch.empty_like(mine) for _ in range(dims.world_size)] if dims.is_main else None
    dist.gather(mine, parts, dst=0, group=dims.control_group)
    if not dims.is_main:
        return None
    return [Times(float(d), float(c), float(w), int(s)) for d, c, w, s in (p.tolist() for p in parts)]


def stragglers(per_rank: list[Times]) -> list[tuple[int, str, float, float]]:
    """(rank, "compute" or "data wait", its seconds per step, the median's) for each rank clearly
    slower than the median rank in that respect (``SLOWER_BY`` and ``SLOWER_SHARE``)."""
    ranked = [(r, t) for r, t in enumerate(per_rank) if t.steps > 0]
    if len(ranked) < 2:
        return []
    wall = statistics.median(t.wall for _, t in ranked)
    found = []
    for what, of in (("compute", lambda t: t.compute), ("data wait", lambda t: t.data)):
        median = statistics.median(of(t) for _, t in ranked)
        for rank, t in ranked:
            if of(t) > SLOWER_BY * median and of(t) - median > SLOWER_SHARE * wall:
                found.append((rank, what, of(t) / t.steps, median / t.steps))
    return found


def median_compute(per_rank: list[Times]) -> float:
    """The median rank's compute per step, in seconds."""
    per_step = sorted(t.compute / t.steps for t in per_rank if t.steps)
    return per_step[len(per_step) // 2] if per_step else 0.0


def epoch_report(per_rank: list[Times], hosts: list[str], epoch: int) -> tuple[dict[str, float], list[str]]:
    """(metrics, warning lines) of an epoch: each host's data wait and compute per step (the worst
    of its ranks), and a line for each rank clearly slower than the median rank (``stragglers``)."""
    from distalex.tracking.metrics import host_metric

    by_host: dict[str, list[Times]] = {}
    for rank, t in enumerate(per_rank):
        by_host.setdefault(hosts[rank], []).append(t)
    metrics = {}
    for host, times in by_host.items():
        metrics[host_metric(host, "data_wait_percent")] = max(t.data_percent for t in times)
        metrics[host_metric(host, "compute_ms")] = 1000 * max(t.compute / max(t.steps, 1) for t in times)
    lines = [f"warning: epoch {epoch}: rank {rank} ({hosts[rank]}) is slower than the median rank: {what} "
             f"{1000 * slow:.0f} ms a step against {1000 * median:.0f} ms (perf/ metrics in the MLflow run)"
             for rank, what, slow, median in stragglers(per_rank)]
    return metrics, lines
