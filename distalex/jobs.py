"""How a job's processes end: exit statuses, the one line a failure prints, and telling the others.

A rank that fails prints one line naming itself and the cause (a traceback only for the unexpected
kinds, which are bugs), writes the job's failure record so that every other rank ends within
seconds (``parallel.liveness``), and exits without entering another collective: its peers are
ending, not waiting for it.

Exit statuses of ``python -m distalex.train`` and ``distalex.evaluate``:

    0  finished, or stopped by SIGTERM after saving (or during start-up, with nothing to save yet)
    1  an unexpected error (a bug: the traceback is printed)
    2  bad config, layout, data or checkpoint (one line, no traceback)
    3  the loss or the weights went NaN or inf (the last good checkpoint is kept)
    4  a peer process, host or link, or the job's store, is gone (torchrun's elastic restart heals it)
    5  reading a checkpoint failed outside its files (an I/O error such as EIO, out of memory): every
       checkpoint stays in place and a restart may read it (torchrun's --max-restarts retries it)
    6  the job stalled: no rank finished a training step for parallel.progress_timeout_s while every
       process lived; the line names the rank that is behind, every rank's stack is in the log
  130  aborted by a second Ctrl-C (no checkpoint of that point; the MLflow run is marked KILLED)
  143  stopped by SIGTERM or Ctrl-C but not ended within signal_watch.STOP_GRACE_S (20 s): the main
       thread waited on a peer that is gone or stuck; ended without a checkpoint of that point
    or the status of the rank whose failure ended this one

Retried or not. torchrun's agent restarts the workers after any failure, up to --max-restarts,
whatever the status. A rank that ends with a status in ``NOT_RETRIED`` (2, 3, 130: a restart would
fail the same way, or undo the user's abort) first closes the job's rendezvous
(``parallel.agent.close_rendezvous``): each agent then ends when its workers have, on every host,
instead of restarting them. Every other failure (a lost peer, store or host, a stall, a bug, which
may be a transient fault of the machine) is left to the agents, which may heal it.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch.distributed as dist

from distalex import signal_watch
from distalex.checkpoint import CheckpointError, CheckpointReadError
from distalex.config import ConfigError
from distalex.data.info import DataError
from distalex.parallel.agent import close_rendezvous
from distalex.parallel.dims import ParallelConfigError, ParallelDims
from distalex.parallel.liveness import EXIT_PEER_LOST, log_line

EXIT_BUG, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_READ_FAILED, EXIT_ABORTED = 1, 2, 3, 5, 130
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, ParallelConfigError)
"""Errors of input, not of code: reported in one line, without a traceback."""
NOT_RETRIED = frozenset({EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_ABORTED})
"""Statuses that end the whole job whatever torchrun's --max-restarts says (see the module docstring)."""


def failure_of(e: BaseException) -> tuple[int, str]:
    """(exit status, one-line reason) for an exception that ends a rank."""
    if isinstance(e, EXPECTED_ERRORS):
        return EXIT_BAD_INPUT, str(e).replace("\n", "; ")
    if isinstance(e, CheckpointReadError):
        return EXIT_READ_FAILED, f"{e}; every checkpoint is kept, and a restart may read it".replace("\n", "; ")
    if is_peer_loss(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return EXIT_PEER_LOST, f"a collective failed ({first}): a peer's process, host or link is gone"
    if isinstance(e, KeyboardInterrupt):  # stopping.StopRequested raises it on a second Ctrl-C
        return EXIT_ABORTED, f"aborted: {e}; resume continues from the last checkpoint"
    return EXIT_BUG, f"{type(e).__name__}: {e}".splitlines()[0]


GLOO_PEER_ERRORS = ("/gloo/transport/", "Connection closed by peer", "Connection reset by peer")
"""gloo raises its transport failures as plain RuntimeErrors; these mark them."""


def is_peer_loss(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer went away (or timed out)."""
    if isinstance(e, dist.DistBackendError):
        return True
    return isinstance(e, RuntimeError) and any(mark in str(e) for mark in GLOO_PEER_ERRORS)


def report_failure(dims: ParallelDims, e: BaseException) -> int:
    """Print this rank's line for ``e`` and tell every rank (once per exception); its exit status."""
    told = getattr(e, "_distalex_exit_status", None)
    if told is not None:
        return told
    if dims.liveness is not None and is_peer_loss(e):
        dims.liveness.end_with_record()  # another rank's failure, which broke this collective, ends this one
    code, reason = failure_of(e)
    signal_watch.ending()  # the process ends within seconds now, whatever signal comes

    def announce() -> None:
        if code == EXIT_BUG:
            traceback.print_exception(e)
        # One write: the ranks share the log, and a line written in two parts interleaves with a peer's.
        log_line(f"error (rank {dims.rank}): {reason}" if dims.distributed else f"error: {reason}")
        end_without_restart(code)  # before the failure record: the ranks it ends must find the rendezvous closed

    if dims.liveness is not None:
        dims.liveness.fail(code, reason, first=announce)
    else:
        announce()
    e._distalex_exit_status = code
    return code


def end_without_restart(code: int) -> None:
    """If ``code`` is in NOT_RETRIED, close the job's rendezvous so that torchrun's agents end the
    job instead of restarting it; one line per host says so."""
    if code not in NOT_RETRIED:
        return
    endpoint = close_rendezvous()
    if endpoint is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"not restarted: a restart would end the same way, so the job's rendezvous ({endpoint}) is closed and "
              "torchrun's agents end instead of restarting", file=sys.stderr, flush=True)


def exit_job(code: int) -> None:
    """End the process with ``code`` (the normal way: Python's exit, its teardown included), the
    job too where no restart can change it."""
    end_without_restart(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """End the process after a failure without tearing the process groups down: a pending
    collective on a group whose peers are gone would hold the teardown for the collective timeout.
    What must be closed (the MLflow run, the loader workers) is closed on the way out of the loop;
    the workers also die with this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
