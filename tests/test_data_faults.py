"""No failure hangs: an exception in a loader worker or in the training step ends the process (and a
torchrun job) within seconds, with a non-zero status and no loader worker left behind; a loading
process killed outright (SIGKILL) leaves no process behind either. Under each start method.

The loader workers ignore SIGTERM (so that torchrun's or SLURM's SIGTERM cannot kill them while
the training process saves a checkpoint); before the fix, Python's exit handler then waited on
them forever after any unhandled exception. The faults are injected by a ``sitecustomize`` module
on PYTHONPATH, which every Python process of the run imports at its start (the training process,
a fork server, a spawned worker; a forked worker inherits the patch); the code under test carries
no test hook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.runs import REPO, run_env, tiny_overrides, tiny_shards, torchrun_cmd  # noqa: F401 - fixture
from tests.test_data_loader import write_shards
from tests.test_data_workers import START_METHODS, started_by

LIMIT_S = 30

INJECT = textwrap.dedent('''
    import os, sys, time

    FAULT, STAMP = os.environ["FAULT"], os.environ["FAULT_STAMP"]

    def stamp(what):
        # the time, and the loader workers alive at the fault (the children of the process that
        # owns them: this one, or this worker's parent): a fast run can start and end them between
        # two polls of the watching test
        import json, psutil
        owner = psutil.Process().parent() if FAULT == "worker" else psutil.Process()
        children = {c.pid: c.create_time() for c in owner.children(recursive=True)}
        with open(STAMP, "w") as f:
            json.dump({"time": time.time(), "children": children}, f)
        raise RuntimeError(f"fault injected in {what}")

    if FAULT == "worker":  # the 20th sample a worker parses
        import distalex.data.loader as loader

        real_parse, calls = loader.parse_sample, [0]

        def parse_sample(*args, **kw):
            calls[0] += 1
            if calls[0] == 20:
                stamp("a loader worker")
            return real_parse(*args, **kw)

        loader.parse_sample = parse_sample
    else:  # the training step of step 3 on rank 0 (the rank whose process owns the loader workers)
        # patched where it is defined, before distalex.train imports it by name (python -m runs that
        # module's code as __main__, a module object of its own)
        import distalex.data.augment as augment

        real_normalize, steps = augment.normalize, [0]

        def normalize(*args, **kw):
            steps[0] += 1
            if steps[0] == 3 and os.environ.get("RANK", "0") == "0":
                stamp("the training step")
            return real_normalize(*args, **kw)

        augment.normalize = normalize
''')


def watch(proc: subprocess.Popen, timeout: float) -> dict[int, float]:
    """Every descendant seen while ``proc`` runs: pid -> create time (to tell a reused pid apart)."""
    seen: dict[int, float] = {}
    deadline = time.time() + timeout
    parent = psutil.Process(proc.pid)
    while proc.poll() is None and time.time() < deadline:
        try:
            for child in parent.children(recursive=True):
                seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    return seen


def survivors(seen: dict[int, float], grace: float = 10.0) -> list[str]:
    """Those of ``seen`` still running ``grace`` seconds on: processes that die with the one that
    started them (a fork server, a resource tracker) end just after it."""
    procs = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def inject(folder: Path, fault: str, stamp: Path) -> dict[str, str]:
    """The environment that loads INJECT into every Python process started with it."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(INJECT)
    return dict(FAULT=fault, FAULT_STAMP=str(stamp), PYTHONPATH=f"{folder}{os.pathsep}{REPO}")


def run_until_exit(cmd: list[str], env: dict, cwd: Path, timeout: float):
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = watch(proc, timeout)
    if proc.poll() is None:
        for p in [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s (hang)\n{err[-4000:]}")
    out, err = proc.communicate()
    return proc.returncode, time.time(), out, err, seen


def assert_ended_promptly(rc, ended, err, seen, stamp: Path, what: str, expect_workers: int):
    assert stamp.is_file(), f"the fault was never injected\n{err[-4000:]}"
    fault = json.loads(stamp.read_text())
    took = ended - fault["time"]
    seen = {**seen, **{int(pid): created for pid, created in fault["children"].items()}}
    assert rc != 0, f"{what}: exit status 0 after a fault"
    assert f"fault injected in {what}" in err
    print(f"{what}: exit status {rc}, {took:.1f} s after the fault")
    assert took < LIMIT_S, f"{what}: {took:.1f} s from the fault to the exit"
    workers = [pid for pid in seen]
    assert len(workers) >= expect_workers, f"saw {len(workers)} child processes, expected loader workers"
    left = survivors(seen)
    assert not left, f"{what}: processes left behind: {left}"


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("fault", ["worker", "step"])
def test_a_fault_ends_the_loading_process_with_its_workers(fault, method, tmp_path):
    """One process iterating a TrainLoader with 2 workers (no torchrun): seconds, not a hang."""
    write_shards(tmp_path / "shards", [20, 20, 20])
    stamp = tmp_path / "stamp"
    script = textwrap.dedent(f'''
        from pathlib import Path
        import distalex.data.loader as loader
        import distalex.train as train
        from tests.test_data_loader import cfg_for, dims, SIZE
        cfg = cfg_for(Path({str(tmp_path / "shards")!r}), workers=2, start_method={method!r})
        ld = loader.TrainLoader(cfg, dims(), 4, SIZE, 0)
        for batch in ld.epoch(0):
            train.normalize(batch.images, train=False, data_cfg=ld.cfg)
    ''')
    env = dict(os.environ, OMP_NUM_THREADS="1", **inject(tmp_path / "inject", fault, stamp))
    rc, ended, _, err, seen = run_until_exit([sys.executable, "-c", script], env, tmp_path, timeout=120)
    what = "a loader worker" if fault == "worker" else "the training step"
    assert_ended_promptly(rc, ended, err, seen, stamp, what, expect_workers=2)


@pytest.mark.parametrize("method", START_METHODS)
def test_a_killed_loading_process_leaves_no_process_behind(method, tmp_path):
    """SIGKILL a process that holds an epoch's workers (no code of it runs again): its workers, and
    under forkserver the fork server, die with it (the kernel's parent-death signal)."""
    write_shards(tmp_path / "shards", [20, 20, 20])
    script = textwrap.dedent(f'''
        import time
        from pathlib import Path
        import distalex.data.loader as loader
        from tests.test_data_loader import cfg_for, dims, SIZE
        cfg = cfg_for(Path({str(tmp_path / "shards")!r}), workers=2, start_method={method!r})
        batches = iter(loader.TrainLoader(cfg, dims(), 4, SIZE, 0).epoch(0))
        next(batches)
        print("READY", flush=True)
        time.sleep(600)
    ''')
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-3000:] if proc.poll() is not None else ""
        descendants = psutil.Process(proc.pid).children(recursive=True)
        methods = sorted(started_by(p.pid) for p in descendants)
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(descendants, timeout=LIMIT_S)
    finally:
        proc.kill()
        proc.communicate()
    # the 2 workers, under forkserver the server too (and with spawn or forkserver the resource tracker)
    assert methods.count(method) == 2 + (method == "forkserver"), methods
    assert not alive, f"left behind after the SIGKILL: {[(p.pid, ' '.join(p.cmdline())[:100]) for p in alive]}"


@pytest.mark.e2e
@pytest.mark.parametrize("fault", ["worker", "step"])
def test_a_fault_ends_a_torchrun_job_within_seconds(fault, tiny_shards, tmp_path):
    """2 ranks (tp=2) under torchrun; the fault hits rank 0: both ranks and all workers end."""
    stamp = tmp_path / "stamp"
    env = run_env(**inject(tmp_path / "inject", fault, stamp))
    overrides = tiny_overrides(tiny_shards, run_name="fault", **{"data.workers": 2, "train.deterministic": False})
    rc, ended, _, err, seen = run_until_exit(torchrun_cmd(2) + overrides, env, tmp_path, timeout=240)
    what = "a loader worker" if fault == "worker" else "the training step"
    # torchrun, 2 ranks, and rank 0's 2 loader workers for training
    assert_ended_promptly(rc, ended, err, seen, stamp, what, expect_workers=4)
