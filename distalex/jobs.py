"""How a job's processes end: exit statuses, the one line a failure prints, and telling the others.

A rank that fails prints one line naming itself and the cause (a traceback only for the unexpected
kinds, which are bugs), writes the job's failure record so that every other rank ends within
seconds (``parallel.liveness``), and exits without entering another collective: its peers are
ending, not waiting for it.

Exit statuses of ``python -m distalex.train`` and ``distalex.evaluate``:

    0  finished, or stopped by SIGTERM after saving
    1  an unexpected error (a bug: the traceback is printed)
    2  bad config, layout, data or checkpoint (one line, no traceback)
    3  the loss or the weights went NaN or inf (the last good checkpoint is kept)
    4  a peer process, host or link, or the job's store, is gone (torchrun's elastic restart heals it)
    5  reading a checkpoint failed outside its files (an I/O error such as EIO, out of memory): every
       checkpoint stays in place and a restart may read it (torchrun's --max-restarts retries it)
  130  aborted by a second Ctrl-C (no checkpoint of that point; the MLflow run is marked KILLED)
    or the status of the rank whose failure ended this one
"""

from __future__ import annotations

import os
import sys
import traceback

import torch.distributed as dist

from distalex.checkpoint import CheckpointError, CheckpointReadError
from distalex.config import ConfigError
from distalex.data.info import DataError
from distalex.parallel.dims import ParallelConfigError, ParallelDims
from distalex.parallel.liveness import EXIT_PEER_LOST, log_line

EXIT_BUG, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_READ_FAILED, EXIT_ABORTED = 1, 2, 3, 5, 130
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, ParallelConfigError)
"""Errors of input, not of code: reported in one line, without a traceback."""


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
    code, reason = failure_of(e)
    if code == EXIT_BUG:
        traceback.print_exception(e)
    # One write: the ranks share the log, and a line written in two parts interleaves with a peer's.
    log_line(f"error (rank {dims.rank}): {reason}" if dims.distributed else f"error: {reason}")
    if dims.liveness is not None:
        dims.liveness.fail(code, reason)
    e._distalex_exit_status = code
    return code


def exit_now(code: int) -> None:
    """End the process after a failure without tearing the process groups down: a pending
    collective on a group whose peers are gone would hold the teardown for the collective timeout.
    What must be closed (the MLflow run, the loader workers) is closed on the way out of the loop;
    the workers also die with this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
