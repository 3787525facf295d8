"""Stopping on SIGTERM or Ctrl-C: every rank stops after the same step, without a host sync per step.

torchrun forwards SIGTERM and SIGINT to every worker and Slurm signals every process of a job, but
each process sees it at its own moment, so the ranks agree on where to stop. The signal handler only
sets a flag (``StopRequested``); ``StopAgreement`` turns the flags into one decision:

- **Training steps.** After step k every rank waits for the agreement it started after step k-1
  (a small all-reduce on the control group, long finished by then: a step takes far longer) and
  starts the next one with its own flag, without waiting. The agreement started after step k-1
  decides whether all ranks stop after step k. So a SIGTERM that arrives during step k stops
  training after step k + 1 on every rank: at most one step after the one it arrived in, and no
  step waits on another host's signal flag.
- **Between phases** (after an epoch's last step, after validation, after the epoch-end save) a
  blocking agreement (``now``).
- **Loops whose length differs between ranks** (validation batches, which differ across dp ranks;
  loader start-up, where only the loading ranks wait) poll (``poll``): each round is one blocking
  all-reduce of (stop, busy); ranks that are done keep polling until no rank is busy. Validation
  therefore stops within one validation batch, loader start-up within one poll interval.

The control group is gloo over the host even with NCCL: the flag never touches the device.

A Python signal handler runs only when the main thread returns to the interpreter: one blocked in
C++ (gloo's connect in ``init_process_group`` waiting for a peer, a collective whose peer is gone)
would not hear the stop until that call returns or times out, and torchrun's agent kills a worker
30 s after its SIGTERM. So the training CLI also hears the stop signals on a thread of its own
(``StopRequested.hear_while_blocked``, ``distalex.signal_watch``): before the training loop starts
there is nothing to save and the process ends at once (status 0); in the loop the main thread has
``signal_watch.STOP_GRACE_S`` to stop as above, after which the thread ends the process without a
checkpoint of that point.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from distalex import signal_watch
from distalex.parallel.dims import ParallelDims


class StopRequested:
    """Set by SIGTERM (torchrun and Slurm send it) or Ctrl-C (SIGINT). Installed first thing, so a
    signal during start-up still ends in a clean exit: at once where ``hear_while_blocked`` is on
    (nothing to save yet), else with a save at the first agreement.

    A second Ctrl-C aborts at once: the handler raises ``KeyboardInterrupt`` (``aborted`` is then
    True and the loop marks the MLflow run KILLED on its way out). "Second" means a SIGINT after
    any stop signal, or a SIGTERM after a Ctrl-C: torchrun passes the first Ctrl-C on to its workers
    as SIGINT and, on the second, sends them SIGTERM and exits. A signal within ``SAME_KEYPRESS_S``
    of the first is the same keypress (where a terminal reaches the workers directly as well as
    through torchrun), and SIGTERM after SIGTERM never aborts: Slurm sends it to every process of a
    job and torchrun passes it on as well. Once the loop is ``finishing`` (ending its MLflow run, a
    bounded wait) nothing aborts it: the run is marked either way.
    """

    SAME_KEYPRESS_S = 1.0

    def __init__(self):
        self.requested = False
        self.signal: str | None = None
        """The signal that asked for the stop: "SIGTERM" or "SIGINT"."""
        self.aborted = False
        self.finishing = False
        self.started = False
        """Whether the training loop has started: before it a stop has nothing to save."""
        self._at = 0.0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def hear_while_blocked(self) -> None:
        """Also hear SIGTERM and SIGINT on a thread of its own, whatever the main thread is blocked
        in (see the module docstring). For a process that ends after its stop: the training CLI."""
        signal_watch.follow(self)

    def describe(self) -> str:
        """What asked for the stop, for messages: this process's signal, or another rank's."""
        return {"SIGINT": "Ctrl-C (SIGINT)", None: "another rank's stop signal"}.get(self.signal, self.signal)

    def _handle(self, signum, frame):
        now, name = time.monotonic(), signal.Signals(signum).name
        if not self.requested:
            self.requested, self.signal, self._at = True, name, now
            if name == "SIGINT":
                _say("Ctrl-C: every rank stops after its current step and saves a checkpoint; Ctrl-C again to abort at once")
            return
        second = name == "SIGINT" or self.signal == "SIGINT"
        if self.aborted or self.finishing or not second or now - self._at < self.SAME_KEYPRESS_S:
            return
        self.aborted = True
        raise KeyboardInterrupt(f"{name} after {self.describe()}: aborting without a checkpoint")


def _say(message: str) -> None:
    """One line on stderr from rank 0, written past Python's buffers (this runs inside a signal
    handler, which may interrupt a print to stderr)."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, f"\n{message}\n".encode())


class StopAgreement:
    """All ranks' stop flags, agreed on the control group; ``agreed`` never goes back to False."""

    def __init__(self, stop: StopRequested, dims: ParallelDims):
        self.stop, self.dims = stop, dims
        self.agreed = False
        # (stop, busy) as numpy, read without a tensor call; the tensor shares its memory
        self._flags = np.zeros(2, dtype=np.int64)
        self._tensor = torch.from_numpy(self._flags)
        self._pending = None  # the all-reduce started after the previous step

    def after_step(self) -> bool:
        """Whether every rank stops after the step just done (decided by the flags of one step ago)."""
        if not self.dims.distributed:
            self.agreed = self.agreed or self.stop.requested
            return self.agreed
        self._settle()
        if not self.agreed:
            self._flags[:] = (self.stop.requested, 0)
            self._pending = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self.dims.control_group, async_op=True)
        return self.agreed

    def now(self) -> bool:
        """Blocking: whether any rank has asked to stop by now (the pending agreement included)."""
        return self.poll(busy=False)[0]

    def poll(self, busy: bool) -> tuple[bool, bool]:
        """Blocking: (any rank asked to stop, any rank still busy). Every rank calls it the same
        number of times: the ones that are done call it with busy=False until no rank is busy."""
        if not self.dims.distributed:
            self.agreed = self.agreed or self.stop.requested
            return self.agreed, busy
        self._settle()
        self._flags[:] = (self.stop.requested or self.agreed, busy)
        dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self.dims.control_group)
        self.agreed = self.agreed or bool(self._flags[0])
        return self.agreed, bool(self._flags[1])

    def _settle(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            self.agreed = self.agreed or bool(self._flags[0])
