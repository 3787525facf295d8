"""Stop signals heard on a thread of their own, for a main thread blocked in C++.

Python runs a signal handler only when the main thread returns to the interpreter. ``follow``
makes Python's C-level handler also write each signal's number to a pipe as it arrives
(``signal.set_wakeup_fd``), and a thread reads it: on SIGTERM or SIGINT

- before the training loop has started (``stop.started`` False) there is nothing to save: the
  process ends at once, status 0;
- in the loop, the main thread has STOP_GRACE_S to stop on its own (``distalex.stopping``: agree,
  save, close the MLflow run); a process still alive then waits on a peer that is gone or stuck,
  and the thread ends it without a checkpoint of that point (EXIT_STOP_FORCED);
- a process that is already ending on its own (``ending``: a failure being reported) is left to it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_GRACE_S = 20.0
"""From a stop signal, how long the training loop has to stop (agree, save, close its MLflow run)
before the process is ended without it: torchrun's agent and Slurm (KillWait) kill it at 30 s."""
EXIT_STOP_FORCED = 143
"""Exit status of a process ended STOP_GRACE_S after its stop signal (128 + SIGTERM, as if killed by it)."""


class _SignalThread:
    instance: _SignalThread | None = None

    def __init__(self):
        self.stop = None
        self.ending = False
        self._deadline: threading.Thread | None = None
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        # A forked child (a loader worker) would write its own signals into this pipe: not there.
        os.register_at_fork(after_in_child=_no_wakeup_fd)
        threading.Thread(target=self._run, args=(read,), name="distalex-signals", daemon=True).start()

    def _run(self, read: int) -> None:
        while True:
            for signum in os.read(read, 64):
                if signum in (signal.SIGTERM, signal.SIGINT) and self.stop is not None and not self.ending:
                    self._heard(signal.Signals(signum).name)

    def _heard(self, name: str) -> None:
        if not self.stop.started:
            _say(f"stopped by {name} during start-up: nothing to save yet; resume continues from the last checkpoint")
            os._exit(0)
        if self._deadline is None:
            self._deadline = threading.Thread(target=self._end_after_grace, args=(name,), name="distalex-stop-deadline",
                                              daemon=True)
            self._deadline.start()

    def _end_after_grace(self, name: str) -> None:
        time.sleep(STOP_GRACE_S)
        if self.ending:
            return
        frame = sys._current_frames().get(threading.main_thread().ident)
        where = f" (its main thread in {frame.f_code.co_name}, {frame.f_code.co_filename}:{frame.f_lineno})" if frame else ""
        _say(f"error: stopped by {name}, but the process did not end within {STOP_GRACE_S:g} s{where}: a peer it "
             "waits for is gone or stuck. Ending it without a checkpoint of this point; resume continues from the "
             "last one")
        os._exit(EXIT_STOP_FORCED)


def follow(stop) -> None:
    """Hear SIGTERM and SIGINT for ``stop`` (a ``stopping.StopRequested``) from now on."""
    if _SignalThread.instance is None:
        _SignalThread.instance = _SignalThread()
    _SignalThread.instance.stop = stop


def unfollow(stop) -> None:
    """Stop hearing signals for ``stop``: its run has returned (a process that goes on, such as a test
    that called the training's ``main``, must not be ended by a signal meant for that run)."""
    if _SignalThread.instance is not None and _SignalThread.instance.stop is stop:
        _SignalThread.instance.stop = None


def ending() -> None:
    """This process is ending on its own (within seconds): stop signals change nothing from now on."""
    if _SignalThread.instance is not None:
        _SignalThread.instance.ending = True


def _no_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread of the child: it never runs a Python signal handler anyway
        pass


def _say(message: str) -> None:
    """One line on stderr, past Python's buffers (the main thread may be writing to stderr)."""
    prefix = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
    os.write(2, f"\n{prefix}{message}\n".encode())
