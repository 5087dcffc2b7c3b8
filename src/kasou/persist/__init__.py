"""Encoding of saved VM state: component states, section files, migration stream frames.

This package owns every byte layout a snapshot or a migration stream has, apart from guest
memory's file (``kasou.memory.snapfile``). It knows nothing of what the states mean: each
component saves a frozen ``State`` dataclass of plain data and validates what it gets back.
A whole snapshot's state goes through three layers::

    VcpuState(...)  --encode_state-->  msgpack map   (a section's payload; _state)
    {"vcpu0": ..., "kvm.vm": ...}  --pack_sections-->  section file   (_sections)
    frame_header(kind, payload) + payload  (one frame of a migration stream; _stream)

Everything read back is untrusted input (a file can be cut short, bit-flipped or edited by
hand): lengths are checked against caps before anything is allocated, every section and
frame carries a CRC-32, and a bad input raises ``SnapshotFormatError`` (a ``SnapshotError``)
in one line that says what is wrong and what to do.

Versions: ``FORMAT_VERSION`` numbers this encoding, independently of kasou's release; a
kasou reads versions ``MIN_FORMAT_VERSION`` to ``FORMAT_VERSION`` and refuses others naming
both.
"""

from kasou.persist._format import FORMAT_VERSION, MIN_FORMAT_VERSION, SnapshotFormatError
from kasou.persist._sections import (
    MAX_FILE,
    MAX_SECTION,
    MAX_SECTIONS,
    pack_sections,
    read_sections,
    unpack_sections,
    write_sections,
)
from kasou.persist._state import decode_state, encode_state
from kasou.persist._stream import (
    MAX_FRAME,
    STREAM_MAGIC,
    check_stream_hello,
    frame_header,
    read_frame,
    stream_hello,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_FILE",
    "MAX_FRAME",
    "MAX_SECTION",
    "MAX_SECTIONS",
    "MIN_FORMAT_VERSION",
    "STREAM_MAGIC",
    "SnapshotFormatError",
    "check_stream_hello",
    "decode_state",
    "encode_state",
    "frame_header",
    "pack_sections",
    "read_frame",
    "read_sections",
    "stream_hello",
    "unpack_sections",
    "write_sections",
]
