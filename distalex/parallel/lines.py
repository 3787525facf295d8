"""A process's one line on stderr, and the names in it: this host and a time of day."""

from __future__ import annotations

import datetime
import os
import socket
import sys


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
