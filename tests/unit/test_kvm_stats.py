"""KVM's binary statistics parser against stats files built here, byte for byte, in the layout
of Documentation/virt/kvm/api.rst "KVM_GET_STATS_FD": what it reads, and what it refuses or
skips when the sizes and names in the file cannot be right."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.errors import HostError, KvmError
from kasou.kvm import bindings as b
from kasou.kvm.stats import KvmStats, exit_counts, open_stats, parse_layout

_HEADER = struct.Struct("=6I")  # struct kvm_stats_header
_DESC = struct.Struct("=IhHII")  # struct kvm_stats_desc, before its name
NAME_SIZE = 48  # KVM_STATS_NAME_SIZE
SECONDS_NS = b.KVM_STATS_UNIT_SECONDS  # with exponent -9: nanoseconds


class Stat(NamedTuple):
    name: bytes  # written into the name field as is (a test may leave out the NUL)
    values: Sequence[int]
    flags: int = b.KVM_STATS_TYPE_CUMULATIVE
    exponent: int = 0
    offset: int | None = None  # byte offset in the data block; next free one if None
    size: int | None = None  # u64 count claimed; len(values) if None


def stats_file(
    stats: Sequence[Stat], *, name_size: int = NAME_SIZE, identity: bytes = b"kvm-1/vcpu-0"
) -> bytes:
    """A stats file: header, id, descriptors, data, in the kernel's order."""
    id_offset = _HEADER.size
    desc_offset = id_offset + name_size
    data_offset = desc_offset + len(stats) * (_DESC.size + name_size)
    descriptors = bytearray()
    data = bytearray()
    free = 0
    for stat in stats:
        offset = free if stat.offset is None else stat.offset
        size = len(stat.values) if stat.size is None else stat.size
        descriptors += _DESC.pack(stat.flags, stat.exponent, size, offset, 0)
        descriptors += stat.name[:name_size].ljust(name_size, b"\0")
        end = offset + 8 * len(stat.values)
        data += bytes(max(0, end - len(data)))
        data[offset:end] = struct.pack(f"={len(stat.values)}Q", *stat.values)
        free = max(free, end)
    header = _HEADER.pack(0, name_size, len(stats), id_offset, desc_offset, data_offset)
    return header + identity.ljust(name_size, b"\0") + bytes(descriptors) + bytes(data)


def reader(blob: bytes) -> Callable[[int, int], bytes]:
    """``read(offset, length)`` on ``blob``, short at its end like ``pread``."""
    return lambda offset, length: blob[offset : offset + length]


VCPU = [
    Stat(b"exits", [1234]),
    Stat(b"io_exits", [300]),
    Stat(b"halt_exits", [7]),
    Stat(b"halt_wait_ns", [5_000_000], flags=SECONDS_NS, exponent=-9),
    Stat(
        b"halt_wait_hist",
        list(range(32)),
        flags=b.KVM_STATS_TYPE_LOG_HIST | SECONDS_NS,
        exponent=-9,
    ),
    Stat(b"insn_emulation", [99]),
    Stat(b"blocking", [1], flags=b.KVM_STATS_TYPE_INSTANT | b.KVM_STATS_UNIT_BOOLEAN),
    Stat(b"pf_taken", [12]),
]


def test_counters_and_histograms_are_read_from_their_offsets() -> None:
    layout = parse_layout(reader(stats_file(VCPU)))
    assert layout.id == "kvm-1/vcpu-0"
    assert [d.name for d in layout.descriptors] == [s.name.decode() for s in VCPU]
    wait = layout.descriptors[3]
    assert (wait.unit, wait.exponent, wait.histogram) == (b.KVM_STATS_UNIT_SECONDS, -9, False)
    assert layout.descriptors[4].histogram and layout.descriptors[4].size == 32
    assert layout.data_size == 8 * (7 + 32)
    blob = stats_file(VCPU)
    sample = layout.decode(blob[layout.data_offset : layout.data_offset + layout.data_size])
    assert sample.values == {
        "exits": 1234,
        "io_exits": 300,
        "halt_exits": 7,
        "halt_wait_ns": 5_000_000,
        "insn_emulation": 99,
        "blocking": 1,
        "pf_taken": 12,
    }
    assert sample.histograms == {"halt_wait_hist": tuple(range(32))}


def test_exit_counts_pick_the_exit_counters_by_reason() -> None:
    values = {
        "exits": 10,
        "io_exits": 3,
        "irq_window_exits": 1,
        "hypercalls": 2,
        "insn_emulation": 5,
        "pf_taken": 4,
        "halt_wait_ns": 900,
        "pages_4k": 6,
    }
    assert exit_counts(values) == {
        "all": 10,
        "io": 3,
        "irq_window": 1,
        "hypercall": 2,
        "emulation": 5,
        "page_fault": 4,
    }


def test_a_name_that_runs_past_its_field_is_skipped_and_the_rest_read() -> None:
    stats = [
        Stat(b"exits", [5]),
        Stat(b"x" * NAME_SIZE, [6]),  # fills the field: no terminating NUL
        Stat(b"halt_exits", [7]),
    ]
    layout = parse_layout(reader(stats_file(stats)))
    assert [d.name for d in layout.descriptors] == ["exits", "halt_exits"]


def test_descriptors_past_the_end_of_the_file_are_left_out() -> None:
    blob = stats_file(VCPU[:3])
    header = _HEADER.unpack_from(blob)
    # The header claims 3 descriptors; the file ends inside the third one's name.
    cut = header[4] + 2 * (_DESC.size + NAME_SIZE) + _DESC.size + 3
    layout = parse_layout(reader(blob[:cut]))
    assert [d.name for d in layout.descriptors] == ["exits", "io_exits"]


def test_values_past_a_short_data_block_are_left_out() -> None:
    blob = stats_file(VCPU)
    layout = parse_layout(reader(blob))
    data = blob[layout.data_offset : layout.data_offset + 8 * 5 + 3]  # 5 words and a bit
    sample = layout.decode(data)
    assert sample.values == {
        "exits": 1234,
        "io_exits": 300,
        "halt_exits": 7,
        "halt_wait_ns": 5_000_000,
    }
    assert sample.histograms == {}  # its 32 buckets start at word 4 and run past the end


@pytest.mark.parametrize(
    "bad",
    [
        Stat(b"unaligned", [1], offset=12),
        Stat(b"far_away", [1], offset=1 << 20),
        Stat(b"empty", [], size=0),
        Stat(b"exits", [9]),  # a second "exits"
        Stat(b"not a name", [1]),
        Stat(b"\xffbytes", [1]),
        Stat(b"", [1]),
    ],
    ids=lambda stat: stat.name.decode("ascii", "replace") or "nameless",
)
def test_an_unusable_descriptor_is_skipped(bad: Stat) -> None:
    layout = parse_layout(reader(stats_file([Stat(b"exits", [5]), bad])))
    assert [d.name for d in layout.descriptors] == ["exits"]
    assert layout.data_size == 8


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (stats_file(VCPU)[:20], "header is 20 bytes"),
        (stats_file(VCPU, name_size=0), "name size of 0"),
        (stats_file(VCPU[:1], name_size=1 << 20), f"name size of {1 << 20}"),
        (_HEADER.pack(0, NAME_SIZE, 1 << 30, 24, 72, 0), f"{1 << 30} statistics"),
    ],
    ids=["short-header", "no-name-size", "huge-name-size", "huge-count"],
)
def test_a_header_that_cannot_be_right_is_refused(blob: bytes, words: str) -> None:
    with pytest.raises(HostError, match="malformed") as caught:
        parse_layout(reader(blob))
    assert words in str(caught.value)
    assert "the VM itself is not affected" in str(caught.value)


@pytest.fixture
def stats_fd() -> Iterator[int]:
    """A file holding ``VCPU``'s stats, as the kernel's fd would."""
    fd = os.memfd_create("kvm-stats", os.MFD_CLOEXEC)
    os.write(fd, stats_file(VCPU))
    yield fd
    os.close(fd)


def test_kvm_stats_reads_descriptors_once_and_values_every_time(stats_fd: int) -> None:
    stats = KvmStats(os.dup(stats_fd))
    assert stats.read().values["exits"] == 1234
    layout = stats.layout
    exits = next(d for d in layout.descriptors if d.name == "exits")
    os.pwrite(stats_fd, struct.pack("=Q", 1300), layout.data_offset + exits.offset)
    os.pwrite(stats_fd, bytes(_HEADER.size), 0)  # a header read again now would be refused
    assert stats.read().values["exits"] == 1300
    assert stats.layout is layout
    stats.close()
    assert stats.fd == -1
    with pytest.raises(OSError):
        stats.read()


def test_a_malformed_file_raises_the_same_error_on_every_read() -> None:
    fd = os.memfd_create("kvm-stats", os.MFD_CLOEXEC)
    os.write(fd, stats_file(VCPU, name_size=0))
    stats = KvmStats(fd)
    try:
        with pytest.raises(HostError) as first:
            stats.read()
        with pytest.raises(HostError) as second:
            stats.read()
        assert first.value is second.value
    finally:
        stats.close()


class _Owner:
    """A vCPU fd stand-in whose KVM_GET_STATS_FD fails with ``error``."""

    def __init__(self, error: int) -> None:
        self.error = error

    def get_stats_fd(self) -> int:
        raise KvmError("KVM_GET_STATS_FD", self.error)


@pytest.mark.parametrize("code", [errno.ENOTTY, errno.EINVAL])
def test_a_kernel_without_binary_stats_gives_none(code: int) -> None:
    assert open_stats(_Owner(code)) is None


def test_other_failures_to_open_are_raised() -> None:
    with pytest.raises(KvmError, match="KVM_GET_STATS_FD"):
        open_stats(_Owner(errno.EMFILE))


@settings(max_examples=300, deadline=None)
@given(
    blob=st.one_of(
        st.binary(max_size=512),
        # A real file with bytes changed: the header mostly plausible, the rest not.
        st.builds(
            lambda changes: _changed(stats_file(VCPU), changes),
            st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 255)), max_size=16),
        ),
    )
)
def test_any_bytes_give_a_layout_or_a_host_error(blob: bytes) -> None:
    try:
        layout = parse_layout(reader(blob))
    except HostError:
        return
    assert layout.data_size <= 1 << 20
    sample = layout.decode(blob[layout.data_offset : layout.data_offset + layout.data_size])
    assert set(sample.values).isdisjoint(sample.histograms)


def _changed(blob: bytes, changes: list[tuple[int, int]]) -> bytes:
    data = bytearray(blob)
    for offset, value in changes:
        if offset < len(data):
            data[offset] = value
    return bytes(data)
