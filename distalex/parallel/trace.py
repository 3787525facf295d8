"""Record the collectives a piece of code makes (kind, group, tensors, phase and layer), and the
places it reads a tensor's value on the host (``HostReadSpy``: on a GPU each such read waits for
the device), and the tensors it makes from Python data (``PythonDataSpy``, at the dispatcher).

    with CollectiveSpy() as spy:
        label_layers(model, spy)          # optional: which module each call belongs to
        spy.phase = "fwd"; out = model(x)
        spy.phase = "bwd"; loss.backward()
    spy.calls  # [Call(kind, ranks, phase, layer, tensors=[(shape, dtype), ...]), ...]

It wraps the real torch.distributed functions, which still run: nothing is faked. Each wrapper
binds the function's own signature to find ``group`` (libraries such as DeepSpeed pass tensors by
keyword), and a call made inside a spied call (an old name forwarding to a new one) is recorded
once. DDP's built-in gradient hook calls C++ directly: register ``recording_allreduce_hook`` on the
DDP model to see the data-parallel reduction too. Used by the tests and by bench/comm_bytes.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

SPIED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
         "reduce_scatter_single", "all_gather", "broadcast", "reduce_scatter", "reduce", "barrier",
         "all_reduce_coalesced", "all_gather_object", "broadcast_object_list", "gather", "scatter",
         "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")
# One kind for the two names each flat-tensor collective has across torch releases.
KIND = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


@dataclass
class Call:
    kind: str
    ranks: tuple[int, ...]
    phase: str
    layer: str
    tensors: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    """Every tensor argument, in call order: (output, input) for the flat gather/reduce-scatter."""
    async_op: bool = False
    """Started without waiting (``async_op=True``): the caller waits on the returned work later."""
    group: object = field(default=None, repr=False, compare=False)
    """The process group itself (groups of the same ranks, e.g. tp and the world at dp=1, differ here)."""

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def full_bytes(self) -> int:
        """The size of the whole (un-split) tensor the collective is about: all-reduce and broadcast
        its one buffer, all-gather its output, reduce-scatter its input, scatter all n pieces;
        all-to-all: this rank's input (each rank has its own)."""
        sizes = [nbytes(s, d) for s, d in self.tensors]
        if self.kind == "scatter" and sizes:  # the output, then (on the root only) the n pieces
            return self.n * sizes[0]
        return max(sizes) if sizes else 0

    @property
    def sent_bytes(self) -> int:
        """Bytes each rank sends with a ring (bandwidth-optimal) algorithm, for n ranks and a full
        tensor of S bytes: all-reduce 2(n-1)/n S, all-gather and reduce-scatter (n-1)/n S,
        broadcast S from the root (its peers relay in a pipelined ring; with n=2 they send 0),
        scatter (n-1)/n S from the root (its peers send nothing), all-to-all (n-1)/n of this rank's
        input (exact for equal splits: it keeps 1/n)."""
        s, n = self.full_bytes, self.n
        if n <= 1:
            return 0
        if self.kind == "all_reduce":
            return 2 * (n - 1) * s // n
        if self.kind in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter",
                         "scatter", "all_to_all_single"):
            return (n - 1) * s // n
        return s  # broadcast and the rest: the root's share, an upper bound for the others


class CollectiveSpy:
    """Records every torch.distributed call made while installed (``with`` block, or install/uninstall)."""

    def __init__(self):
        self.calls: list[Call] = []
        self.phase, self.layer = "-", "-"
        self._saved: dict[str, object] = {}
        self._depth = 0

    def install(self) -> "CollectiveSpy":
        for name in SPIED:
            real = getattr(dist, name, None)
            if real is not None:
                self._saved[name] = real
                setattr(dist, name, self._wrap(KIND.get(name, name), real))
        return self

    def uninstall(self) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()

    __enter__ = install

    def __exit__(self, *exc):
        self.uninstall()

    def _wrap(self, kind, real):
        sig = inspect.signature(real)

        def spy(*args, **kwargs):
            if self._depth == 0:
                bound = sig.bind(*args, **kwargs).arguments
                group = bound.get("group") or dist.group.WORLD
                tensors = [t for a in bound.values() for t in _tensors(a)]
                ranks = tuple(dist.get_process_group_ranks(group))
                shapes = [(tuple(t.shape), t.dtype) for t in tensors]
                self.calls.append(Call(kind, ranks, self.phase, self.layer, shapes, bool(bound.get("async_op", False)), group))
            self._depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                self._depth -= 1

        return spy


def label_layers(model: torch.nn.Module, spy: CollectiveSpy) -> list:
    """Name the module a collective belongs to, forward and backward.

    Forward: a pre-hook, put first (before the hooks that gather an input), sets ``spy.layer``
    (and ``spy.phase = "fwd"``). Backward: a hook on the module's output gradient sets them
    (``"bwd"``) when autograd reaches the module;
    on a chain (AlexNet) the module's own backward, and the collectives of its autograd pairs, run
    next. Returns the handles (``h.remove()`` to undo).
    """
    handles = []
    for name, mod in model.named_modules():
        if not name or any(True for _ in mod.children()):
            continue  # leaves only

        def pre(_m, _args, name=name):
            spy.phase, spy.layer = "fwd", name

        def post(_m, _args, out, name=name):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda _g: (setattr(spy, "phase", "bwd"), setattr(spy, "layer", name)) and None)

        handles.append(mod.register_forward_pre_hook(pre, prepend=True))
        handles.append(mod.register_forward_hook(post))
    return handles


def recording_allreduce_hook(group, spy: CollectiveSpy, layer: str = "DDP gradient bucket"):
    """A DDP comm hook that averages each bucket over ``group`` with dist.all_reduce (what DDP's
    default hook does in C++), so the spy sees the data-parallel gradient reduction too."""

    def hook(state, bucket):
        spy.layer = layer
        buf = bucket.buffer().div_(dist.get_world_size(group))
        return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])

    return hook


@dataclass
class HostRead:
    kind: str  # the Tensor method: item, __bool__, __int__, __float__, __index__, tolist, numpy, cpu
    shape: tuple[int, ...]
    device: str
    where: str  # file:line of the first caller outside torch and this module


class HostReadSpy:
    """Records every read of a tensor's value into Python (``.item()``, ``int(t)``, ``bool(t)``,
    ``float(t)``, indexing with it, ``.tolist()``, ``.numpy()``) and every ``.cpu()`` while
    installed, with the line that made it.

    On a GPU each of these waits for the device to finish everything queued before it (a host
    sync); on the CPU they cost nothing, so a CPU test counts them instead. The real methods still
    run. Reads made inside torch itself are attributed to the line that called into torch;
    ``calls_from`` keeps those made under a folder or in a file.

        with HostReadSpy() as reads:
            train_step(...)
        assert reads.calls_from(distalex.__path__[0]) == []
    """

    METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu")

    def __init__(self):
        self.calls: list[HostRead] = []
        self._saved: dict[str, object] = {}

    def install(self) -> "HostReadSpy":
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real
            setattr(torch.Tensor, name, self._wrap(name, real))
        return self

    def uninstall(self) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._saved.clear()

    __enter__ = install

    def __exit__(self, *exc):
        self.uninstall()

    def calls_from(self, path: str) -> list[HostRead]:
        """The reads made by code in ``path`` (a file, or a folder and everything under it)."""
        return [c for c in self.calls if _made_in(c.where, path)]

    def reads_that_wait_from(self, path: str) -> list[HostRead]:
        """``calls_from(path)`` less the numpy views that ``distalex.cpu_loops`` takes of CPU tensors
        for its compiled loops: host memory already, in code that never runs for a device tensor,
        so on no device a wait."""
        from distalex import cpu_loops

        loops = {id(c) for c in self.calls_from(cpu_loops.__file__) if c.device == "cpu"}
        return [c for c in self.calls_from(path) if id(c) not in loops]

    def _wrap(self, kind, real):
        def spy(tensor, *args, **kwargs):
            self.calls.append(HostRead(kind, tuple(tensor.shape), str(tensor.device), _caller()))
            return real(tensor, *args, **kwargs)

        return spy


aten = torch.ops.aten


@dataclass
class Made:
    kind: str  # "from Python data", "host read" or "pageable copy"
    op: str  # the aten op, e.g. aten.lift_fresh.default
    shape: tuple[int, ...]
    device: str  # of the tensor made, or of the one read
    where: str  # file:line of the first caller outside torch and this module


class PythonDataSpy(TorchDispatchMode):
    """Records, at the dispatcher, the ops by which code hands Python values to tensors or reads them back:

    - **from Python data**: ``aten.lift_fresh`` (what ``torch.tensor``, ``torch.as_tensor`` and
      ``torch.from_numpy`` dispatch, on any device: the data is first a CPU tensor, and for a GPU
      copied from pageable memory, which waits) and ``aten.scalar_tensor``;
    - **host read**: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``)
      and a copy of a non-CPU tensor to the CPU (``.cpu()``, ``.to("cpu")``): each waits for the device;
    - **pageable copy**: a copy from unpinned CPU memory to a device, which waits for it too.

    A Python number passed to an op (``x * 0.5``, ``fill_(n)``) is an argument, not a tensor, and
    is not recorded; nor is ``torch.frombuffer``, a view of bytes already in host memory (as a
    worker's batch arrives), which dispatches nothing. What ``HostReadSpy`` sees and this does not: ``.tolist()`` and ``.numpy()``,
    which dispatch no op. Used as a context manager (the mode holds for this thread)::

        with PythonDataSpy() as made:
            train_step(...)
        assert made.calls_from(distalex.__path__[0]) == []
    """

    FROM_PYTHON = (aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.scalar_tensor.default)
    READS = (aten._local_scalar_dense.default,)

    def __init__(self):
        super().__init__()
        self.calls: list[Made] = []

    def calls_from(self, path: str) -> list[Made]:
        """The ones made by code in ``path`` (a file, or a folder and everything under it)."""
        return [c for c in self.calls if _made_in(c.where, path)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind, seen = self._kind(func, args, kwargs, out)
        if kind is not None:
            self.calls.append(Made(kind, str(func), tuple(seen.shape), str(seen.device), _caller()))
        return out

    def _kind(self, func, args, kwargs, out):
        if func in self.FROM_PYTHON:
            return "from Python data", out
        if func in self.READS:
            return "host read", args[0]
        copy_to = {aten._to_copy.default: lambda: kwargs.get("device"), aten.copy_.default: lambda: args[0].device}.get(func)
        if copy_to is None:
            return None, None
        src = args[1] if func is aten.copy_.default else args[0]
        dst = copy_to()
        if dst is None or torch.device(dst).type == src.device.type:
            return None, None
        if torch.device(dst).type == "cpu":
            return "host read", src
        if src.device.type == "cpu" and not src.is_pinned():
            return "pageable copy", src
        return None, None


def _made_in(where: str, path: str) -> bool:
    """Whether ``where`` (file:line) lies in ``path``: that file, or a folder above it."""
    return where.rsplit(":", 1)[0] == path or where.startswith(path.rstrip("/") + "/")


def _caller() -> str:
    """file:line of the innermost frame that is neither torch's nor this module's."""
    frame = inspect.currentframe()
    torch_dir = str(Path(torch.__file__).parent)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and not name.startswith(torch_dir):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"
