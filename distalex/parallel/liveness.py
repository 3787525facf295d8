"""Dead or slow: peer liveness and job-wide failure, decided off the main thread through the store.

A collective cannot tell a peer that is gone from one that is busy (compiling, writing a
checkpoint, validating), and one blocked on a peer that vanished without a TCP reset (a cut link,
a dead NIC, a frozen host) waits for the whole collective timeout. So every rank of a job runs two
daemon threads with a store client of their own, on the store of the world's process groups
(``parallel.store``, served by rank 0's process):

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
killed too (``agent.end_stranded_agent``). A host whose agent can still reach the rendezvous store is
left to its agent: with ``--max-restarts`` and ``--nnodes=MIN:MAX`` it re-forms a smaller world.

**Alive but stuck.** A rank whose main thread stops (a deadlock, a read that never returns, a stuck
kernel) keeps beating: its threads live. So the beat also watches the main thread's training steps
(``Progress``): a rank that has finished no step for half of ``progress_timeout_s`` while in the
training loop publishes where it is (its steps, and the collectives it has issued on its process
groups: their sequence numbers). When rank 0 has been stuck for ``progress_timeout_s`` and every
rank has published (so none is busy with a checkpoint, validation, start-up or its first steps),
the job has stalled: the ranks that issued the fewest collectives are behind, the others wait for
them in a collective. Rank 0 names them in the failure record; every rank writes its threads'
Python stacks to the log, then ends with ``EXIT_STALLED``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch.distributed as dist

from distalex import signal_watch
from distalex.parallel.agent import end_stranded_agent
from distalex.parallel.lines import clock, log_line, where_am_i

HEARTBEAT_S = 1.0
"""Seconds between beats; also how soon every rank learns of a failure record."""
LEAVE_WAIT_S = 10.0
"""How long a normal exit waits for the beat to finish a store call in flight (milliseconds while
the store answers)."""
EXIT_PEER_LOST = 4
"""Exit status of a rank that ends because a peer, its host or the store is gone."""
EXIT_STALLED = 6
"""Exit status of a rank that ends because the job stalled: no rank finished a training step for
``progress_timeout_s`` while every rank's process lived."""
WARMUP_STEPS = 2
"""The first training steps of a process are not watched: they compile and allocate."""
FAIL_WRITE_S = 3.0
"""How long ``fail`` waits for the store to take the failure record before treating it as lost."""
ON_END_S = 5.0
"""How long ``Liveness.on_end`` (closing the MLflow run) may take before the process ends anyway."""


class Progress:
    """The main thread's training steps, as the beat thread sees them.

    The training loop calls ``watch`` before its first step, ``step_done`` after each one and
    ``unwatch`` on its way out; what is slow on purpose within it (a checkpoint write) runs inside
    ``paused()``. Nothing else is watched: start-up, an epoch's loader start, validation, the
    epoch-end save, the export, nor the first WARMUP_STEPS steps of the process. The main thread
    writes, the beat thread reads: plain attributes, each written in one step under the GIL.
    """

    def __init__(self):
        self.steps = 0
        """Training steps this process has finished."""
        self.step = 0
        """The run's step count after the last of them."""
        self._watching = False
        self._since = time.monotonic()

    def watch(self) -> None:
        self._since = time.monotonic()
        self._watching = True

    def unwatch(self) -> None:
        self._watching = False

    def step_done(self, step: int) -> None:
        self.steps, self.step = self.steps + 1, step
        self._since = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        watching, self._watching = self._watching, False
        try:
            yield
        finally:
            self._since = time.monotonic()
            self._watching = watching

    def stuck_s(self) -> float | None:
        """Seconds since the main thread last finished a step, or None where it is not watched."""
        if not self._watching or self.steps < WARMUP_STEPS:
            return None
        return time.monotonic() - self._since


@dataclass
class _Seen:
    value: int
    since: float  # monotonic time the value was first seen
    since_wall: float


class Liveness:
    """This rank's heartbeat, its watch over two peers and its own progress, and the job's failure record.

    ``start`` it once every rank has joined the process group; ``fail`` when this rank fails;
    ``leave`` before a normal exit (its silence afterwards is no failure).
    """

    def __init__(self, store, prefix: str, rank: int, world_size: int, peer_timeout_s: float, store_addr: str,
                 progress: Progress | None = None, progress_timeout_s: float | None = None, groups: tuple = ()):
        self.rank, self.world_size, self.peer_timeout_s = rank, world_size, peer_timeout_s
        self.store_addr = store_addr
        self.progress, self.progress_timeout_s, self._groups = progress, progress_timeout_s, groups
        self._stuck_published = False
        # The world's store lives in rank 0's process (parallel.store): its exit takes the store,
        # and with it the failure record, away.
        self._holds_store = rank == 0
        self._store, self._prefix = store, prefix
        self._watched = sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})
        self._seen: dict[int, _Seen] = {}
        self._hosts: dict[int, str] = {}
        self._last_answer, self._last_answer_wall = time.monotonic(), time.time()
        self._leaving = threading.Event()
        self._ending = threading.Lock()
        self.ending = threading.Event()
        """Set when a thread here has begun to end this rank (it ends the process)."""
        self.failure_told = False
        self.on_end = None
        """Called (at most ON_END_S) before a rank ends here: e.g. marking the MLflow run FAILED."""
        self._threads = [threading.Thread(target=self._beat, name="distalex-beat", daemon=True),
                         threading.Thread(target=self._judge, name="distalex-judge", daemon=True)]

    @classmethod
    def start(cls, rank: int, world_size: int, peer_timeout_s: float, token: str, store_at: tuple[str, int],
              progress: Progress | None = None, progress_timeout_s: float | None = None, groups: tuple = ()) -> Liveness:
        """Connect a store client of its own to the world's store at ``store_at`` (host, port) and
        start beating. ``token``, the same on every rank of this world, keeps a restarted world's
        keys apart. With ``progress`` and ``progress_timeout_s``, also watch for a stall; ``groups``:
        the process groups whose collectives show which rank is behind."""
        host, port = store_at
        store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=peer_timeout_s))
        live = cls(store, f"distalex/liveness/{token}/", rank, world_size, peer_timeout_s, f"{host}:{port}",
                   progress, progress_timeout_s, groups)
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
                if self.progress is not None and self.progress_timeout_s is not None:
                    self._watch_progress()
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
        self._end(EXIT_PEER_LOST, reason, gone=(peer,))

    def _watch_progress(self) -> None:
        """Publish where this rank is while it is stuck; on rank 0, decide whether the job stalled."""
        stuck, key = self.progress.stuck_s(), f"stuck/{self.rank}"
        if stuck is None or stuck < self.progress_timeout_s / 2:
            if self._stuck_published:
                self._store.delete_key(self._key(key))
                self._stuck_published = False
            return
        self._set(key, f"{self.progress.step}\t{self._collectives()}")
        self._stuck_published = True
        if self.rank == 0 and stuck >= self.progress_timeout_s:
            self._judge_stall(stuck)

    def _collectives(self) -> int:
        """Collectives this rank has issued on its process groups (their sequence numbers)."""
        return sum(group._get_sequence_number_for_group() for group in self._groups)

    def _judge_stall(self, stuck: float) -> None:
        keys = [self._key(f"stuck/{r}") for r in range(self.world_size)]
        if not self._store.check(keys):
            return  # a rank is making progress, or busy outside its training steps
        where = [tuple(int(n) for n in v.decode().split("\t")) for v in self._store.multi_get(keys)]
        behind = min(where)
        laggards = [r for r, w in enumerate(where) if w == behind]
        step, limit = behind[0] + 1, f"parallel.progress_timeout_s={self.progress_timeout_s:g}"  # the step it is in
        if len(laggards) < self.world_size:
            names = ", ".join(self._who(r) for r in laggards[:4]) + (f" and {len(laggards) - 4} more" if len(laggards) > 4 else "")
            reason = (f"{names} made no progress for {stuck:.0f} s ({limit}): stuck in training step {step} "
                      f"while its process lives (a deadlock, a read that never returns, a stuck kernel), "
                      f"behind the other ranks, which wait for it in a collective ({behind[1]} collectives issued, "
                      f"they {max(where)[1]}); every rank's Python stack is in the log")
        else:
            reason = (f"no rank made progress for {stuck:.0f} s ({limit}): every rank stopped in training step {step} "
                      f"at the same collective (none is behind: a collective, device or link that does not complete); "
                      f"every rank's Python stack is in the log")
        self._record(EXIT_STALLED, reason)
        self._end(EXIT_STALLED, reason)

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

    def _end(self, code: int, reason: str, store_lost: bool = False, quiet: bool = False, gone: tuple = ()) -> None:
        """Print this rank's line and end the process now, from whichever thread found the cause.
        ``quiet``: the failing rank printed the cause already; one line per host repeats it. A
        stall writes this rank's stacks first. The process holding the store first waits (up to
        two beats) until the other ranks, but those ``gone``, have read the failure record and
        said so: its exit takes the store away; so its line comes last. After a stall every rank
        waits so, so that every rank's stacks are written while it still waits where it stuck."""
        if self.failure_told or self._leaving.is_set() or not self._ending.acquire(blocking=False):
            return  # this rank is failing or leaving on its own path
        self.ending.set()
        signal_watch.ending()  # the agent's SIGTERM, once another rank has ended, must not cut this short
        if code == EXIT_STALLED:
            dump_stacks(f"rank {self.rank} ({where_am_i()})")
        if self._holds_store and not store_lost:
            self._wait_for_the_others(self.world_size - 1 - len(gone))
        if not quiet or os.environ.get("LOCAL_RANK", "0") == "0":
            log_line(f"error (rank {self.rank}, {where_am_i()}): {reason}")
        if not self._holds_store and not store_lost:
            with contextlib.suppress(Exception):
                self._add("ended", 1)
            if code == EXIT_STALLED:  # an exit would break the collective another rank waits in, before its stacks
                self._wait_for_the_others(self.world_size - 1)
        if self.on_end is not None:
            last = threading.Thread(target=self.on_end, name="distalex-on-end", daemon=True)
            last.start()
            last.join(ON_END_S)
        if store_lost:
            end_stranded_agent()
        os._exit(code)

    def _wait_for_the_others(self, count: int) -> None:
        deadline = time.monotonic() + 2 * HEARTBEAT_S
        with contextlib.suppress(Exception):
            while self._add("ended", 0) < count and time.monotonic() < deadline:
                time.sleep(0.1)

    # ------------------------------------------------------------------ the main thread's calls

    def fail(self, code: int, reason: str, first=None) -> None:
        """This rank failed with ``reason``: call ``first`` (printing the line, say; from here another
        rank's failure record no longer ends this rank), then tell every rank, within FAIL_WRITE_S.
        If the store does not take it, the store's host is lost: the agent may be stranded too. If a
        thread here is already ending this rank on another rank's record, wait for it to."""
        if self.failure_told:
            return
        if not self._ending.acquire(blocking=False):
            threading.Event().wait()  # that thread ends the process
        self.failure_told = True
        if first is not None:
            first()
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

    def end_with_record(self) -> None:
        """For the main thread whose collective broke: if this rank is ending already, or the job has
        a failure record, end with its cause and status (a peer's exit broke the collective), never
        returning; else return."""
        if not self.ending.is_set():
            try:
                failed = self._add("failed", 0)
            except Exception:  # noqa: BLE001 - the store is gone too: the caller reports what it saw
                return
            if not failed:
                return
            self._end_for_record()
        threading.Event().wait()  # the thread that is ending this rank ends the process

    def leave(self) -> None:
        """A normal exit: mark this rank as left (peers stop watching it) and stop judging the store,
        which the first rank to exit may take with it."""
        try:
            self._set(f"left/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
        self._leaving.set()
        # Wait for the threads (they see _leaving within a store call): one still inside a store
        # call when the interpreter exits is unwound mid-C++ as it takes the GIL back, and
        # std::terminate aborts the process ("terminate called without an active exception"): a run
        # that finished would end with SIGABRT.
        for t in self._threads:
            if t is not threading.current_thread() and t.is_alive():
                t.join(LEAVE_WAIT_S)


def dump_stacks(who: str) -> None:
    """Every thread's Python stack on stderr but the calling helper thread's, the main thread's
    first, each line marked with ``who`` (the ranks of a host share its log, and may write at once)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main, me = threading.main_thread().ident, threading.get_ident()
    frames = sys._current_frames()
    lines = [f"Python stacks of {who}, pid {os.getpid()}, most recent call last:"]
    for ident in sorted(frames, key=lambda i: i != main):
        if ident != me or ident == main:
            lines.append(f"thread {names.get(ident, ident)}:")
            lines += [line for entry in traceback.format_stack(frames[ident]) for line in entry.rstrip("\n").split("\n")]
    sys.stderr.write("".join(f"[{who}] {line}\n" for line in lines))
    sys.stderr.flush()
