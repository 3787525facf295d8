"""Progress of long work (training, make_shards, index): a tqdm bar on a terminal, plain lines in a file.

A tqdm bar written to a file (a SLURM log, ``make demo > log``) is a frame every 0.1 s: minutes of
training leave hundreds of KB of carriage returns, 90 epochs hundreds of MB. So when the stream is
not a terminal, ``progress`` returns a ``LineProgress`` that prints one plain line every
``interval_s`` seconds (and one when it closes):

    train: 1200/45000 steps (2.7%), 12.0 steps/s, 0:01:40 elapsed, 1:02:15 left, loss 6.5331, lr 1.00e-02, data 3%
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

DEFAULT_INTERVAL_S = 30.0
"""Seconds between plain progress lines when the output is not a terminal."""


def progress(total: int | None, desc: str, unit: str, initial: int = 0, interval_s: float = DEFAULT_INTERVAL_S,
             stream: TextIO | None = None, disable: bool = False, **tqdm_args):
    """A tqdm bar on a terminal, else a ``LineProgress``; both take ``update``, ``set_postfix``
    and ``close``."""
    stream = sys.stderr if stream is None else stream
    if disable or not _is_terminal(stream):
        return LineProgress(total, desc, unit, initial, interval_s, stream, disable)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, **tqdm_args)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a file
        return False


class LineProgress:
    """Plain progress lines: at most one every ``interval_s`` seconds, plus one at ``close``."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
                 interval_s: float = DEFAULT_INTERVAL_S, stream: TextIO | None = None, disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval_s, self.disable = interval_s, disable
        self._stream = sys.stderr if stream is None else stream
        self._initial, self._start = initial, time.monotonic()
        self._last = self._start
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._write(now)

    def set_postfix(self, refresh: bool = True, **fields) -> None:
        """The numbers shown after the counts (``loss=..., lr=...``), kept for the next line."""
        self._postfix = ", ".join(f"{k} {v}" for k, v in fields.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._initial:
                self._write(time.monotonic())

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.1f}%)" if self.total
                 else f"{self.n} {self.unit}s"]
        parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_clock((self.total - self.n) / rate)} left")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self, now: float) -> None:
        if self.disable:
            return
        self._stream.write(self.line(now) + "\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
