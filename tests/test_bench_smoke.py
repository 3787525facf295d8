"""bench/bench.py --tiny runs end to end and writes every row (a smoke test: no timing thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    expected = [
        "distalex/eager/fp32", "distalex/compiled/fp32", "torchvision/eager/fp32", "torchvision/compiled/fp32",
        "distalex-nolrn/eager/fp32", "distalex-nolrn/compiled/fp32", "data/decode+crop+flip/1proc",
    ]
    if torch.cuda.is_available():
        expected += ["distalex/eager/bf16/channels_last", "torchvision/compiled/bf16/channels_last"]
    if not torch.cuda.is_available() or torch.cuda.device_count() >= 2:
        expected += ["distalex-tp2/eager/fp32", "distalex-tp2-hybrid/eager/fp32"]  # 2 CPU ranks, or 2 GPUs
    for name in expected:
        assert name in rows, f"{name} missing; rows: {sorted(rows)}"
        assert rows[name]["status"] == "ok", (name, rows[name]["status"])
        assert rows[name]["images_per_s"] > 0, name
        assert rows[name]["peak_mem_bytes"] > 0, name
    assert any(n.startswith("data/TrainLoader/") and r["status"] == "ok" and r["images_per_s"] > 0 for n, r in rows.items())
    # Rows that may not run here say why instead of vanishing.
    assert all(r["status"] == "ok" or r["status"].startswith(("skipped", "unsupported")) for r in rows.values())
    assert result["config"]["tiny"] is True and result["provenance"]["commit"]
