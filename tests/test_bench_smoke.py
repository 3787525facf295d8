"""bench/bench.py --tiny, bench/learnability.py --tiny and bench/gpu_check.sh run end to end (smoke
tests: no timing thresholds)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
        "distalex/eager/fp32/channels_last", "torchvision/eager/fp32/channels_last", "distalex-nolrn/eager/fp32/channels_last",
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


@pytest.mark.slow
def test_learnability_tiny_runs_every_scale_and_init(tmp_path):
    out = tmp_path / "learnability.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learnability.py"), "--tiny", "--data", str(tmp_path / "data"),
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {(r["scale"], r["init"]): r for r in result["runs"]}
    assert sorted(runs) == sorted((s, i) for s in ("raw", "standardized") for i in ("paper", "caffe", "kaiming"))
    steps = result["settings"]["steps"]
    for key, r in runs.items():
        assert r["diverged_at"] is not None or len(r["losses"]) == steps, key
        assert [e["step"] for e in r["evals"]][-1:] in ([steps], []), key
        assert r["signal_at_init"] > 0 and r["optim"]["bias_lr_mult"] == 2 and r["optim"]["bias_decay_mult"] == 0
    # the paper's init hardly depends on the image at all, Kaiming's does; raw pixels give the paper's init more
    assert runs["raw", "paper"]["signal_at_init"] > 3 * runs["standardized", "paper"]["signal_at_init"]
    assert runs["standardized", "kaiming"]["signal_at_init"] > 100 * runs["standardized", "paper"]["signal_at_init"]
    assert "| input scale | init |" in proc.stdout and (tmp_path / "data" / "shards" / "_info.json").is_file()


@pytest.mark.slow
def test_data_bench_tiny_runs_every_pipeline_in_both_forms(tmp_path):
    """bench/data.py on a few photos: every pipeline ran an epoch over every image of both forms,
    the paper's form is the smaller, and --stages gives each stage's cost."""
    out = tmp_path / "data.json"
    script = str(ROOT / "bench" / "data.py")
    tiny = ["--images", "24", "--batch", "4", "--workers", "1", "--repeats", "1"]
    proc = subprocess.run([sys.executable, script, *tiny, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    pipelines = {"distalex", "webdataset", "imagefolder", "pillow", "torchvision"}
    assert {(r["form"], r["pipeline"]) for r in result["rows"]} == {(f, p) for f in ("originals", "paper") for p in pipelines}
    assert all(r["images"] == 24 and r["cpu_s"] > 0 for r in result["rows"])
    assert result["forms"]["paper"]["kib"] < result["forms"]["originals"]["kib"] / 2
    proc = subprocess.run([sys.executable, script, "--stages", "--forms", "paper", *tiny, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {r["stage"]: r["us_per_image"] for r in json.loads(out.read_text())["rows"]}
    assert len(stages) >= 8 and all(us > 0 for us in stages.values()), stages


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_without_cuda(tmp_path):
    """bench/gpu_check.sh on this machine: every stage runs; without CUDA each CUDA test skips with
    its reason, the benchmark runs its tiny CPU rows, the sync-debug step check skips with its
    reason and the overlap check runs its tiny form on two gloo ranks. Its files land in OUT_DIR."""
    out = tmp_path / "out"
    # The stages' limits fit a GPU lease; the tiny CPU forms on a busy 2-core machine get more room.
    limits = {f"GPU_CHECK_{stage}_LIMIT_S": "600" for stage in ("TEST", "BENCH", "DATA", "SYNC", "OVERLAP", "DECODE")}
    env = dict(os.environ, PYTHON=sys.executable, WHEELHOUSE=str(tmp_path / "no-wheels"), **limits)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.txt", "cuda-tests.log", "cuda-tests.xml",
                                                     "data.json", "data.txt", "decode.json", "decode.txt", "env.txt",
                                                     "gpu-check.log", "overlap.json", "overlap.txt", "sync-debug.json",
                                                     "sync-debug.txt"]
    log = (out / "gpu-check.log").read_text()
    assert "== done: exit status 0" in log and "requirements: already importable" in log
    bench = json.loads((out / "bench.json").read_text())
    if torch.cuda.is_available():
        return  # the rest describes a machine without CUDA
    assert "CUDA: not available" in (out / "env.txt").read_text()
    tests_log = (out / "cuda-tests.log").read_text()
    n_tests = len(re.findall(r"<testcase ", (out / "cuda-tests.xml").read_text()))
    assert n_tests >= 9 and f"{n_tests} skipped" in tests_log and "passed" not in tests_log
    assert tests_log.count("SKIPPED") >= 1 and "needs a CUDA GPU" in tests_log  # the reason is printed
    assert bench["config"]["tiny"] is True
    rows = ["distalex/eager/fp32", "torchvision/eager/fp32", "distalex-nolrn/eager/fp32"]
    rows += [f"{r}/channels_last" for r in rows]
    assert [r["name"] for r in bench["rows"]] == rows
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in bench["rows"])
    assert {q["against"] for q in bench["ratios"]} == set(rows[1:3] + rows[4:])
    # the input pipeline, set against the training step: CPU decode and data.decode=gpu, both forms
    data = json.loads((out / "data.json").read_text())
    assert data["feeds"]["step_images_per_s"] > 0
    assert set(data["feeds"]["loaders"]) == {f"{f}/{p}/local" for f in ("originals", "paper") for p in ("distalex", "distalex-gpu")}
    assert "cores to feed it" in (out / "data.txt").read_text()
    # the step checks' CPU form: the sync debug mode skips with its reason; the overlap runs on two gloo ranks
    sync = json.loads((out / "sync-debug.json").read_text())
    assert [r["name"] for r in sync["rows"]] == ["sync-debug/eager", "sync-debug/compiled"]
    assert all(r["status"].startswith("skipped: no CUDA") for r in sync["rows"])
    assert "skipped: no CUDA" in (out / "sync-debug.txt").read_text()
    overlap = {r["mode"]: r for r in json.loads((out / "overlap.json").read_text())["rows"]}
    assert list(overlap) == ["eager", "compiled", "compiled+overlap"]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in overlap.values())
    # the split at the gradient buckets is what the overlap row has and the plain compiled row has not
    assert (overlap["eager"]["pieces"], overlap["compiled"]["pieces"]) == (0, 1) and overlap["compiled+overlap"]["pieces"] >= 2
    # the training rank's batched decode (on this CPU) against the CPU loader, same shards, both forms
    decode = json.loads((out / "decode.json").read_text())
    assert "no CUDA" in decode["device"] and set(decode["forms"]) == {"originals", "paper"}
    for form in decode["forms"].values():
        assert form["device_decode"]["images"] == 32 and form["cpu_loader"]["images"] == 32
        assert form["device_decode"]["images_per_s"] > 0 and form["cpu_loader"]["images_per_s"] > 0


def test_gpu_check_usage_and_missing_requirements(tmp_path):
    """Bad usage, and a Python without the requirements and no wheels to install them from: exit 2
    with a message that says what to do."""
    script = str(ROOT / "bench" / "gpu_check.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh OUT_DIR" in proc.stderr
    # A Python that has torch and torchvision but, with -S and its own path, none of the rest.
    fake = tmp_path / "python"
    site = Path(torch.__file__).parents[1]
    only_torch = tmp_path / "only-torch"
    only_torch.mkdir()
    for name in ("torch", "torchvision", "torchgen", "functorch", "typing_extensions.py", "sympy", "mpmath", "filelock",
                 "fsspec", "jinja2", "markupsafe", "networkx", "numpy", "PIL", "numpy.libs", "pillow.libs"):
        if (site / name).exists():
            (only_torch / name).symlink_to(site / name)
    fake.write_text(f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{only_torch}" exec "{sys.executable}" -S "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), WHEELHOUSE=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", script, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "requirements missing and no" in proc.stdout and "bench/make_wheelhouse.sh" in proc.stdout
