"""Dead or slow: peer liveness and job-wide failure, decided off the main thread through the store.

A collective cannot tell a peer that is gone from one that is busy (compiling, writing a
checkpoint, validating), and one blocked on a peer that vanished without a TCP reset (a cut link,
a dead NIC, a frozen host) waits for the whole collective timeout. So every rank of a job runs two
daemon threads with a store client of their own, on the TCPStore the launcher already runs
(``MASTER_ADDR:MASTER_PORT``):

- **beat**, every ``HEARTBEAT_S``: adds 1 to this rank's counter, reads the counters of the two
  ranks it watches (its ring neighbours rank - 1 and rank + 1: every rank is watched by two
  others, so a lost host is seen from both sides of it, and the store serves a few operations per
  rank and interval however large the job), and reads the job's failure record.
- **judge**: notices when the store itself has not answered for ``peer_timeout_s``.

A counter is compared with its last value on this host's monotonic clock, so no clock is shared
between hosts. The busy main thread does not beat: a slow step, compile or save is never taken for
death (the threads need the GIL for microseconds per interval; torch releases it in its kernels and
collectives). What ends a rank, each with one line on stderr and ``os._exit`` (the main thread may
be blocked in a collective that will never return):

- a watched rank's counter unchanged for ``peer_timeout_s`` (and the rank has not left): the
  failure record is written, so every rank that can reach the store ends within ``HEARTBEAT_S``;
- the failure record, written by another rank (``fail``: its error; or a dead peer it found): this
  rank ends with that rank's exit status;
- the store silent for ``peer_timeout_s``, or gone (a reset): the host holding it is lost (under
  torchrun the first host, which also holds the rendezvous store the agents need: the job cannot
  continue without it).

In the last case the torchrun agent of this host would wait for the rendezvous store without end
(seen: still waiting 800 s after its store host was cut off, SIGTERM included), holding the
allocation; so when the rendezvous endpoint does not accept a connection either, the agent is
killed too (``end_stranded_agent``). A host whose agent can still reach the rendezvous store is left
to its agent: with ``--max-restarts`` and ``--nnodes=MIN:MAX`` it re-forms a smaller world.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

HEARTBEAT_S = 1.0
"""Seconds between beats; also how soon every rank learns of a failure record."""
EXIT_PEER_LOST = 4
"""Exit status of a rank that ends because a peer, its host or the store is gone."""
FAIL_WRITE_S = 3.0
"""How long ``fail`` waits for the store to take the failure record before treating it as lost."""
ON_END_S = 5.0
"""How long ``Liveness.on_end`` (closing the MLflow run) may take before the process ends anyway."""
AGENT_PROBE_S = 5.0
"""How long the rendezvous endpoint gets to accept a connection before the agent counts as stranded."""


def log_line(text: str) -> None:
    """One line on stderr, flushed at once: the process may end right after it."""
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def clock(t_wall: float) -> str:
    return datetime.datetime.fromtimestamp(t_wall).strftime("%H:%M:%S")


def where_am_i() -> str:
    """This process's host for messages: the name and, under torchrun, its node (group rank)."""
    node = os.environ.get("GROUP_RANK")
    return f"node {node} {socket.gethostname()}" if node is not None else socket.gethostname()


@dataclass
class _Seen:
    value: int
    since: float  # monotonic time the value was first seen
    since_wall: float


class Liveness:
    """This rank's heartbeat, its watch over two peers, and the job's failure record.

    ``start`` it once every rank has joined the process group; ``fail`` when this rank fails;
    ``leave`` before a normal exit (its silence afterwards is no failure).
    """

    def __init__(self, store, prefix: str, rank: int, world_size: int, peer_timeout_s: float, store_addr: str):
        self.rank, self.world_size, self.peer_timeout_s = rank, world_size, peer_timeout_s
        self.store_addr = store_addr
        self._store, self._prefix = store, prefix
        self._watched = sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})
        self._seen: dict[int, _Seen] = {}
        self._hosts: dict[int, str] = {}
        self._last_answer, self._last_answer_wall = time.monotonic(), time.time()
        self._leaving = threading.Event()
        self._ending = threading.Lock()
        self.failure_told = False
        self.on_end = None
        """Called (at most ON_END_S) before a rank ends here: e.g. marking the MLflow run FAILED."""
        self._threads = [threading.Thread(target=self._beat, name="distalex-beat", daemon=True),
                         threading.Thread(target=self._judge, name="distalex-judge", daemon=True)]

    @classmethod
    def start(cls, rank: int, world_size: int, peer_timeout_s: float, token: str,
              environ: dict | None = None) -> Liveness:
        """Connect a store client of its own to the launcher's store and start beating.
        ``token``, the same on every rank of this world, keeps a restarted world's keys apart."""
        env = os.environ if environ is None else environ
        host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=peer_timeout_s))
        live = cls(store, f"distalex/liveness/{token}/", rank, world_size, peer_timeout_s, f"{host}:{port}")
        live._set(f"host/{rank}", where_am_i())
        live._add(f"beat/{rank}", 1)
        for t in live._threads:
            t.start()
        return live

    # ------------------------------------------------------------------ store access

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _add(self, name: str, amount: int) -> int:
        value = self._store.add(self._key(name), amount)
        self._last_answer, self._last_answer_wall = time.monotonic(), time.time()
        return value

    def _set(self, name: str, value: str) -> None:
        self._store.set(self._key(name), value)

    def _get(self, name: str) -> str:
        return self._store.get(self._key(name)).decode()

    def _host(self, rank: int) -> str:
        if rank not in self._hosts:
            try:
                self._hosts[rank] = self._get(f"host/{rank}") if self._store.check([self._key(f"host/{rank}")]) else "?"
            except Exception:  # noqa: BLE001 - only for the message
                return "?"
        return self._hosts[rank]

    def _who(self, rank: int) -> str:
        return f"rank {rank} ({self._host(rank)})"

    # ------------------------------------------------------------------ the threads

    def _beat(self) -> None:
        try:
            while not self._leaving.wait(HEARTBEAT_S):
                self._add(f"beat/{self.rank}", 1)
                if self._add("failed", 0):
                    self._end_for_record()
                for peer in self._watched:
                    self._check(peer, self._add(f"beat/{peer}", 0))
        except Exception as e:  # noqa: BLE001 - a reset or refused store: its process or host is gone
            if not self._leaving.is_set():
                self._end(EXIT_PEER_LOST, f"the job's store at {self.store_addr} is gone ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}): the process or host holding it (rank 0's) "
                          "has ended", store_lost=True)

    def _check(self, peer: int, value: int) -> None:
        now, seen = time.monotonic(), self._seen.get(peer)
        if seen is None or seen.value != value:
            self._seen[peer] = _Seen(value, now, time.time())
            return
        if now - seen.since <= self.peer_timeout_s or self._store.check([self._key(f"left/{peer}")]):
            return
        reason = (f"{self._who(peer)} silent since {clock(seen.since_wall)} ({now - seen.since:.0f} s; "
                  f"parallel.peer_timeout_s={self.peer_timeout_s:g}): its process, host or link is gone")
        self._record(EXIT_PEER_LOST, reason)
        self._end(EXIT_PEER_LOST, reason)

    def _judge(self) -> None:
        while not self._leaving.wait(HEARTBEAT_S):
            silent = time.monotonic() - self._last_answer
            if silent > self.peer_timeout_s:
                self._end(EXIT_PEER_LOST, f"the job's store at {self.store_addr} has not answered since "
                          f"{clock(self._last_answer_wall)} ({silent:.0f} s; parallel.peer_timeout_s="
                          f"{self.peer_timeout_s:g}): the host holding it (rank 0's) is unreachable", store_lost=True)

    def _record(self, code: int, reason: str) -> None:
        """Write the job's failure record (the first one stays) and raise its flag."""
        self._store.compare_set(self._key("failed/reason"), "", f"{code}\t{self.rank}\t{reason}")
        self._add("failed", 1)

    def _end_for_record(self) -> None:
        code, rank, reason = self._get("failed/reason").split("\t", 2)
        self._end(int(code), f"ending: {self._who(int(rank))} failed: {reason}", quiet=True)

    def _end(self, code: int, reason: str, store_lost: bool = False, quiet: bool = False) -> None:
        """Print this rank's line and end the process now, from whichever thread found the cause.
        ``quiet``: the failing rank printed the cause already; one line per host repeats it."""
        if self.failure_told or self._leaving.is_set() or not self._ending.acquire(blocking=False):
            return  # this rank is failing or leaving on its own path
        if not quiet or os.environ.get("LOCAL_RANK", "0") == "0":
            log_line(f"error (rank {self.rank}, {where_am_i()}): {reason}")
        if self.on_end is not None:
            last = threading.Thread(target=self.on_end, name="distalex-on-end", daemon=True)
            last.start()
            last.join(ON_END_S)
        if store_lost:
            end_stranded_agent()
        os._exit(code)

    # ------------------------------------------------------------------ the main thread's calls

    def fail(self, code: int, reason: str) -> None:
        """This rank failed with ``reason`` (already printed): tell every rank, within FAIL_WRITE_S.
        If the store does not take it, the store's host is lost: the agent may be stranded too."""
        if self.failure_told:
            return
        self.failure_told = True
        done = threading.Event()

        def write() -> None:
            try:
                self._record(code, reason)
                done.set()
            except Exception:  # noqa: BLE001 - the store is gone: see below
                pass

        writer = threading.Thread(target=write, name="distalex-fail", daemon=True)
        writer.start()
        writer.join(FAIL_WRITE_S)
        self._leaving.set()  # this rank ends on its own path now (its tracker, its exit status)
        if done.is_set():
            # Stay a moment: the peers read the record within a beat, and end naming this rank's
            # cause, rather than on the broken connections this rank's exit (and rank 0's store) leaves.
            time.sleep(2 * HEARTBEAT_S)
            return
        log_line(f"error (rank {self.rank}, {where_am_i()}): the job's store at {self.store_addr} did not take the "
                 "failure: the process or host holding it (rank 0's) is gone")
        end_stranded_agent()

    def leave(self) -> None:
        """A normal exit: mark this rank as left (peers stop watching it) and stop judging the store,
        which the first rank to exit may take with it."""
        try:
            self._set(f"left/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
        self._leaving.set()


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


def torchrun_endpoint(pid: int) -> str | None:
    """The rendezvous endpoint of process ``pid`` if it is a torchrun agent with a remote rendezvous
    (read from its command line with torchrun's own parser), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    start = next((i + 1 for i, a in enumerate(argv)
                  if a in ("torch.distributed.run", "torch.distributed.launch") or os.path.basename(a) == "torchrun"), None)
    if start is None:
        return None
    from torch.distributed.run import get_args_parser, get_rdzv_endpoint

    try:
        args, _ = get_args_parser().parse_known_args(argv[start:])
    except SystemExit:
        return None
    if args.standalone:
        return None
    endpoint = get_rdzv_endpoint(args)
    return endpoint if endpoint and ":" in endpoint else None
