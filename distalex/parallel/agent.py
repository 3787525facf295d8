"""The torchrun agent above a training process, and what a worker can do to it.

torchrun's elastic agent restarts its workers after any failure, up to ``--max-restarts``, whatever
their exit status says; it stops them with SIGTERM and, 30 s later, SIGKILL. Two things a worker
can do to it, read from the agent's source (torch/distributed/elastic/agent/server/api.py and
rendezvous/dynamic_rendezvous.py):

- **Close the job's rendezvous** (``close_rendezvous``): an agent whose workers failed joins the
  next rendezvous round before it restarts them, and a closed rendezvous refuses the join
  (RendezvousClosedError): the agent ends, without restarting, on every host. Agents whose workers
  still run do not look at the flag, so the workers must end too (the job's failure record sees to
  that). The flag lives in the rendezvous host's agent, which ends with the others: a later start
  of the job meets a fresh rendezvous.
- **Kill the agent** (``end_stranded_agent``): only where its rendezvous store is gone, since the
  agent would otherwise wait for it without end.

The agent's rendezvous is read from its command line with torchrun's own parser, so this works for
the agents a user starts (``torchrun``, ``python -m torch.distributed.run``,
``launch/torchrun-hosts.sh``, ``launch/slurm/train.sbatch``). A ``--standalone`` agent keeps its
rendezvous on a port of its own choosing that its workers are not told: there a failure that no
restart can change is restarted up to ``--max-restarts`` times (seconds each, one host).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading

from distalex.parallel.lines import log_line

AGENT_PROBE_S = 5.0
"""How long the rendezvous endpoint gets to accept a connection before the agent counts as stranded."""
CLOSE_S = 5.0
"""How long closing the rendezvous may take (its store may be as gone as the job)."""


def torchrun_args(pid: int) -> argparse.Namespace | None:
    """The arguments of process ``pid`` if it is a torchrun agent (parsed with torchrun's own
    parser from its command line), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    start = next((i + 1 for i, a in enumerate(argv)
                  if a in ("torch.distributed.run", "torch.distributed.launch") or os.path.basename(a) == "torchrun"), None)
    if start is None:
        return None
    from torch.distributed.run import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(argv[start:])
    except SystemExit:
        return None
    return args


def torchrun_endpoint(pid: int) -> str | None:
    """The rendezvous endpoint of process ``pid`` if it is a torchrun agent with a remote rendezvous,
    else None."""
    args = torchrun_args(pid)
    if args is None or args.standalone:
        return None
    from torch.distributed.run import get_rdzv_endpoint

    endpoint = get_rdzv_endpoint(args)
    return endpoint if endpoint and ":" in endpoint else None


def close_rendezvous() -> str | None:
    """Close the rendezvous of this process's torchrun agent so that no agent of the job restarts
    its workers; the endpoint it closed, or None where there is none to close (no torchrun agent
    above this process, a ``--standalone`` or non-c10d one, ``--max-restarts=0``, or the store did
    not answer within CLOSE_S). Idempotent: every rank of a failing job may call it."""
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") == "0":
        return None  # the agents never restart: nothing to prevent
    args, run_id = torchrun_args(os.getppid()), os.environ.get("TORCHELASTIC_RUN_ID")
    endpoint = torchrun_endpoint(os.getppid())
    if args is None or endpoint is None or run_id is None or args.rdzv_backend != "c10d":
        return None
    closed = threading.Event()

    def close() -> None:
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

        try:
            params = RendezvousParameters("c10d", endpoint, run_id, min_nodes=1, max_nodes=1, is_host=False,
                                          read_timeout=int(CLOSE_S), close_timeout=int(CLOSE_S))
            get_rendezvous_handler(params).set_closed()
            closed.set()
        except Exception:  # noqa: BLE001 - its store is gone: the agents end on that instead
            pass

    worker = threading.Thread(target=close, name="distalex-close-rendezvous", daemon=True)
    worker.start()
    worker.join(CLOSE_S + 1)
    return endpoint if closed.is_set() else None


def end_stranded_agent() -> None:
    """Kill this process's torchrun agent if its rendezvous store does not accept a connection: that
    agent would wait for the store without end. An agent whose store answers (or a ``--standalone``
    one, whose store is its own) is left to heal or end the job itself."""
    agent = os.getppid()
    endpoint = torchrun_endpoint(agent)
    if endpoint is None:
        return
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=AGENT_PROBE_S).close()
        return
    except (OSError, ValueError):
        pass
    log_line(f"error: the rendezvous host (torchrun's store at {endpoint}) is gone: the job cannot go on without "
             f"it. Ending this host's torchrun agent (pid {agent}), which would wait for it without end; start the "
             "job again to resume from the last complete checkpoint")
    try:
        os.kill(agent, signal.SIGKILL)
    except OSError:
        pass
