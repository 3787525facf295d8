"""Checkpoint faults from outside the training processes, in real torchrun jobs (2 ranks, tp=2) on
the tiny shards, in a copy of one finished run (checkpoints at steps 3, 6 and 7):

- Every read of the checkpoint files fails with EIO, as when the storage server is briefly gone
  and the files are intact: a ``sitecustomize.py`` on the resumed job's PYTHONPATH makes ``open``
  of a file under checkpoint.dir raise ``OSError(EIO)``, first for every file (meta.json too),
  then for the .pt files only (meta.json reads, every rank's shard does not). No checkpoint is
  renamed; the job ends with exit status 5 and the error in one line per rank; the next start
  without the hook resumes the newest checkpoint.
- A second run (checkpoint.resume=none, the same run_name) in the folder of an older run that
  saved later steps: refused before its first step (exit status 2, no MLflow run opened), with
  the ways out, and nothing of the older run deleted.

Bytes flipped in a shard (size unchanged) and a truncated file are in tests/test_checkpoint.py,
in one process: the checksum finds them the same way there.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pytest

from distalex.checkpoint import complete_checkpoints
from tests.runs import REPO, launch, run_env, tiny_overrides, tiny_shards, torchrun_cmd  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

SETTINGS = {"train.epochs": 1}  # 7 steps; checkpoints at steps 3, 6 and the epoch's end, 7
EIO_HOOK = '''
"""open() of a file under $EIO_UNDER for reading (ending in $EIO_SUFFIX, if set) raises OSError(EIO)."""
import builtins, errno, io, os

_under, _suffix, _open = os.environ["EIO_UNDER"].rstrip("/") + "/", os.environ.get("EIO_SUFFIX", ""), io.open


def _open_or_eio(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and not set(mode) & set("wax+"):
        path = os.path.abspath(os.fsdecode(file))
        if path.startswith(_under) and path.endswith(_suffix):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
    return _open(file, mode, *args, **kwargs)


builtins.open = io.open = _open_or_eio
'''


def assert_ok(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def checkpoint_dir(workdir: Path) -> Path:
    return workdir / "runs" / "tiny" / "checkpoints"


def listing(root: Path) -> dict[str, float]:
    """Every folder in checkpoint.dir with its meta.json's modification time."""
    return {p.name: (p / "meta.json").stat().st_mtime for p in sorted(root.iterdir())}


def mlflow_run_ids(workdir: Path) -> list[str]:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    return [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("distalex").experiment_id])]


def run_timed(cmd: list[str], env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; (the completed process, seconds from start to exit, seconds from the first
    'error (rank' line on stderr to exit)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err, first_error = [], []

    def read_stderr():
        for line in proc.stderr:
            if line.startswith("error (rank") and not first_error:
                first_error.append(time.monotonic())
            err.append(line)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    out = proc.stdout.read()
    proc.wait(timeout=300)
    ended = time.monotonic()
    reader.join()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(err))
    return done, ended - started, ended - (first_error[0] if first_error else started)


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("finished")
    assert_ok(launch(workdir, tiny_overrides(tiny_shards, run_name="tiny", **SETTINGS)))
    assert [p.name for p in complete_checkpoints(checkpoint_dir(workdir))] == [
        "step-00000003", "step-00000006", "step-00000007"]
    return workdir


def copy_of(finished_run: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(finished_run, workdir)
    return workdir


def test_an_io_error_at_resume_keeps_every_checkpoint_and_the_next_start_resumes(finished_run, tiny_shards, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    root = checkpoint_dir(workdir)
    before = listing(root)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(EIO_HOOK))
    overrides = tiny_overrides(tiny_shards, run_name="tiny", **SETTINGS)
    for suffix, failing in (("", "step-00000003/meta.json"), (".pt", "step-00000007/model-tp00.pt")):
        env = run_env(PYTHONPATH=f"{hook}:{REPO}", EIO_UNDER=str(root), EIO_SUFFIX=suffix)
        proc, took, after_error = run_timed(torchrun_cmd(2) + overrides, env, workdir)
        print(f"\nstorage fault (EIO on every read of {'the .pt files' if suffix else 'every file'} in checkpoint.dir): "
              f"start to exit {took:.1f} s, the first error line to exit {after_error:.1f} s")
        assert proc.returncode != 0 and "exitcode: 5" in proc.stderr, proc.stderr[-6000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error (rank")]
        assert len(errors) == 2, proc.stderr[-6000:]  # one line per rank
        assert "Traceback" not in proc.stderr.split("failed (exitcode")[0], proc.stderr[-6000:]  # (torchrun prints its own)
        assert f"{root}/{failing}: cannot be read (OSError: [Errno 5] Input/output error)" in errors[0], errors
        assert errors[0].endswith("every checkpoint is kept, and a restart may read it"), errors
        assert listing(root) == before  # nothing renamed, moved aside or rewritten
        assert after_error < 30, f"the job took {after_error:.0f} s to end after its error"
    proc = launch(workdir, overrides)
    assert_ok(proc)
    assert f"resumed from {root}/step-00000007 (step 7," in proc.stdout, proc.stdout[-3000:]


def test_a_new_run_in_the_folder_of_an_older_run_is_refused_before_its_first_step(finished_run, tiny_shards, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    root = checkpoint_dir(workdir)
    before, runs = listing(root), mlflow_run_ids(workdir)
    proc = launch(workdir, tiny_overrides(tiny_shards, run_name="tiny", **{"checkpoint.resume": "none",
                                                                              "train.epochs": 1, "checkpoint.every_steps": 1}))
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr, proc.stderr[-6000:]
    refusal = next(line for line in proc.stderr.splitlines() if line.startswith("error (rank 0)"))
    assert f"checkpoint.dir {root} holds another run's checkpoints (step-00000003 to step-00000007 (run " in refusal
    assert f"MLflow run {runs[0]}))" in refusal and "continue that run with checkpoint.resume=auto" in refusal, refusal
    assert "another run_name" in refusal, refusal
    assert listing(root) == before  # the older run's checkpoints, untouched
    assert mlflow_run_ids(workdir) == runs  # refused before its MLflow run (and its first step)
