"""Ranks and process groups: one object, built once, handed to every builder.

world = dp x tp and rank = dp_rank * tp + tp_rank, so the ranks of one tensor-parallel group are
adjacent (one node under torchrun). Every rank creates every group in the same order, each with
``parallel.timeout_s`` (``new_group`` takes a timeout on every torch the project admits; groups made
without one, as by ``init_device_mesh``, get the backend's default: 30 minutes for gloo).
"""

from __future__ import annotations

import datetime
import os
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distalex.config import towers_per_rank
from distalex.parallel.liveness import Liveness, Progress
from distalex.parallel.store import world_store


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; raised before any collective is called."""


@dataclass(frozen=True)
class Launch:
    """What the launcher (torchrun, srun + torchrun, or nothing) told this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_launch_env(environ: dict | None = None) -> Launch:
    """The one place that reads rank and world size from the environment (torchrun's variables)."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ParallelConfigError(f"bad launcher environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ParallelConfigError(f"bad launcher environment: RANK={rank} WORLD_SIZE={world_size}")
    if world_size > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise ParallelConfigError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: start with torchrun"
        )
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank)


LAYOUTS = ("towers", "hybrid")


def sample_counts(batch: int, n: int) -> list[int]:
    """Samples of a batch each of n ranks takes: contiguous, in rank order, the first batch % n
    ranks one more (``torch.tensor_split``'s sizes)."""
    q, extra = batch // n, batch % n  # not divmod: torch.compile cannot trace it
    return [q + (i < extra) for i in range(n)]


def check_layout(world_size: int, tp: int, towers: int, layout: str = "towers") -> int:
    """Validate the (dp, tp) layout and return dp. Errors name the numbers that disagree."""
    if tp < 1:
        raise ParallelConfigError(f"parallel.tp must be >= 1, got {tp}")
    if towers < 1:
        raise ParallelConfigError(f"model.towers must be >= 1, got {towers}")
    if layout not in LAYOUTS:
        raise ParallelConfigError(f"parallel.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "towers":  # hybrid splits the fc layers' units, not towers
        try:
            towers_per_rank(towers, tp)
        except ValueError as e:
            raise ParallelConfigError(str(e)) from None
    if world_size % tp != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by parallel.tp={tp}: "
            f"start a multiple of {tp} processes (e.g. torchrun --nproc_per_node={tp})"
        )
    return world_size // tp


@dataclass
class ParallelDims:
    """The (dp, tp) layout of this job and this process's place in it.

    With one process (no launcher) every group is ``None`` and every collective returns early.
    """

    dp: int = 1
    tp: int = 1
    layout: str = "towers"  # parallel.layout: how the tp group splits the net (parallel/plan.py)
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object | None = None  # this rank's tensor-parallel group (tp adjacent ranks)
    dp_group: object | None = None  # this rank's data-parallel group (same tp rank in every dp group)
    control_group: object | None = None  # gloo over the world: small host-side agreements, no device sync
    liveness: Liveness | None = None  # heartbeats and the job's failure record (parallel.peer_timeout_s)
    progress: Progress = field(default_factory=Progress)  # the training loop's steps, watched by liveness

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that logs, prints and writes run-level files."""
        return self.rank == 0

    @property
    def tp_src(self) -> int:
        """Global rank of tp rank 0 in this process's tensor-parallel group (the data loader)."""
        return self.dp_rank * self.tp

    def dp_batches(self, global_batch: int) -> list[int]:
        """Every dp group's images of a global batch of ``global_batch`` (``train.batch_size``), in dp
        rank order: as even as it gets, the first ``global_batch % dp`` groups one more (``sample_counts``).
        The one place the batch is split over dp; tp peers share their group's images."""
        if global_batch < self.dp:
            raise ParallelConfigError(
                f"train.batch_size={global_batch} is smaller than dp={self.dp}: every dp group needs at least one image a step"
            )
        return sample_counts(global_batch, self.dp)

    def per_dp_batch(self, global_batch: int) -> int:
        """This dp group's images of each global batch."""
        return self.dp_batches(global_batch)[self.dp_rank]

    def dp_batch_offset(self, global_batch: int) -> int:
        """Images of each global batch that go to the dp groups before this one (lower dp ranks)."""
        return sum(self.dp_batches(global_batch)[: self.dp_rank])

    def loss_weight(self, global_batch: int) -> float:
        """What this dp group's mean loss is multiplied by so that the step is the serial step on the
        global batch: dp * b / B for b of B images. DDP and ZeRO average the groups' gradients (sum / dp),
        and the serial gradient of the mean over B images is sum_g (b_g / B) * grad(mean_g); so group g
        must contribute dp * b_g / B times its mean's gradient. The weighted losses' mean over dp is the
        global batch's mean loss, which is what the training loop logs. 1.0 exactly when dp divides B."""
        return self.dp * self.per_dp_batch(global_batch) / global_batch

    def describe_batch(self, global_batch: int) -> str:
        """``128 images, per dp rank 43 or 42``: the global batch and its split (for the start line)."""
        sizes = sorted(set(self.dp_batches(global_batch)), reverse=True)
        return f"{global_batch} images, per dp rank {' or '.join(map(str, sizes))}"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control_group)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (a host-side all-reduce; no device sync)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(t.item())

    def broadcast_object(self, value):
        """Rank 0's ``value`` on every rank (host-side, over the control group)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def all_objects(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank (host-side, over the control group)."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.control_group)
        return values

    def first_of(self, value):
        """On every rank: the lowest rank's ``value`` that is not None, or None (host-side). Lets all
        ranks act on one rank's error together instead of leaving the others in a collective."""
        return next((v for v in self.all_objects(value) if v is not None), None)

    def describe(self) -> str:
        layout = f" layout={self.layout}" if self.tp > 1 else ""
        return f"world={self.world_size} (dp={self.dp} x tp={self.tp}){layout} backend={backend_for(self.device)}"


GPU_IMAGES_FLOOR = 32
"""Images' work per GPU per step below which less than half of an AlexNet step on an H100 is the
images' own compute: the rest is fixed per step (1-2 ms of kernel launches, 0.4 ms of SGD update)
against 12-25 us an image. An estimate, derived in docs/training.md ("Batch size and scale")."""


def small_batch_warning(global_batch: int, dp: int, tp: int, device_type: str) -> str | None:
    """The warning for a layout that leaves each GPU less than ``GPU_IMAGES_FLOOR`` images' work a
    step (the smallest dp group's batch over tp: a tp peer holds 1/tp of the net under the towers
    layout and convolves 1/tp of the images under hybrid), or None. Only GPUs: a CPU is busy at any batch."""
    if device_type != "cuda":
        return None
    smallest = min(sample_counts(global_batch, dp))
    per_gpu = smallest / tp
    if per_gpu >= GPU_IMAGES_FLOOR:
        return None
    return (
        f"train.batch_size={global_batch} over dp={dp} x tp={tp} leaves a GPU {per_gpu:g} images' work a step "
        f"(the smallest dp group's {smallest} over tp={tp}); below {GPU_IMAGES_FLOOR}, less than half of an AlexNet "
        "step on a GPU is the images' own work, the rest fixed cost (kernel launches, the SGD update, the gradient "
        "all-reduce): raise train.batch_size (and optim.lr with it), start fewer GPUs, or cut the launches with "
        "train.compile=true (docs/training.md, \"Batch size and scale\")"
    )


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def pick_device(local_rank: int, requested: str = "auto") -> torch.device:
    """``auto``: this rank's GPU when CUDA is present, else the CPU. On CUDA, local rank r takes GPU r:
    more local ranks than GPUs is an error (two ranks on one GPU share its memory, and NCCL fails
    later and far from the cause)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ParallelConfigError("device 'cuda' was asked for but CUDA is not available")
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            visible = "CUDA_VISIBLE_DEVICES unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible}"
            raise ParallelConfigError(
                f"LOCAL_RANK={local_rank} but this node shows {gpus} GPU(s) ({visible}): "
                f"start at most {gpus} processes per node (torchrun --nproc_per_node={gpus}), one per GPU"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested != "cpu":
        raise ParallelConfigError(f"device must be auto, cuda or cpu, got {requested!r}")
    return torch.device("cpu")


def init_parallel(tp: int, towers: int, device: str = "auto", timeout_s: float = 600.0,
                  layout: str = "towers", peer_timeout_s: float | None = None,
                  progress_timeout_s: float | None = None) -> ParallelDims:
    """Read the launcher's environment, check the layout, and build the dp x tp groups.

    All checks run before the first collective, so a bad layout fails on every rank with the same
    message instead of hanging. ``timeout_s`` bounds every collective of every group;
    ``peer_timeout_s`` (the training and evaluation CLIs pass it) starts ``Liveness``, which with
    ``progress_timeout_s`` (the training CLI's) also watches ``dims.progress`` for a stall.
    """
    launch = read_launch_env()
    dp = check_layout(launch.world_size, tp, towers, layout)
    dev = pick_device(launch.local_rank, device)
    if not launch.distributed:
        return ParallelDims(dp=1, tp=1, layout=layout, rank=0, local_rank=0, device=dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = backend_for(dev)
    store_at = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if not dist.is_initialized():
        store, *store_at = world_store(launch.rank, launch.world_size, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None,
                                store=store, rank=launch.rank if store else -1, world_size=launch.world_size if store else -1)
    tp_group = dp_group = None
    for d in range(dp):  # rank = dp_rank * tp + tp_rank
        ranks = list(range(d * tp, (d + 1) * tp))
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        tp_group = group if launch.rank in ranks else tp_group
    for t in range(tp):
        ranks = list(range(t, dp * tp, tp))
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        dp_group = group if launch.rank in ranks else dp_group
    # Its own gloo group, also on CPU: at dp=1 the tp group spans the world, and the stop agreement
    # should not queue behind (or between) the model's collectives.
    control = dist.new_group(timeout=timeout, backend="gloo")
    dims = ParallelDims(dp=dp, tp=tp, layout=layout, rank=launch.rank, local_rank=launch.local_rank, device=dev,
                        tp_group=tp_group, dp_group=dp_group, control_group=control)
    if peer_timeout_s is not None:
        token = [uuid.uuid4().hex if dims.is_main else None]  # one key space per world (restarts included)
        dist.broadcast_object_list(token, src=0, group=control)
        groups = (dist.group.WORLD, tp_group, dp_group, control)
        dims.liveness = Liveness.start(dims.rank, dims.world_size, peer_timeout_s, token[0], tuple(store_at),
                                       dims.progress, progress_timeout_s, groups)
    return dims


def destroy_parallel(dims: ParallelDims | None = None) -> None:
    """Tear the process groups down after a normal end. With ``dims``, every rank first waits for
    the others (one host-side all-reduce): a rank whose peers have already closed their connections
    can abort inside gloo (SIGABRT) instead of exiting with its own status, which then goes
    unreported. After a failure call nothing here: the peers are ending on the failure record and
    will not join the all-reduce."""
    if not dist.is_initialized():
        return
    if dims is not None and dims.liveness is not None:
        dims.liveness.leave()
    if dims is not None and dims.distributed:
        try:
            dims.any_rank(False)
        except Exception:  # noqa: BLE001 - a peer is gone already; tear down and exit as planned
            pass
    dist.destroy_process_group()
