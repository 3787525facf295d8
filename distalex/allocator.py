"""The host allocator for CPU training: keep freed memory instead of returning it to the system.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block above 32 MiB (and
smaller ones, once its heap top is trimmed) with fresh ``mmap`` pages and unmaps them when the
tensor is freed, so a training step that allocates the same large tensors every step (fc6's
weight gradient and the SGD update's temporaries: 151 MB each for the paper's net, the conv maps
and their gradients) takes a page fault, and zeroes a page, for every 4 KiB of them, every step:
~110,000 faults per step of the paper's net at batch 16 on the CPU, about 30% of the step's CPU
time (docs/benchmarks.md). With mmap off for malloc and the heap never trimmed, freed blocks are
reused and the faults stop after the first step; the price is that the process keeps its peak
heap, which a training step reaches every step anyway. This is what jemalloc or tcmalloc (which
PyTorch's CPU performance guide recommends preloading) do by default; here with glibc's own knobs.

Only the process that calls it changes; the numbers computed do not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and keep freed memory. Returns
    whether it applied (False where the C library is not glibc: macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
