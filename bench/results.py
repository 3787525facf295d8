"""Small helpers shared by the benchmarks: where and on what a number was measured, and RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"


def git_commit() -> str:
    """Short commit of the tree, plus the changed files under bench/ and distalex/ if any."""
    from distalex.tracking.params import git_commit as commit_and_changes

    commit, changed = commit_and_changes(ROOT)
    if changed is None:
        return commit
    dirty = [f for f in changed if f.startswith(("bench/", "distalex/")) and f != "bench/RESULTS.md"]
    head = commit[:7]
    if not dirty:
        return head
    return f"{head} + uncommitted {', '.join(dirty[:4])}{' ...' if len(dirty) > 4 else ''}"


def machine() -> str:
    """e.g. '2-core CPU VM, no GPU' or '1 x NVIDIA H100 80GB HBM3, 16 CPU cores'."""
    import torch

    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}, {cores} CPU cores"
    return f"{cores}-core CPU {'VM' if _is_vm() else 'machine'}, no GPU"


def _is_vm() -> bool:
    try:
        return "hypervisor" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def provenance(argv: list[str] | None = None) -> dict[str, str]:
    import torch

    return {
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git_commit(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
    }


def write_section(title: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md, leaving the others as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
