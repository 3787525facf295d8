"""Stopping on SIGTERM wherever it lands, and no host sync in a training step between log points.

Two real gloo processes (dp=1 x tp=2) run ``distalex.train.train`` on the tiny shards in-process
(tests/distributed.py), so that a phase can be slowed down or timed from inside: each process sends
SIGTERM to itself at a chosen moment (the handler and the agreement are the real ones) and records
how long ``train`` then takes to return.

One worker run holds a chain of four jobs in the same run directory, as a requeued job would:
  1. SIGTERM during validation (each validation batch slowed to VAL_BATCH_S): the stop comes within
     one validation batch and saves the epoch's last step, not yet validated;
  2. the resumed job validates, and a SIGTERM during its epoch-end save stops it right after the
     save, before the next epoch's loader starts;
  3. the next job's loader start-up is made to hang (the first batch of epoch 2 waits STALL_S in
     the worker process); a SIGTERM then stops it within a poll of the stop agreement, and the
     worker exits at once instead of finishing its batch;
  4. the last job runs to the end: its weights equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.distributed import run_workers
from tests.runs import DEMO_CONFIG, tiny_overrides, tiny_shards  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e  # real training runs (distalex.train.train on 2 gloo ranks)

VAL_BATCH_S = 0.5
STALL_S = 60.0
EXIT_SLACK_S = 3.0
"""Time allowed beyond the phase's own bound: the checkpoint of the tiny net, closing the loaders,
on this 2-core machine shared with other jobs."""

CHAIN = ("during validation", "after the epoch-end checkpoint", "during loader start-up", None)


def overrides(shards, **extra) -> list[str]:
    # fork: the loader workers must carry this process's patches (``slowed``); a fork copies them
    pairs = tiny_overrides(shards, **{"tracking.enabled": False, "train.log_every": 4, "data.start_method": "fork",
                                      **extra})
    return pairs[1::2]  # the values of ["--set", "k=v", ...]


class Stopper:
    """Sends SIGTERM to this process once, on the first call of ``now``; remembers when."""

    def __init__(self):
        self.sent_at = None

    def now(self) -> None:
        if self.sent_at is None:
            self.sent_at = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def slowed(phase: str, stopper: Stopper):
    """Patch the phase in which ``stopper`` fires (this process, and its forked loader workers)."""
    from distalex.checkpoint import CheckpointManager
    from distalex.data import loader

    saved = {}

    def patch(owner, name, value):
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, value)

    if phase == "during validation":
        real_iter = loader.ValLoader.__iter__

        def slow_val(self):
            for i, batch in enumerate(real_iter(self)):
                if i == 1:
                    stopper.now()
                time.sleep(VAL_BATCH_S)
                yield batch

        patch(loader.ValLoader, "__iter__", slow_val)
    elif phase == "after the epoch-end checkpoint":
        real_save = CheckpointManager.save

        def save_with_sigterm(self, engine, state, streams):
            if state.step_in_epoch == 0 and state.validated_step == state.step:
                stopper.now()
            return real_save(self, engine, state, streams)

        patch(CheckpointManager, "save", save_with_sigterm)
    elif phase == "during loader start-up":
        real_batches, real_start = loader._TrainStream._batches, loader.TrainLoader.start

        def stalled(self, epoch, logical, skip):
            if epoch == 1:
                time.sleep(STALL_S)  # runs in the DataLoader worker, forked with this patch
            yield from real_batches(self, epoch, logical, skip)

        def start_then_sigterm(self, epoch, start_step=0):
            batches = real_start(self, epoch, start_step)
            if epoch == 1:
                stopper.now()
            return batches

        patch(loader._TrainStream, "_batches", stalled)
        patch(loader.TrainLoader, "start", start_then_sigterm)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def chain_worker(workdir: str, values: list[str]) -> list[dict]:
    from distalex.config import load_config
    from distalex.parallel.dims import init_parallel
    from distalex.parallel.plan import full_state_dict
    from distalex.stopping import StopRequested
    import distalex.train as train

    os.chdir(workdir)
    cfg = load_config(DEMO_CONFIG, values)
    dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu", layout=cfg.parallel.layout)
    jobs = []
    for phase in CHAIN:
        stopper, out = Stopper(), io.StringIO()
        with slowed(phase, stopper) if phase else contextlib.nullcontext(), contextlib.redirect_stdout(out):
            code = train.train(cfg, dims, StopRequested())
        done = time.monotonic()
        jobs.append({"phase": phase, "code": code, "stdout": out.getvalue(),
                     "took": None if stopper.sent_at is None else done - stopper.sent_at})
    final = train.setup(cfg, dims, StopRequested())  # the weights of the last checkpoint
    jobs.append({"weights": full_state_dict(final.engine.module, dims.tp_group)})
    reference = cfg.model_copy(update={"run_name": "uninterrupted"})
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.train(reference, dims, StopRequested()) == 0
    ref = train.setup(reference, dims, StopRequested())
    jobs.append({"weights": full_state_dict(ref.engine.module, dims.tp_group)})
    return jobs


@pytest.fixture(scope="module")
def chain(tiny_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stops")
    return run_workers(chain_worker, 2, str(workdir), overrides(tiny_shards), timeout=300)


@pytest.mark.parametrize("index", range(3))
def test_a_sigterm_ends_the_job_within_the_bound(chain, index):
    phase = CHAIN[index]
    bound = {"during validation": VAL_BATCH_S, "after the epoch-end checkpoint": 0.0,
             "during loader start-up": 0.2}[phase] + EXIT_SLACK_S
    for rank, jobs in enumerate(chain):
        job = jobs[index]
        assert job["code"] == 0
        if rank == 0:
            assert f"stopped by SIGTERM at step 7 ({phase})" in job["stdout"], job["stdout"]
        print(f"\nrank {rank}: SIGTERM {phase}: train() returned {job['took']:.2f} s later (bound {bound:.1f} s)")
        assert job["took"] < bound, f"{phase}: {job['took']:.2f} s"


def test_the_chain_of_stops_ends_with_the_uninterrupted_weights(chain):
    assert "epoch 1/2" in chain[0][1]["stdout"]  # validated by the job after the stop during validation
    assert "epoch 2/2" in chain[0][3]["stdout"]  # (rank 0 prints)
    for jobs in chain:
        weights, reference = jobs[4]["weights"], jobs[5]["weights"]
        assert jobs[3]["code"] == 0
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(weights[name], tensor), name


# ----------------------------------------------------------------------------- host syncs


def steps_worker(workdir: str, values: list[str]) -> dict:
    """One epoch of train_epoch with every collective and every host read of a tensor recorded, by step."""
    from distalex.config import load_config
    from distalex.parallel.dims import init_parallel
    from distalex.parallel.trace import CollectiveSpy, HostReadSpy
    from distalex.stopping import StopRequested
    import distalex
    import distalex.train as train

    os.chdir(workdir)
    cfg = load_config(DEMO_CONFIG, values)
    dims = init_parallel(cfg.parallel.tp, cfg.model.towers, "cpu", layout=cfg.parallel.layout)
    run = train.setup(cfg, dims, StopRequested())
    spy, reads, marks = CollectiveSpy(), HostReadSpy(), []
    spy.phase = "start"
    real_start = run.train_loader.start

    class Marked:
        """The epoch's batches; asking for the next one starts the next step's part of the record."""

        def __init__(self, batches):
            self.batches = batches
            self.ready, self.close = batches.ready, batches.close

        def mark(self):
            spy.phase = f"step {run.state.step + 1}"
            marks.append((spy.phase, len(reads.calls)))  # where the host reads of this step begin

        def __iter__(self):
            self.mark()
            for batch in self.batches:
                yield batch
                self.mark()

    run.train_loader.start = lambda *args, **kwargs: Marked(real_start(*args, **kwargs))
    spy.install()
    reads.install()
    try:
        train.train_epoch(run, None)
    finally:
        reads.uninstall()
        spy.uninstall()
    mine = {id(c) for c in reads.reads_that_wait_from(distalex.__path__[0])}
    ends = [n for _, n in marks[1:]] + [len(reads.calls)]
    return {
        "rank": dims.rank,
        "control": [(c.phase, c.kind, c.async_op) for c in spy.calls if c.group is dims.control_group],
        "reads": {step: [f"{c.kind} at {c.where}" for c in reads.calls[begin:end] if id(c) in mine]
                  for (step, begin), end in zip(marks, ends)},
    }


def test_no_host_sync_in_a_step_between_log_points(tiny_shards, tmp_path):
    """log_every=4, every_steps=0: of the epoch's 7 steps, 4 and 7 log (a sync: the loss is read)
    and 1-3, 5 and 6 are plain steps. In those, the only collective on the control group is the
    stop agreement, started without waiting (its result is read a step later), and no distalex code
    reads a tensor on the host (trace.HostReadSpy; on a GPU each read waits for the device), on
    any rank."""
    values = overrides(tiny_shards, **{"checkpoint.every_steps": 0, "train.epochs": 1})
    plain = [f"step {k}" for k in (1, 2, 3, 5, 6)]
    for result in run_workers(steps_worker, 2, str(tmp_path), values, timeout=240):
        control = [c for c in result["control"] if c[0] in plain]
        assert sorted(control) == sorted((step, "all_reduce", True) for step in plain), result["control"]
        for step in plain:
            assert result["reads"][step] == [], (result["rank"], step, result["reads"][step])
        # the spy does see the reads that logging makes
        assert result["reads"]["step 4"] and result["reads"]["step 7"], result["reads"]


# ----------------------------------------------------------------------------- blocked in C++

BLOCKED_SCRIPT = textwrap.dedent('''
    import os, sys, threading, torch
    import torch.distributed as dist
    from distalex import signal_watch
    from distalex.parallel.dims import init_parallel
    from distalex.stopping import StopRequested

    signal_watch.STOP_GRACE_S = float(sys.argv[1])  # the test's: 20 s in the training CLI
    stop = StopRequested()
    stop.hear_while_blocked()  # as the training CLI does, first thing
    dims = init_parallel(tp=1, towers=2, device="cpu", timeout_s=600, peer_timeout_s=600)
    stop.started = True  # as in the training loop: a stop there saves, or tries to
    print("ready", flush=True)
    if dims.rank == 1:
        threading.Event().wait()  # stuck, alive: its thread beats
    dist.all_reduce(torch.ones(4), group=dims.dp_group)  # rank 0 waits here for rank 1, in C++
''')


def start_blocked(tmp_path, ranks: list[int], grace_s: float) -> tuple[list[subprocess.Popen], int]:
    """BLOCKED_SCRIPT as ``ranks`` of a world of 2 (the others never start); their output in files."""
    from tests.distributed import free_port
    from tests.runs import REPO

    script, port = tmp_path / "blocked.py", free_port()
    script.write_text(BLOCKED_SCRIPT)
    procs = []
    for rank in ranks:
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), str(grace_s)], env=env, stdout=out, stderr=out))
    return procs, port


def exits_within(proc: subprocess.Popen, since: float, timeout: float, log: Path) -> tuple[int, float, str]:
    """(exit status, seconds from ``since`` to the exit, output); fails past ``since + timeout``."""
    try:
        code = proc.wait(max(since + timeout - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {timeout} s after SIGTERM\n{log.read_text()[-3000:]}") from None
    return code, time.monotonic() - since, log.read_text()


def test_a_sigterm_while_the_process_group_starts_ends_the_process_at_once(tmp_path):
    """Rank 0 of 2 alone: init_process_group waits in C++ for rank 1, which never comes (a peer of a
    failed round). The Python handler could not run before the connect times out (parallel.timeout_s);
    the signal thread ends the process at once: nothing to save yet."""
    (proc,), port = start_blocked(tmp_path, [0], grace_s=20)
    deadline = time.monotonic() + 120
    while True:  # rank 0 serves the store once it is inside init_process_group
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "rank0.log").read_text()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code, took, text = exits_within(proc, time.monotonic(), 10, tmp_path / "rank0.log")
    assert code == 0 and "stopped by SIGTERM during start-up: nothing to save yet" in text, text[-3000:]
    assert "ready" not in text
    print(f"\nSIGTERM in init_process_group: exited {took:.2f} s later")
    assert took < 5, f"{took:.1f} s"


def test_a_sigterm_while_a_collective_waits_on_a_stuck_peer_ends_within_the_grace(tmp_path):
    """Rank 1 is stuck (alive), rank 0 waits for it in an all-reduce: neither can stop as agreed.
    Both get SIGTERM, as from torchrun's agent; both end STOP_GRACE_S later, before the agent's 30 s."""
    grace_s = 3.0
    procs, _ = start_blocked(tmp_path, [0, 1], grace_s)
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    deadline = time.monotonic() + 120
    while not all("ready" in log.read_text() for log in logs):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [log.read_text() for log in logs]
        time.sleep(0.2)
    time.sleep(1.0)
    sent = time.monotonic()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        code, took, text = exits_within(proc, sent, grace_s + 10, log)
        assert code == 143, (rank, code, text[-3000:])
        assert f"rank {rank}: error: stopped by SIGTERM, but the process did not end within {grace_s:g} s" in text, text
        assert took >= grace_s - 0.5, f"rank {rank} ended {took:.1f} s after SIGTERM, before the grace"
    assert "(its main thread in all_reduce, " in logs[0].read_text()  # where it was stuck


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.fixture
def own_handlers():
    """StopRequested installs SIGINT and SIGTERM handlers: restore pytest's afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs in this (the main) thread at the next bytecode


@pytest.mark.parametrize("first,second,aborts", [
    (signal.SIGINT, signal.SIGINT, True),    # Ctrl-C, Ctrl-C
    (signal.SIGINT, signal.SIGTERM, True),   # torchrun turns the second Ctrl-C into SIGTERM
    (signal.SIGTERM, signal.SIGINT, True),   # a Ctrl-C during a SIGTERM stop
    (signal.SIGTERM, signal.SIGTERM, False),  # Slurm and torchrun both send SIGTERM: one stop
])
def test_a_second_ctrl_c_aborts_a_copy_of_the_first_does_not(own_handlers, first, second, aborts):
    from distalex.stopping import StopRequested

    stop = StopRequested()
    stop.SAME_KEYPRESS_S = 0.3
    deliver(first)
    assert stop.requested and stop.signal == signal.Signals(first).name and not stop.aborted
    deliver(second)  # within SAME_KEYPRESS_S: the same keypress, reaching this process twice
    assert not stop.aborted
    time.sleep(0.35)
    if aborts:
        with pytest.raises(KeyboardInterrupt, match="aborting without a checkpoint"):
            deliver(second)
        assert stop.aborted
        deliver(signal.SIGINT)  # once aborting, further signals change nothing
    else:
        deliver(second)
        assert not stop.aborted
    stop.finishing = True
    deliver(signal.SIGINT)  # the loop is ending its MLflow run: nothing cuts that off


def launch_in_session(workdir: Path, command: list[str], **env) -> subprocess.Popen:
    """torchrun in a session of its own, output to files: its process group is what a terminal signals."""
    from tests.runs import run_env

    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=workdir, env=run_env(**env), start_new_session=True,
                            stdout=open(workdir / "stdout", "w"), stderr=open(workdir / "stderr", "w"))


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, timeout: float = 180) -> list[int]:
    """Until the first checkpoint is written; the worker pids (torchrun's children)."""
    from distalex.checkpoint import complete_checkpoints

    deadline = time.monotonic() + timeout
    while not complete_checkpoints(workdir / "runs" / "ctrlc" / "checkpoints"):
        assert proc.poll() is None and time.monotonic() < deadline, (workdir / "stderr").read_text()[-4000:]
        time.sleep(0.05)
    return [c.pid for c in psutil.Process(proc.pid).children()]


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until every pid has exited (not just become a zombie); fails after ``timeout``."""
    t0 = time.monotonic()
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() - t0 < timeout, f"workers {pids} still running {timeout} s later"
        time.sleep(0.05)
    return time.monotonic() - t0


def mlflow_run(workdir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("distalex").experiment_id])
    return run


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_with_a_checkpoint_and_a_killed_run(tiny_shards, tmp_path):
    """One Ctrl-C as a terminal sends it: SIGINT to torchrun's process group (torchrun passes it on
    to its workers), and the same SIGINT straight to the workers as well, as where they share that
    group. One keypress reaching a worker twice is one stop, not an abort."""
    from distalex.checkpoint import complete_checkpoints, read_meta
    from tests.runs import tiny_overrides, torchrun_cmd

    proc = launch_in_session(tmp_path, torchrun_cmd(2) + tiny_overrides(
        tiny_shards, run_name="ctrlc", **{"train.epochs": 40, "checkpoint.every_steps": 3}))
    workers = wait_for_checkpoint(tmp_path, proc)
    assert len(workers) == 2
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    proc.wait(timeout=120)
    wait_gone(workers, 60)
    took = time.monotonic() - t0
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    print(f"\nCtrl-C to the workers' exit: {took:.1f} s")
    stopped = re.search(r"stopped by Ctrl-C \(SIGINT\) at step (\d+) \(during training\)", out)
    assert stopped, out[-2000:] + err[-4000:]
    assert "aborted:" not in err, err[-4000:]
    assert err.count("Traceback") == 1 and "SignalException: Process" in err, err[-6000:]  # torchrun's own exit
    last = complete_checkpoints(tmp_path / "runs" / "ctrlc" / "checkpoints")[-1]
    assert read_meta(last)["train_state"]["step"] == int(stopped.group(1)), "the checkpoint is of the stop's step"
    assert mlflow_run(tmp_path).info.status == "KILLED"
    assert took < 30


SLOW_STOP_SAVE = '''
import signal, sys, time
from distalex.checkpoint import CheckpointManager
import distalex.train

real_save = CheckpointManager.save


def save(self, *args, **kwargs):
    stop = signal.getsignal(signal.SIGINT).__self__  # the StopRequested that distalex.train installed
    if stop.requested:
        time.sleep({seconds})
    return real_save(self, *args, **kwargs)


CheckpointManager.save = save
if __name__ == "__main__":  # the loader's fork server imports this script too (as multiprocessing's spawn would)
    sys.argv[0] = "distalex.train"
    distalex.train.main()
'''


@pytest.mark.slow
def test_a_second_ctrl_c_under_torchrun_aborts_at_once_and_still_marks_the_run(tiny_shards, tmp_path):
    """Ctrl-C twice, 2 s apart, at torchrun's process group. The stop's checkpoint is made to take
    SAVE_S (the tiny net saves in milliseconds, the paper's net in seconds), so that the second
    keypress lands during it. torchrun exits at the second and sends its workers SIGTERM: they abort
    at once, without that checkpoint, and the MLflow run is KILLED."""
    from distalex.checkpoint import complete_checkpoints, read_meta
    from tests.runs import DEMO_CONFIG, tiny_overrides

    save_s = 20.0
    script = tmp_path / "slow_stop_save.py"
    script.write_text(SLOW_STOP_SAVE.replace("{seconds}", str(save_s)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
               str(script), "--config", str(DEMO_CONFIG)]
    proc = launch_in_session(tmp_path, command + tiny_overrides(
        tiny_shards, run_name="ctrlc", **{"train.epochs": 40, "checkpoint.every_steps": 3}))
    workers = wait_for_checkpoint(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(2.0)
    before = [read_meta(c)["train_state"]["step"] for c in complete_checkpoints(tmp_path / "runs" / "ctrlc" / "checkpoints")]
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    wait_gone(workers, 60)
    took = time.monotonic() - t0
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    print(f"\nsecond Ctrl-C to the workers' exit: {took:.1f} s")
    assert "aborted: SIGTERM after Ctrl-C (SIGINT): aborting without a checkpoint" in err, err[-4000:]
    assert took < save_s - 2, "the workers waited for the slowed checkpoint instead of aborting"
    after = [read_meta(c)["train_state"]["step"] for c in complete_checkpoints(tmp_path / "runs" / "ctrlc" / "checkpoints")]
    assert after == before, "no checkpoint of the aborted stop"
    assert "stopped by" not in out
    assert mlflow_run(tmp_path).info.status == "KILLED"


def test_a_process_that_ran_the_training_main_is_not_ended_by_a_later_signal(tmp_path):
    """``main`` hears stop signals on a thread for its run, and a stop before training starts ends the
    process at once. After ``main`` has returned (here: exit 2 on a bad key), a process that goes on
    (a test runner that called it) handles its own Ctrl-C."""
    from tests.runs import REPO

    script = textwrap.dedent('''
        import os, signal, time
        import distalex.train as train
        try:
            train.main(["--set", "no.such_key=1"])
        except SystemExit as e:
            print("main exited", e.code, flush=True)
        heard = []
        signal.signal(signal.SIGINT, lambda *_: heard.append(1))
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        print("alive, heard", len(heard), flush=True)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and "main exited 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "alive, heard 1" in proc.stdout, proc.stdout + proc.stderr[-2000:]
