"""The store a world's process groups meet in: a fresh one for every world.

gloo connects a process group through the store: each rank writes the address of its end of each
pair (key ``<group>/<rank>/<peer>``), reads its peer's and connects. Under torchrun's default
(``TORCHELASTIC_USE_AGENT_STORE=True``, set unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) the
workers use a store served by the agent of node 0, and torch 2.14 keeps that store across
rendezvous rounds with no prefix per round: after a re-rendezvous (a lost or a joining host, a
restart) it still holds the previous world's addresses. A worker that gets there before its peer
reads the dead peer's address, is refused, and its round fails (seen on three hosts: two failed
rounds per heal, each costing torchrun's 30 s wait for the peer blocked in its own connect).

So where the agent's store is shared, rank 0 starts a store of its own on a free port (it dies
with the world, as torch's own does without sharing), with a fresh ``nonce`` in it, and writes
``port/nonce`` into the agent's store. The other ranks read that entry and take it once the store
it names answers with that nonce: an entry of a previous world names a store that is gone (or a
port now serving another store, without that nonce), and they read again.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid

import torch.distributed as dist

WORLD_STORE_KEY = "distalex/world-store"
"""The agent-store entry naming this world's own store: ``port/nonce``."""
NONCE_KEY = "distalex/nonce"
PROBE_S = 1.0
"""How long a rank tries to reach the store an entry names before it reads the entry again."""


def world_store(rank: int, world_size: int, timeout: datetime.timedelta) -> tuple[dist.Store | None, str, int]:
    """(store for ``init_process_group``, its host, its port). The store is None where torch's own
    (env://, MASTER_ADDR:MASTER_PORT) is fresh for every world already: no agent store is shared."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None, host, port
    agent = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)
        nonce = uuid.uuid4().hex
        store.set(NONCE_KEY, nonce)
        agent.set(WORLD_STORE_KEY, f"{store.port}/{nonce}")
        return store, host, store.port
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        own_port, nonce = agent.get(WORLD_STORE_KEY).decode().split("/")  # waits for the first world's rank 0
        try:
            # A plain connection first: TCPStore's own client retries a refused one and logs each try.
            socket.create_connection((host, int(own_port)), timeout=PROBE_S).close()
            store = dist.TCPStore(host, int(own_port), world_size, is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=PROBE_S))
            if store.get(NONCE_KEY).decode() == nonce:
                store.set_timeout(timeout)
                return store, host, int(own_port)
        except (OSError, RuntimeError, ValueError):  # refused, timed out, or not that store: a previous world's entry
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0's store for this world (named in the agent's store at {host}:{port}) did not "
                               f"answer within {timeout.total_seconds():g} s")
        time.sleep(0.2)
