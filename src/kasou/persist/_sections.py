"""The section file: named byte strings (one per component's encoded state) in one file.

Layout, little-endian::

    offset  size  field
    0       8     magic b"KASOU\\x00SN"
    8       4     format version (u32)
    12      4     section count (u32), at most MAX_SECTIONS
    16            per section, in file order:
                    2    name length (u16), 1 to 64
                    n    name: UTF-8 of [a-z0-9._-], unique in the file
                    8    payload length (u64), at most MAX_SECTION
                    4    crc32 of name + payload (zlib's CRC-32, ISO-HDLC)
                    p    payload
    end-4   4     crc32 of every byte before it

The file is at most MAX_FILE bytes. Guest memory is not here: it goes into its own file
(``kasou.memory.snapfile``), so this one stays small and is read whole.

A section file is untrusted input. The reader checks every length against the bytes that
remain and against its cap before it slices, so a hostile length never makes it allocate
more than the file holds; a file cut short says where, a flipped bit fails a CRC (CRC-32
detects every single-bit error), and nothing after the last section is tolerated.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

from kasou.errors import SnapshotError
from kasou.persist._format import FORMAT_VERSION, SnapshotFormatError, check_version

__all__ = [
    "MAX_FILE",
    "MAX_SECTION",
    "MAX_SECTIONS",
    "pack_sections",
    "read_sections",
    "unpack_sections",
    "write_sections",
]

MAX_SECTIONS = 4096
MAX_SECTION = 64 << 20
MAX_FILE = 256 << 20

_MAGIC = b"KASOU\x00SN"
_HEADER = struct.Struct("<8sII")  # magic, format version, section count
_NAME_LENGTH = struct.Struct("<H")
_ENTRY = struct.Struct("<QI")  # payload length, crc32(name + payload)
_CHECKSUM = struct.Struct("<I")
_NAME = re.compile(rb"[a-z0-9._-]{1,64}")
_MAX_NAME = 64

_DAMAGED = "the file is damaged: restore from an intact copy"


def pack_sections(sections: Mapping[str, bytes]) -> bytes:
    """Lay ``sections`` out as a section file, in the mapping's order.

    Raises ``SnapshotError`` for a name outside [a-z0-9._-]{1,64}, a payload above
    MAX_SECTION, more than MAX_SECTIONS sections or a result above MAX_FILE.
    """
    if len(sections) > MAX_SECTIONS:
        raise SnapshotError(
            f"a snapshot holds at most {MAX_SECTIONS} sections; {len(sections)} were given"
        )
    parts = [_HEADER.pack(_MAGIC, FORMAT_VERSION, len(sections))]
    size = _HEADER.size + _CHECKSUM.size
    for name, payload in sections.items():
        raw = name.encode()
        if not _NAME.fullmatch(raw):
            raise SnapshotError(
                f"section name {name!r} is not 1 to {_MAX_NAME} characters of a-z, 0-9, "
                f"'.', '_' and '-'"
            )
        if len(payload) > MAX_SECTION:
            raise SnapshotError(
                f"section '{name}' is {len(payload)} bytes, beyond the cap of {MAX_SECTION}"
            )
        crc = zlib.crc32(payload, zlib.crc32(raw))
        parts += [_NAME_LENGTH.pack(len(raw)), raw, _ENTRY.pack(len(payload), crc), payload]
        size += _NAME_LENGTH.size + len(raw) + _ENTRY.size + len(payload)
        if size > MAX_FILE:
            raise SnapshotError(
                f"the snapshot's sections add up to more than the cap of {MAX_FILE} bytes"
            )
    body = b"".join(parts)
    return body + _CHECKSUM.pack(zlib.crc32(body))


def unpack_sections(data: bytes, *, source: str) -> dict[str, bytes]:
    """The sections of the section file ``data``, in file order; ``source`` names it in
    errors (a path, "the migration stream"). Raises ``SnapshotFormatError``."""
    if len(data) > MAX_FILE:
        raise SnapshotFormatError(
            f"{source}: {len(data)} bytes is beyond the cap of {MAX_FILE} for a snapshot file"
        )
    reader = _Reader(data, source)
    if data[: len(_MAGIC)] != _MAGIC[: len(data)]:
        raise SnapshotFormatError(f"{source}: not a kasou snapshot (bad magic)")
    _, version, count = _HEADER.unpack(reader.take(_HEADER.size, "the header"))
    check_version(
        version,
        where=source,
        wrote="written by snapshot format",
        fix="restore it with the kasou that wrote it",
    )
    if count > MAX_SECTIONS:
        raise SnapshotFormatError(
            f"{source}: section count {count} is beyond the cap of {MAX_SECTIONS}: {_DAMAGED}"
        )
    sections: dict[str, bytes] = {}
    for index in range(count):
        label = f"section {index + 1} of {count}"
        (name_length,) = _NAME_LENGTH.unpack(reader.take(_NAME_LENGTH.size, label))
        if not 1 <= name_length <= _MAX_NAME:
            raise SnapshotFormatError(
                f"{source}: {label} has a name of {name_length} bytes, not 1 to {_MAX_NAME}: "
                f"{_DAMAGED}"
            )
        raw = bytes(reader.take(name_length, label))
        if not _NAME.fullmatch(raw):
            raise SnapshotFormatError(
                f"{source}: {label} has the name {raw!r}, not one of a-z, 0-9, '.', '_' "
                f"and '-': {_DAMAGED}"
            )
        name = raw.decode("ascii")
        label = f"section '{name}'"
        length, crc = _ENTRY.unpack(reader.take(_ENTRY.size, label))
        if length > MAX_SECTION:
            raise SnapshotFormatError(
                f"{source}: {label}: section length {length} is beyond the cap of "
                f"{MAX_SECTION}: {_DAMAGED}"
            )
        payload = reader.take(length, label)
        if zlib.crc32(payload, zlib.crc32(raw)) != crc:
            raise SnapshotFormatError(f"{source}: {label} is corrupt (CRC mismatch): {_DAMAGED}")
        if name in sections:
            raise SnapshotFormatError(f"{source}: {label} appears twice: {_DAMAGED}")
        sections[name] = bytes(payload)
    end = reader.offset
    (checksum,) = _CHECKSUM.unpack(reader.take(_CHECKSUM.size, "the file checksum"))
    if reader.offset != len(data):
        raise SnapshotFormatError(
            f"{source}: {len(data) - reader.offset} bytes follow the last section: {_DAMAGED}"
        )
    if zlib.crc32(memoryview(data)[:end]) != checksum:
        raise SnapshotFormatError(f"{source}: the file is corrupt (CRC mismatch): {_DAMAGED}")
    return sections


def write_sections(path: Path, sections: Mapping[str, bytes]) -> None:
    """Write ``sections`` to ``path`` durably: into a new file beside it, fsync, rename over
    ``path``, fsync the directory. A crash leaves the old file or the new one, never half.

    Raises ``SnapshotError`` naming the file and the system's reason.
    """
    data = pack_sections(sections)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # 0600: device state can hold what the guest was doing (console bytes, keys).
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass  # never created, or already renamed to ``path``
        raise SnapshotError(
            f"cannot write snapshot file {path}: {error.strerror or error}"
        ) from error


def read_sections(path: Path) -> dict[str, bytes]:
    """The sections of the section file at ``path``. A file above MAX_FILE is refused
    before it is read. Raises ``SnapshotError`` (``SnapshotFormatError`` for bad content)."""
    try:
        # O_NONBLOCK: a FIFO at ``path`` is refused below instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SnapshotFormatError(f"{path}: not a regular file, so not a kasou snapshot")
            if info.st_size > MAX_FILE:
                raise SnapshotFormatError(
                    f"{path}: {info.st_size} bytes is beyond the cap of {MAX_FILE} for a "
                    f"snapshot file"
                )
            # One byte past the cap: a file that grew after fstat is still refused.
            data = file.read(MAX_FILE + 1)
    except OSError as error:
        raise SnapshotError(
            f"cannot read snapshot file {path}: {error.strerror or error}"
        ) from error
    return unpack_sections(data, source=str(path))


class _Reader:
    """A cursor over section-file bytes that refuses to step past their end."""

    def __init__(self, data: bytes, source: str) -> None:
        self._view = memoryview(data)
        self._source = source
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        """The next ``size`` bytes (no copy); ``what`` names what they belong to."""
        missing = self.offset + size - len(self._view)
        if missing > 0:
            raise SnapshotFormatError(
                f"{self._source}: truncated at byte {len(self._view)} ({what} needs "
                f"{missing} more): the file was cut short; restore from an intact copy"
            )
        chunk = self._view[self.offset : self.offset + size]
        self.offset += size
        return chunk
