"""A plain tar file's members, read as tarfile reads them at a fraction of its cost.

A shard written by make_shards, webdataset's ``TarWriter`` or GNU tar without long names is a plain
ustar (or v7) file: a 512-byte header per member, its data padded to 512 bytes. Reading those
headers here takes a few microseconds a member where tarfile takes about twenty, which matters
at thousands of samples a second per loader. Anything else raises ``NotPlain`` and ``read.py``
hands the file to tarfile.
"""

from __future__ import annotations

import functools
import tarfile


class NotPlain(Exception):
    """A header ``plain_members`` leaves to tarfile: pax or GNU extensions, sparse files, base-256
    numbers, or a first block that is no tar header (a compressed tar, or not a tar at all)."""


_TARFILE_EXTENSIONS = frozenset((b"L", b"K", b"S", b"x", b"g", b"X"))
_NO_DATA = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))  # links, devices, directories, fifos
_REGULAR = frozenset((b"0", b"\0", b"7"))
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))


def _octal(field: bytes) -> int:
    """tarfile's ``nti`` for the octal form (ValueError on a bad field); base-256 is left to tarfile."""
    if field[0] in (0o200, 0o377):
        raise NotPlain
    end = field.find(b"\0")
    return int(field[: end if end >= 0 else len(field)].decode("ascii").strip() or "0", 8)


def _name(field: bytes) -> str:
    end = field.find(b"\0")
    return field[: end if end >= 0 else len(field)].decode("utf-8", "surrogateescape")  # tarfile's defaults


def plain_members(f):
    """(name, regular?, read) of each member of an uncompressed ustar or v7 tar file, as tarfile
    reads them: the same names, the same end at a zero block, a short or a bad header (quietly, as
    tarfile does past the first member), and the same ReadError where a member's data runs past
    the end of the file. ``read()`` returns the member's data as a bytearray (writable: decoders
    take it without a copy). Raises NotPlain where tarfile must read the file."""
    end = f.seek(0, 2)
    offset = 0
    while True:
        if offset > end:
            raise tarfile.ReadError("unexpected end of data")
        f.seek(offset)
        header = f.read(512)
        if len(header) < 512 or header.count(0) == 512:
            if offset == 0:
                raise NotPlain
            return
        try:
            numbers = [_octal(header[a:b]) for a, b in _NUMBERS]
            checksum = _octal(header[148:156])
        except ValueError:
            numbers, checksum = None, None
        unsigned = 256 + sum(header[:148]) + sum(header[156:])
        if numbers is None or (checksum != unsigned and checksum != _signed_checksum(header)):
            if offset == 0:
                raise NotPlain
            return  # tarfile ends a file at a bad header after the first
        kind = header[156:157]
        if kind in _TARFILE_EXTENSIONS:
            raise NotPlain
        name, prefix, size = _name(header[0:100]), _name(header[345:500]), numbers[3]
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        if prefix:
            name = prefix + "/" + name
        data = offset + 512
        regular = kind in _REGULAR
        yield name, regular, functools.partial(_read_at, f, data, size)
        offset = data + (0 if kind in _NO_DATA else -(-size // 512) * 512)


def _signed_checksum(header: bytes) -> int:
    return 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])


def _read_at(f, offset: int, size: int) -> bytearray:
    data = bytearray(size)
    f.seek(offset)
    if f.readinto(data) != size:
        raise tarfile.ReadError("unexpected end of data")  # tarfile's words
    return data
