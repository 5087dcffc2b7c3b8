"""kasou.persist: states round-trip through msgpack, section files and migration frames
round-trip, and every damaged input (cut short, a bit flipped, a length or version edited,
wrong-typed state) is refused with a SnapshotFormatError that says what is wrong.

Hostile inputs are built here from the layout drawn in kasou.persist._sections' docstring, by
an encoder independent of the one under test.
"""

from __future__ import annotations

import os
import stat
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.errors import SnapshotError
from kasou.persist import (
    FORMAT_VERSION,
    MAX_FILE,
    MAX_FRAME,
    MAX_SECTION,
    MAX_SECTIONS,
    MIN_FORMAT_VERSION,
    STREAM_MAGIC,
    SnapshotFormatError,
    check_stream_hello,
    decode_state,
    encode_state,
    frame_header,
    pack_sections,
    read_frame,
    read_sections,
    stream_hello,
    unpack_sections,
    write_sections,
)

# -- sample states, shaped like the components' (plain data, nested states) ----------------


@dataclass(frozen=True)
class QueueState:
    index: int
    size: int
    ready: bool
    desc_gpa: int | None


@dataclass(frozen=True)
class DeviceState:
    kind: str
    features: int
    config: bytes
    queues: tuple[QueueState, ...]
    pending: QueueState | None = None


@dataclass(frozen=True)
class MachineState:
    vcpus: int
    msrs: tuple[tuple[int, int], ...]
    xsave: bytes
    device: DeviceState
    spare: DeviceState | None
    halted: bool = False


def queue(index: int, *, ready: bool = True) -> QueueState:
    return QueueState(index, 256, ready, 0x10000 * (index + 1) if ready else None)


SAMPLE = MachineState(
    vcpus=2,
    msrs=((0x10, 2**64 - 1), (0xC0000080, 0xD01), (0x174, 0)),
    xsave=bytes(range(256)) * 16,
    device=DeviceState(
        "virtio-blk", 1 << 32 | 1, b"\x00\x01\xff", (queue(0), queue(1, ready=False))
    ),
    spare=None,
    halted=True,
)


# -- a section file built by hand, field by field ------------------------------------------

MAGIC = b"KASOU\x00SN"


def entry(
    name: bytes, payload: bytes, *, length: int | None = None, crc: int | None = None
) -> bytes:
    """One section as the file lays it out: u16 name length, name, u64 length, u32 crc."""
    length = len(payload) if length is None else length
    crc = zlib.crc32(name + payload) if crc is None else crc
    return struct.pack("<H", len(name)) + name + struct.pack("<QI", length, crc) + payload


def build(
    entries: list[bytes],
    *,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    count: int | None = None,
) -> bytes:
    """A whole file around ``entries``, with a correct trailing CRC."""
    count = len(entries) if count is None else count
    body = magic + struct.pack("<II", version, count) + b"".join(entries)
    return body + struct.pack("<I", zlib.crc32(body))


SECTIONS = {
    "vcpu0": encode_state(SAMPLE),
    "kvm.vm": b"\x01\x02\x03",
    "empty": b"",
    "virtio-blk_0": b"x" * 40,
}


def builtins(state: object) -> Any:
    """``state`` as plain dicts and lists, bytes kept as bytes, to be edited by hand."""
    return msgspec.to_builtins(state, builtin_types=(bytes,))


def refused(data: bytes) -> str:
    """The message unpack_sections refuses ``data`` with."""
    with pytest.raises(SnapshotFormatError) as raised:
        unpack_sections(data, source="snap/state")
    message = str(raised.value)
    assert message.startswith("snap/state: ")
    assert "\n" not in message
    return message


# -- states ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        SAMPLE,
        MachineState(0, (), b"", DeviceState("", 0, b"", ()), None),
        MachineState(
            -1,
            ((0, -(2**63)),),
            b"\x00" * 4096,
            DeviceState("rng", 0, b"", (), pending=queue(7, ready=False)),
            spare=DeviceState("net", 3, b"\xff", (queue(0),), pending=queue(0)),
        ),
    ],
)
def test_a_state_round_trips_with_every_field_kind(state: MachineState) -> None:
    decoded = decode_state(encode_state(state), MachineState, what="machine")
    assert decoded == state
    assert type(decoded.device.queues) is tuple
    assert decoded.spare is None or type(decoded.spare) is DeviceState


queues = st.builds(
    QueueState,
    index=st.integers(0, 1023),
    size=st.integers(0, 2**16),
    ready=st.booleans(),
    desc_gpa=st.none() | st.integers(0, 2**64 - 1),
)
devices = st.builds(
    DeviceState,
    kind=st.text(max_size=20),
    features=st.integers(0, 2**64 - 1),
    config=st.binary(max_size=64),
    queues=st.lists(queues, max_size=4).map(tuple),
    pending=st.none() | queues,
)
machines = st.builds(
    MachineState,
    vcpus=st.integers(-(2**63), 2**64 - 1),
    msrs=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))).map(tuple),
    xsave=st.binary(max_size=512),
    device=devices,
    spare=st.none() | devices,
    halted=st.booleans(),
)


@given(machines)
def test_random_states_round_trip(state: MachineState) -> None:
    assert decode_state(encode_state(state), MachineState, what="machine") == state


def test_a_wrong_typed_field_names_the_section_and_the_field() -> None:
    data = encode_state(QueueState(index=1, size=2, ready=True, desc_gpa=None))
    edited = data.replace(b"\xa5ready\xc3", b"\xa5ready\x01")  # true -> 1
    assert edited != data
    with pytest.raises(SnapshotFormatError) as raised:
        decode_state(edited, QueueState, what="vcpu1")
    message = str(raised.value)
    assert message.startswith("vcpu1: ")
    assert "Expected `bool`, got `int`" in message
    assert "$.ready" in message


def test_state_of_another_component_is_refused_naming_the_section() -> None:
    with pytest.raises(SnapshotFormatError, match=r"^virtio-blk0: .*missing required field"):
        decode_state(encode_state(QueueState(1, 2, True, None)), MachineState, what="virtio-blk0")


def test_a_nested_wrong_type_is_located() -> None:
    state = builtins(SAMPLE)
    state["device"]["queues"][1]["size"] = "256"
    with pytest.raises(SnapshotFormatError, match=r"`\$\.device\.queues\[1\]\.size`"):
        decode_state(msgspec.msgpack.encode(state), MachineState, what="machine")


def test_a_missing_field_is_refused() -> None:
    state = builtins(SAMPLE)
    del state["xsave"]
    with pytest.raises(SnapshotFormatError, match=r"^machine: .*missing required field `xsave`"):
        decode_state(msgspec.msgpack.encode(state), MachineState, what="machine")


def test_a_field_the_type_does_not_declare_is_refused() -> None:
    state = builtins(SAMPLE)
    state["device"]["queues"][0]["avail_gpa"] = 4096
    with pytest.raises(SnapshotFormatError) as raised:
        decode_state(msgspec.msgpack.encode(state), MachineState, what="machine")
    assert "`$.device.queues[0].avail_gpa`" in str(raised.value)
    assert "does not know" in str(raised.value)


def test_a_field_with_a_default_may_be_absent() -> None:
    state = builtins(SAMPLE)
    del state["halted"], state["device"]["pending"]
    decoded = decode_state(msgspec.msgpack.encode(state), MachineState, what="machine")
    assert decoded.halted is False
    assert decoded.device.pending is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x85",
        b"\xde\xff\xff",
        encode_state(SAMPLE)[:-1],
        encode_state(SAMPLE) + b"\0",
    ],
)
def test_bytes_that_are_not_one_msgpack_state_are_refused(data: bytes) -> None:
    with pytest.raises(SnapshotFormatError, match=r"^machine: the saved state does not decode"):
        decode_state(data, MachineState, what="machine")


def test_a_string_that_is_not_utf8_is_refused() -> None:
    data = encode_state(DeviceState("blk", 0, b"", ())).replace(b"\xa3blk", b"\xa3\xe2lk")
    with pytest.raises(SnapshotFormatError, match=r"^virtio0: the saved state does not decode"):
        decode_state(data, DeviceState, what="virtio0")


def test_nesting_beyond_any_state_is_refused_not_a_crash() -> None:
    # A map with one unknown key whose value is arrays nested a million deep.
    data = b"\x81\xa5extra" + b"\x91" * 1_000_000 + b"\x90"
    with pytest.raises(SnapshotFormatError, match=r"^machine: .*nests too deeply"):
        decode_state(data, MachineState, what="machine")


# -- section files --------------------------------------------------------------------------


def test_sections_round_trip_in_order() -> None:
    assert list(unpack_sections(pack_sections(SECTIONS), source="s").items()) == list(
        SECTIONS.items()
    )


def test_the_packer_writes_the_documented_layout() -> None:
    entries = [entry(name.encode(), payload) for name, payload in SECTIONS.items()]
    assert pack_sections(SECTIONS) == build(entries)


names = st.from_regex(r"[a-z0-9._-]{1,64}", fullmatch=True)


@settings(max_examples=60)
@given(st.dictionaries(names, st.binary(max_size=300), max_size=12))
def test_random_section_maps_round_trip(sections: dict[str, bytes]) -> None:
    data = pack_sections(sections)
    assert list(unpack_sections(data, source="s").items()) == list(sections.items())


def test_no_sections_is_a_valid_file() -> None:
    assert unpack_sections(pack_sections({}), source="s") == {}


def test_every_truncation_is_refused_saying_where() -> None:
    data = pack_sections(SECTIONS)
    for size in range(len(data)):
        message = refused(data[:size])
        assert f"truncated at byte {size} (" in message, message
    assert "section 'vcpu0' needs 10 more" in refused(
        data[: 16 + 2 + 5 + 12 + len(SECTIONS["vcpu0"]) - 10]
    )


def test_every_single_bit_flip_is_refused() -> None:
    data = pack_sections({"vcpu0": b"\x01\x02", "kvm.vm": b"abc", "x": b""})
    for offset in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            refused(bytes(damaged))


def test_a_flipped_payload_bit_names_the_corrupt_section() -> None:
    data = bytearray(pack_sections(SECTIONS))
    data[data.index(b"xxxx")] ^= 0x10
    assert "section 'virtio-blk_0' is corrupt (CRC mismatch)" in refused(bytes(data))


def test_a_damaged_file_checksum_is_refused() -> None:
    data = bytearray(pack_sections(SECTIONS))
    data[-1] ^= 0x80
    assert "the file is corrupt (CRC mismatch)" in refused(bytes(data))


@pytest.mark.parametrize("length", [MAX_SECTION + 1, 2**63, 2**64 - 1])
def test_a_section_length_beyond_the_cap_is_refused_without_allocating_it(length: int) -> None:
    data = build([entry(b"vcpu0", b"abc", length=length)])
    tracemalloc.start()
    try:
        message = refused(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"section length {length} is beyond the cap of {MAX_SECTION}" in message
    assert peak < 64 * 1024


def test_a_section_count_beyond_the_cap_is_refused_without_allocating_it() -> None:
    data = build([entry(b"a", b"")], count=2**32 - 1)
    tracemalloc.start()
    try:
        message = refused(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"section count {2**32 - 1} is beyond the cap of {MAX_SECTIONS}" in message
    assert peak < 64 * 1024


def test_a_wrong_version_is_refused_naming_both_versions() -> None:
    message = refused(build([entry(b"vcpu0", b"")], version=7))
    assert "written by snapshot format version 7" in message
    assert f"this kasou reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}" in message
    assert "restore it with the kasou that wrote it" in message
    assert "version 0" in refused(build([], version=0))


def test_bad_magic_is_refused() -> None:
    assert refused(build([], magic=b"QFI\xfb\0\0\0\x03")).endswith(
        "not a kasou snapshot (bad magic)"
    )
    assert "bad magic" in refused(b"\x7fELF")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (b"", "a name of 0 bytes"),
        (b"a" * 65, "a name of 65 bytes"),
        (b"VCPU0", "b'VCPU0'"),
        (b"vcpu 0", "b'vcpu 0'"),
        (b"vcpu/0", "b'vcpu/0'"),
        ("vcpü".encode(), "b'vcp\\xc3\\xbc'"),
    ],
)
def test_bad_section_names_are_refused(name: bytes, problem: str) -> None:
    message = refused(build([entry(name, b"payload")]))
    assert "section 1 of 1 has" in message
    assert problem in message


def test_a_duplicate_section_is_refused() -> None:
    message = refused(build([entry(b"vcpu0", b"a"), entry(b"vcpu0", b"b")]))
    assert "section 'vcpu0' appears twice" in message


def test_bytes_after_the_checksum_are_refused() -> None:
    assert "4 bytes follow the last section" in refused(pack_sections(SECTIONS) + b"\0" * 4)


def test_data_beyond_the_file_cap_is_refused_unread() -> None:
    # bytes(n) is calloc'd: the pages are never touched, so this costs nothing.
    assert f"beyond the cap of {MAX_FILE}" in refused(bytes(MAX_FILE + 1))


@pytest.mark.parametrize(
    "sections",
    [
        {"Vcpu0": b""},
        {"": b""},
        {"a" * 65: b""},
        {"vcpu0": bytes(MAX_SECTION + 1)},
        {f"s{i}": b"" for i in range(MAX_SECTIONS + 1)},
        {f"s{i}": bytes(MAX_SECTION) for i in range(4)},
    ],
    ids=["uppercase", "empty-name", "long-name", "big-section", "too-many", "big-file"],
)
def test_the_packer_refuses_what_the_format_cannot_hold(sections: dict[str, bytes]) -> None:
    with pytest.raises(SnapshotError):
        pack_sections(sections)


def test_files_round_trip_and_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state"
    write_sections(path, SECTIONS)
    assert read_sections(path) == SECTIONS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_sections(path, {"only": b"1"})
    assert read_sections(path) == {"only": b"1"}
    assert sorted(os.listdir(tmp_path)) == ["state"]


def test_a_write_that_fails_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "state"
    with pytest.raises(SnapshotError, match=r"cannot write snapshot file .*missing-dir/state: "):
        write_sections(path, SECTIONS)
    assert os.listdir(tmp_path) == []


def test_reading_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"cannot read snapshot file .*/nothing: No such file"):
        read_sections(tmp_path / "nothing")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(SnapshotFormatError, match=r"not a regular file"):
        read_sections(path)


def test_a_file_beyond_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    with open(path, "wb") as file:
        file.truncate(MAX_FILE + 1)  # sparse: nothing is written
    with pytest.raises(SnapshotFormatError, match=rf"^{path}: {MAX_FILE + 1} bytes is beyond"):
        read_sections(path)


def test_a_damaged_file_is_refused_naming_its_path(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(pack_sections(SECTIONS)[:-3])
    with pytest.raises(SnapshotFormatError, match=rf"^{path}: truncated at byte"):
        read_sections(path)


# -- migration stream -------------------------------------------------------------------------


class Stream:
    """A received byte stream; ``recv_exactly`` raises EOFError past its end, as a socket
    reader would raise on a closed connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0
        self.asked: list[int] = []

    def recv_exactly(self, size: int) -> bytes:
        self.asked.append(size)
        if self.offset + size > len(self.data):
            raise EOFError(f"stream ended at byte {len(self.data)}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def frame(kind: int, payload: bytes | memoryview) -> bytes:
    return frame_header(kind, payload) + bytes(payload)


def test_frames_round_trip() -> None:
    ram = bytearray(b"\xaa" * 8192)
    payloads: list[tuple[int, bytes | memoryview]] = [
        (0, b""),
        (1, b"state"),
        (255, memoryview(ram)[4096:]),
        (7, bytes(range(256)) * 64),
    ]
    stream = Stream(b"".join(frame(kind, payload) for kind, payload in payloads))
    for kind, payload in payloads:
        assert read_frame(stream.recv_exactly) == (kind, bytes(payload))
    assert stream.offset == len(stream.data)


def test_every_bit_flip_in_a_frame_is_refused() -> None:
    data = frame(3, b"dirty page") + frame(4, b"x" * 64)
    first = len(frame(3, b"dirty page"))
    for offset in range(first):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            stream = Stream(bytes(damaged))
            (length,) = struct.unpack_from("<I", damaged, 1)
            if MAX_FRAME >= length > len(damaged) - 9:
                # A length grown past what was sent waits for bytes that never come: the
                # caller's end-of-stream error, not a frame accepted.
                with pytest.raises(EOFError):
                    read_frame(stream.recv_exactly)
            else:
                with pytest.raises(SnapshotFormatError):
                    read_frame(stream.recv_exactly)


def test_a_frame_with_a_bad_crc_is_refused() -> None:
    header = bytearray(frame_header(9, b"payload"))
    header[5] ^= 1
    with pytest.raises(SnapshotFormatError, match="frame of kind 9 is corrupt"):
        read_frame(Stream(bytes(header) + b"payload").recv_exactly)


def test_a_frame_length_beyond_the_cap_is_refused_before_its_payload_is_asked_for() -> None:
    stream = Stream(struct.pack("<BII", 1, MAX_FRAME + 1, 0) + b"\0" * 64)
    with pytest.raises(SnapshotFormatError, match=f"frame length {MAX_FRAME + 1} is beyond"):
        read_frame(stream.recv_exactly)
    assert stream.asked == [9]


def test_the_sender_refuses_frames_the_format_cannot_hold() -> None:
    with pytest.raises(SnapshotFormatError, match="beyond the cap"):
        frame_header(1, memoryview(bytes(MAX_FRAME + 1)))
    for kind in (-1, 256):
        with pytest.raises(SnapshotFormatError, match=f"frame kind {kind} is outside"):
            frame_header(kind, b"")


def test_a_truncated_frame_ends_in_the_callers_error() -> None:
    data = frame(2, b"0123456789")
    for size in range(len(data)):
        with pytest.raises(EOFError):
            read_frame(Stream(data[:size]).recv_exactly)


def test_a_short_read_is_refused_as_truncated() -> None:
    data = frame(2, b"0123456789")

    def short(size: int) -> bytes:
        return data[:size] if size == 9 else b"0123"

    with pytest.raises(SnapshotFormatError, match=r"truncated frame payload \(4 bytes of 10\)"):
        read_frame(short)


def test_the_hello_is_accepted_and_damage_refused() -> None:
    hello = stream_hello()
    assert hello.startswith(STREAM_MAGIC)
    check_stream_hello(hello)
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        check_stream_hello(b"GET / HTTP/1")
    with pytest.raises(SnapshotFormatError, match="not 12"):
        check_stream_hello(hello[:-1])
    future = STREAM_MAGIC + struct.pack("<I", FORMAT_VERSION + 6)
    with pytest.raises(SnapshotFormatError) as raised:
        check_stream_hello(future)
    assert f"version {FORMAT_VERSION + 6}" in str(raised.value)
    assert f"reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}" in str(raised.value)
