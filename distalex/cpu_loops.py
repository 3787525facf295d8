"""Compiled loops over the samples of a CPU tensor: what the LRN (``distalex.lrn``) runs on the CPU.

Written as tensor ops, an elementwise chain is one pass over memory per op, and on the CPU those
passes, not the arithmetic, are the cost. A loop compiled by numba does the chain in one pass per
sample, with that sample's intermediates in cache. ``jit`` compiles such a loop (released GIL,
compiled once per machine into numba's cache); ``over_samples`` runs it over contiguous chunks of
the batch, one per torch thread, so that it uses the cores torch was given.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

try:
    import numba
except ImportError:  # a platform without numba wheels: callers keep their tensor-op path
    numba = None

AVAILABLE = numba is not None

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def jit(fn):
    """``fn`` compiled for the CPU, callable from several threads at once. Multiply-adds may be
    fused (``contract``). Not ``arcp``: a division turned into a refined reciprocal gives 0 * inf =
    NaN where the divisor is infinite, where IEEE division (and PyTorch) gives 0. numba's cache is
    keyed by the loop's own source file, not by these options: after changing them, delete the
    ``*.nbi``/``*.nbc`` files under ``distalex/__pycache__``."""
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})(fn)


def usable(t: Tensor) -> bool:
    """Whether ``over_samples`` may run on ``t``: float32 on the CPU, outside torch.compile's tracing."""
    return AVAILABLE and t.device.type == "cpu" and t.dtype == torch.float32 and not torch.compiler.is_compiling()


def over_samples(loop, n: int, tensors: tuple[Tensor, ...], *args) -> None:
    """``loop(*arrays, start, stop, *args)`` over samples [0, n) of C-contiguous CPU tensors, in as
    many contiguous chunks as torch has threads."""
    arrays = [t.detach().numpy() for t in tensors]
    chunks = min(n, torch.get_num_threads())
    if chunks <= 1:
        loop(*arrays, 0, n, *args)
        return
    bounds = [n * i // chunks for i in range(chunks + 1)]
    futures = [_threads(chunks).submit(loop, *arrays, lo, hi, *args) for lo, hi in zip(bounds, bounds[1:])]
    for f in futures:
        f.result()


def _threads(count: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < count:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its idle threads end; a larger pool replaces it
            _pool = ThreadPoolExecutor(count, thread_name_prefix="distalex-cpu")
        return _pool


def _forget_threads_in_child() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads_in_child)
