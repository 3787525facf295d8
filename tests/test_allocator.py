"""distalex.allocator.keep_freed_memory: a step's large tensors stop costing page faults.

In a fresh process each (mallopt is process-wide): a 64 MiB tensor written, freed and made again
takes a page fault per 4 KiB page every time with glibc's defaults (it is mmapped and unmapped),
and none once freed memory is kept and the heap has settled (here within its first ten times; a
training step reaches that within its first steps: bench/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.runs import REPO

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from distalex.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    for _ in range(10):
        torch.ones(16 * 2**20)  # the heap grows to hold it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 * 2**20)  # 64 MiB, freed at once
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only (elsewhere keep_freed_memory returns False)")
def test_kept_memory_takes_no_page_faults():
    applied, kept = faults("keep")
    _, system = faults("system")
    pages = 10 * 64 * 2**20 // 4096
    assert applied == "True"
    assert system > pages // 2, system  # glibc's defaults: a fault per page, every time
    assert kept < pages // 100, kept
