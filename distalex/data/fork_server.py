"""Imported by multiprocessing's fork server before it forks any loader worker (``workers.py``
names this module in ``set_forkserver_preload``); nothing else imports it.

Under the ``forkserver`` start method the loader workers are the server's children, and each holds
the server's "clients alive" pipe: left as it is, the server would outlive a training process
killed outright and keep every worker running, and a SIGTERM to the whole job would end the server
and, through it, the workers while the training process saves. Here the server takes the workers'
rules (``workers.serve_as_fork_server``), and imports the loader and compiles the crop loops
(``augment.prepare_workers``), so that each worker starts as a fork of a process that has them:
without that, every worker of every epoch compiled them again (about 1.3 CPU-seconds each).
"""

import json
import os
import signal

# A SIGTERM to the whole job (Slurm's, at a requeue) must not end the server while the training
# process saves: ignored from the first line, not only once the imports below (seconds) are done,
# or a stop early in an epoch finds the server gone and the loader fails (EOFError) instead of saving.
if json.loads(os.environ.get("DISTALEX_FORK_SERVER", "{}")).get("parent") == os.getppid():  # workers.FORK_SERVER_ENV
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

from distalex.data import augment, loader  # noqa: E402, F401 - preloaded for the workers
from distalex.data.workers import serve_as_fork_server  # noqa: E402

augment.prepare_workers()

SERVER_PID = serve_as_fork_server()
"""This process's pid in a fork server a training process prepared, else None: a worker's
``PR_SET_PDEATHSIG`` ties it to this process."""
