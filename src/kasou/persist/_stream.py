"""Framing for a migration stream: a hello, then frames of a kind and a payload.

A stream opens with the hello, 12 bytes: magic b"KASOU\\x00MG", then the format version
(u32, little-endian), checked by the same rule as a section file's. Every frame after it::

    offset  size  field
    0       1     kind (u8): what the payload is; the migration protocol assigns them
    1       4     payload length (u32, little-endian), at most MAX_FRAME
    5       4     crc32 of the kind, length and payload (bytes 0-4, then the payload)
    9             payload

This module frames and checks; it does not know what the kinds mean, and it does no socket
I/O: the receiver hands ``read_frame`` a ``recv_exactly`` that returns exactly the bytes asked
for or raises (end of stream is the caller's error to name).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from kasou.persist._format import FORMAT_VERSION, SnapshotFormatError, check_version

__all__ = [
    "MAX_FRAME",
    "STREAM_MAGIC",
    "check_stream_hello",
    "frame_header",
    "read_frame",
    "stream_hello",
]

MAX_FRAME = 64 << 20
STREAM_MAGIC = b"KASOU\x00MG"

_HELLO = struct.Struct("<8sI")  # magic, format version
_FRAME = struct.Struct("<BII")  # kind, payload length, crc32
_KIND_LENGTH = struct.Struct("<BI")  # the part of a frame header its CRC covers
_MAX_KIND = 0xFF

_STREAM = "migration stream"


def stream_hello() -> bytes:
    """The first bytes a migration source sends: magic and format version."""
    return _HELLO.pack(STREAM_MAGIC, FORMAT_VERSION)


def check_stream_hello(data: bytes) -> None:
    """Refuse a hello that is not kasou's, or of a format version this kasou does not read.

    ``data`` is the first ``len(stream_hello())`` bytes received. Raises
    ``SnapshotFormatError``.
    """
    if len(data) != _HELLO.size:
        raise SnapshotFormatError(
            f"{_STREAM}: the hello is {len(data)} bytes, not {_HELLO.size}: the source is "
            f"not a kasou migration source"
        )
    magic, version = _HELLO.unpack(data)
    if magic != STREAM_MAGIC:
        raise SnapshotFormatError(
            f"{_STREAM}: not a kasou migration stream (bad magic): check the address the "
            f"source migrates to"
        )
    check_version(
        version,
        where=_STREAM,
        wrote="sent in migration format",
        fix="migrate between kasou releases that share a format version",
    )


def frame_header(kind: int, payload: bytes | memoryview) -> bytes:
    """The header to send before ``payload`` (sent as is, so a view of guest RAM needs no
    copy). Raises ``SnapshotFormatError`` for a kind outside 0..255 or a payload above
    MAX_FRAME."""
    if not 0 <= kind <= _MAX_KIND:
        raise SnapshotFormatError(f"frame kind {kind} is outside 0 to {_MAX_KIND}")
    length = memoryview(payload).nbytes
    if length > MAX_FRAME:
        raise SnapshotFormatError(
            f"a frame of {length} bytes is beyond the cap of {MAX_FRAME}: split the payload"
        )
    crc = zlib.crc32(payload, zlib.crc32(_KIND_LENGTH.pack(kind, length)))
    return _FRAME.pack(kind, length, crc)


def read_frame(recv_exactly: Callable[[int], bytes]) -> tuple[int, bytes]:
    """Receive one frame: ``(kind, payload)``. The length is checked against MAX_FRAME
    before the payload is asked for. Raises ``SnapshotFormatError`` for a bad length or CRC;
    whatever ``recv_exactly`` raises passes through."""
    header = _exactly(recv_exactly, _FRAME.size, "frame header")
    kind, length, crc = _FRAME.unpack(header)
    if length > MAX_FRAME:
        raise SnapshotFormatError(
            f"{_STREAM}: frame length {length} is beyond the cap of {MAX_FRAME}: the stream "
            f"is corrupt"
        )
    payload = _exactly(recv_exactly, length, "frame payload") if length else b""
    if zlib.crc32(payload, zlib.crc32(header[: _KIND_LENGTH.size])) != crc:
        raise SnapshotFormatError(
            f"{_STREAM}: frame of kind {kind} is corrupt (CRC mismatch): the stream is corrupt"
        )
    return kind, payload


def _exactly(recv_exactly: Callable[[int], bytes], size: int, what: str) -> bytes:
    data = recv_exactly(size)
    if len(data) != size:
        raise SnapshotFormatError(f"{_STREAM}: truncated {what} ({len(data)} bytes of {size})")
    return data
