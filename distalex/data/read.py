"""Reading WebDataset tar shards from anywhere: what a sample is, opening URLs, retries.

A shard is a tar stream. Its members are grouped into samples by webdataset's rule: the key is the
member's path up to the first dot of its base name, the extension is the rest, lower-cased, and the
members of one sample are adjacent. Members whose base name starts with ``__`` are metadata and
ignored; a member with no dot in its base name belongs to no sample: it is skipped and counted.
Sample positions (0, 1, ... per shard) count keys, whatever the sample holds, so the per-shard
counts of ``_info.json`` (from make_shards or ``distalex.data.index``) fix every position.

A sample is used when it has an image (``jpg``, ``jpeg``, ``png`` or ``webp``; the first of these
present) and a label: ``cls`` (an integer in ASCII) or, without it, the ``data.label_key`` entry
of a ``json`` member. Other members are ignored.

URLs: a local path (or ``file://``) is read with seeks over the samples before a segment;
``pipe:COMMAND`` runs the command and reads its stdout (webdataset's ``gopen``); ``http(s)://``
goes through ``curl``; any other scheme (``s3://``, ``gs://``, ...) through fsspec
(``pip install 'distalex[remote]'`` plus the store's fsspec backend, e.g. s3fs), else through
webdataset's own handlers. A stream cannot seek, so a remote reader reaches the start of its
segment by reading. Every remote stream is opened and read on a thread of its own (``StallGuard``):
when it delivers no byte for ``data.stall_timeout_s`` the read fails, whatever the scheme. A remote
read that fails, stalls or ends early is retried from where it stopped (``data.retries`` times,
waiting ``data.retry_wait_s`` doubled each time); then the rest of the segment is counted as skipped.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import queue
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import Pipe, gopen, gopen_schemes

from distalex.data.tar import NotPlain, plain_members

try:
    import fsspec
except ImportError:  # optional: pip install 'distalex[remote]'
    fsspec = None

log = logging.getLogger("distalex.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "json")
SAMPLE_FIELDS = frozenset(IMAGE_EXTS + LABEL_EXTS)
"""The members a training or validation sample needs; others are not read."""
PIPE_BUFFER = 1 << 20

OnSkip = Callable[[int, str], None]
"""on_skip(samples, reason): called for samples (or stray members) that are skipped."""


class CorruptImage(ValueError):
    """A sample that cannot be used: no image or no label, a bad label, or image bytes that do not decode."""


@dataclass(frozen=True)
class Segment:
    """Samples [begin, end) of one shard, in the order they are stored."""

    url: str
    begin: int
    end: int


@dataclass(frozen=True)
class ReadPolicy:
    """How hard a remote read tries (``data.retries``, ``data.retry_wait_s``, ``data.stall_timeout_s``)."""

    retries: int = 3
    wait_s: float = 1.0
    stall_s: float = 60.0

    @classmethod
    def of(cls, data_cfg) -> "ReadPolicy":
        return cls(data_cfg.retries, data_cfg.retry_wait_s, data_cfg.stall_timeout_s)


# ------------------------------------------------------------------ names


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member by webdataset's rule; None when its base name has no dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return None
    return (head + "/" if head else "") + stem, ext.lower()


def is_remote(url: str) -> bool:
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


def longest_stall_s(data_cfg) -> float:
    """The longest a training step may wait for a batch whose read stalls (``data.train_shards``
    remote: every try stalls, with the waits between them; local: 0, never timed out)."""
    if not is_remote(data_cfg.train_shards):
        return 0.0
    policy = ReadPolicy.of(data_cfg)
    return (policy.retries + 1) * policy.stall_s + policy.wait_s * (2**policy.retries - 1)


def local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url2pathname(urlparse(url).path)
    return None if is_remote(url) else url


# ------------------------------------------------------------------ opening


def _scheme(url: str) -> str:
    return "pipe" if url.startswith("pipe:") else urlparse(url).scheme


def _fsspec_protocol(scheme: str) -> bool:
    """True when fsspec is installed and knows the scheme (its backend may still be missing), including
    filesystems registered at run time (``fsspec.register_implementation``)."""
    return fsspec is not None and (scheme in fsspec.available_protocols() or scheme in fsspec.registry)


def check_readable(urls: list[str], what: str) -> None:
    """Raise ValueError (one line) when a URL's scheme has nothing installed to read it."""
    for scheme in sorted({_scheme(u) for u in urls if is_remote(u)}):
        example = next(u for u in urls if is_remote(u) and _scheme(u) == scheme)
        if scheme in ("http", "https"):
            if shutil.which("curl") is None:
                raise ValueError(f"{what}: {example}: reading http(s) shards needs curl on PATH")
        elif scheme != "pipe" and _fsspec_protocol(scheme):
            try:
                fsspec.get_filesystem_class(scheme)
            except ImportError as e:
                raise ValueError(f"{what}: {example}: {e}") from None
        elif scheme != "pipe" and scheme not in gopen_schemes:
            raise ValueError(f"{what}: {example}: no reader for {scheme}:// (pip install 'distalex[remote]' for fsspec)")


def _curl(url: str) -> list[str]:
    # No curl --retry: the reader retries itself, a bounded number of times, from the last sample;
    # and no curl timeouts: StallGuard times every remote stream the same way.
    return ["curl", "--fail", "--silent", "--show-error", "--location", url]


def _open_remote(url: str):
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        return Pipe(_curl(url), mode="rb", bufsize=PIPE_BUFFER)
    if scheme != "pipe" and _fsspec_protocol(scheme):
        return fsspec.open(url, "rb").open()
    return gopen(url, "rb", bufsize=PIPE_BUFFER)


STALL_CHUNK = 1 << 18
"""Bytes a StallGuard asks the stream for at a time (a pipe returns what it has, up to this)."""


class StallGuard(io.RawIOBase):
    """A remote stream opened and read on a thread of its own, so that no read waits longer than
    ``stall_s`` for a byte (``data.stall_timeout_s``): one that does raises OSError naming the URL.

    Closing it ends the stream (a command behind it is killed), which also ends a thread blocked in
    a read; a backend read that ignores the close leaves only that daemon thread waiting.
    """

    def __init__(self, url: str, stall_s: float, opener=_open_remote):
        super().__init__()
        self.url, self.stall_s = url, stall_s
        self._chunks: queue.Queue = queue.Queue(maxsize=8)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._stream = None
        self._pending, self._eof = b"", False
        threading.Thread(target=self._pump, args=(opener,), daemon=True, name="distalex-remote-read").start()

    def _pump(self, opener) -> None:
        stream = None
        try:
            stream = opener(self.url)
            with self._lock:
                self._stream = stream
            raw = stream.stream if isinstance(stream, Pipe) else stream  # Pipe.read would wait for a full chunk
            read = getattr(raw, "read1", None) or raw.read
            while not self._closing.is_set():
                data = read(STALL_CHUNK)
                if not data and isinstance(stream, Pipe) and stream.proc.wait() != 0:  # e.g. curl --fail
                    command = stream.proc.args if isinstance(stream.proc.args, str) else stream.proc.args[0]
                    raise OSError(f"{command} exited with status {stream.proc.returncode}")
                self._put(("data", data))
                if not data:
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the reader's thread by readinto
            self._put(("error", e))
        finally:
            if stream is not None:  # here, not in close(): closing a pipe another thread reads would wait for it
                _close_quietly(stream)

    def _put(self, item) -> None:
        while not self._closing.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending and not self._eof:
            try:
                kind, data = self._chunks.get(timeout=self.stall_s)
            except queue.Empty:
                raise OSError(f"{self.url}: no data for {self.stall_s:g} s (data.stall_timeout_s)") from None
            if kind == "error":
                raise data
            self._pending, self._eof = data, not data
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        """End the stream: a command behind it is killed, which ends the reader thread's read."""
        self._closing.set()
        with self._lock:
            stream = self._stream
        if isinstance(stream, Pipe):
            if stream.proc.poll() is None:
                stream.proc.kill()
        elif stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a backend that cannot close now is closed again by the reader
                pass
        super().close()


@contextmanager
def open_url(url: str, stall_s: float = 60.0):
    """(binary stream, seekable) of a shard or file; a remote one is a ``StallGuard``, ended on exit."""
    path = local_path(url)
    if path is not None:
        with open(path, "rb") as f:
            yield f, True
        return
    stream = StallGuard(url, stall_s)
    try:
        yield stream, False
    finally:
        stream.close()


def _close_quietly(stream) -> None:
    """Close a stream; a command still writing is killed (stopping early is not its failure)."""
    if isinstance(stream, Pipe):
        if stream.proc.poll() is None:
            stream.proc.kill()
        stream.stream.close()
        stream.status = stream.proc.wait()  # its stream is closed, so Pipe.__del__ does nothing more
    else:
        stream.close()


def read_bytes(url: str, stall_s: float = 60.0) -> bytes:
    """A whole small file (``_info.json``, the mean image) from a path or URL."""
    with open_url(url, stall_s) as (f, _):
        return f.read()


# ------------------------------------------------------------------ tar -> samples


def tar_samples(
    url: str, stream, seekable: bool, first: int, last: int, fields: Container[str], on_skip: OnSkip
) -> Iterator[tuple[int, str, dict[str, bytes | None]]]:
    """(position, key, {extension: bytes}) of samples first <= position < last of one tar stream.

    Members whose extension is not in ``fields`` appear with None (not read). A seekable file
    passes over unread members by seeking; a stream reads through them. A plain tar file is read
    by ``plain_members`` (a few microseconds a member instead of tarfile's twenty), anything else,
    and a file where that reader meets a header it leaves to tarfile, by tarfile.
    """
    if seekable:
        done = first
        try:
            for index, key, members in _samples(url, plain_members(stream), first, last, fields, on_skip):
                yield index, key, members
                done = index + 1
            return
        except NotPlain:
            stream.seek(0)
            first = done  # tarfile goes on from the first sample not yet yielded
    with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tf:
        yield from _samples(url, _tarfile_members(tf), first, last, fields, on_skip)


def _samples(url: str, members, first: int, last: int, fields: Container[str], on_skip: OnSkip):
    """Group ``(name, regular?, read)`` members into samples (see tar_samples)."""
    index, key, sample = -1, None, {}
    for name, regular, read in members:
        if not regular or name.rpartition("/")[2].startswith("__"):
            continue
        parts = split_member(name)
        if parts is None:
            if first <= max(index, 0) < last:
                on_skip(1, f"{url}: member {name!r} has no extension, so it belongs to no sample")
            continue
        k, ext = parts
        if k != key:
            if first <= index:
                yield index, key, sample
            index, key, sample = index + 1, k, {}
            if index >= last:
                return
        if index < first:
            continue
        sample[ext] = read() if ext in fields else None
    if first <= index < last:
        yield index, key, sample


def _tarfile_members(tf: tarfile.TarFile):
    for ti in tf:
        tf.members = []  # keep the member list from growing over a large shard
        yield ti.name, ti.isreg(), functools.partial(_extract, tf, ti)


def _extract(tf: tarfile.TarFile, ti: tarfile.TarInfo) -> bytes:
    data = tf.extractfile(ti).read()
    if len(data) != ti.size:
        raise tarfile.ReadError(f"{ti.name}: short read")
    return data


def read_segment(
    seg: Segment, on_skip: OnSkip, policy: ReadPolicy = ReadPolicy(), fields: Container[str] = SAMPLE_FIELDS
) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, members) for samples seg.begin .. seg.end - 1 of a shard.

    A local file that ends or breaks early loses the rest of the segment; a remote one is
    reopened from the first sample not yet yielded, up to ``policy.retries`` times. Samples
    lost in the end are reported once through ``on_skip(lost, reason)``.
    """
    done, tries = seg.begin, 0
    while done < seg.end:
        try:
            with open_url(seg.url, policy.stall_s) as (stream, seekable):
                for index, key, members in tar_samples(seg.url, stream, seekable, done, seg.end, fields, on_skip):
                    yield key, members
                    done = index + 1
            reason = "tar ended early (truncated?)"
        except (OSError, EOFError, tarfile.TarError) as e:
            reason = f"{type(e).__name__}: {e}"
        if done >= seg.end or not is_remote(seg.url) or tries >= policy.retries:
            break
        tries += 1
        wait = policy.wait_s * 2 ** (tries - 1)
        log.warning("%s: %s; retry %d of %d from sample %d in %.1f s", seg.url, reason, tries, policy.retries, done, wait)
        time.sleep(wait)
    if done < seg.end:
        on_skip(seg.end - done, f"{seg.url}: samples {done}..{seg.end - 1} lost: {reason}")


# ------------------------------------------------------------------ samples -> (image, label)


def sample_label(key: str, members: dict[str, bytes | None], label_key: str = "label") -> int | None:
    """The integer label of a sample (``cls``, else ``json[label_key]``); None when it has neither."""
    if members.get("cls") is not None:
        try:
            return int(members["cls"])
        except ValueError:
            raise CorruptImage(f"sample {key!r}: cls {bytes(members['cls'][:20])!r} is not an integer") from None
    if members.get("json") is None:
        return None
    try:
        obj = json.loads(members["json"])
    except ValueError as e:
        raise CorruptImage(f"sample {key!r}: json member is not valid JSON ({e})") from None
    value = obj.get(label_key) if isinstance(obj, dict) else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CorruptImage(f"sample {key!r}: json has no integer {label_key!r} (data.label_key)")
    return value


def parse_sample(
    key: str, members: dict[str, bytes | None], label_key: str = "label", num_classes: int | None = None
) -> tuple[bytes, int]:
    """(image bytes, label) of a raw sample, or CorruptImage naming what is wrong."""
    image = next((members[e] for e in IMAGE_EXTS if members.get(e) is not None), None)
    label = sample_label(key, members, label_key)
    if image is None or label is None:
        raise CorruptImage(
            f"sample {key!r} has {sorted(members)}: needs an image ({'/'.join(IMAGE_EXTS)}) "
            f"and a label (cls, or json with {label_key!r})"
        )
    if num_classes is not None and not 0 <= label < num_classes:
        raise CorruptImage(f"sample {key!r}: label {label} outside 0..{num_classes - 1}")
    return image, label


def count_samples(url: str, policy: ReadPolicy = ReadPolicy()) -> int:
    """Samples in a shard, by reading its tar headers (a stream is read through)."""
    n = 0
    with open_url(url, policy.stall_s) as (stream, seekable):
        for _ in tar_samples(url, stream, seekable, 0, 1 << 62, (), lambda n, reason: None):
            n += 1
    return n


def shard_name(url: str) -> str:
    """The name ``_info.json`` lists a shard under: its file name."""
    return os.path.basename(url.rstrip("/"))
