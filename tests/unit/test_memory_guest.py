"""Guest RAM (kasou.memory): sizes as users write them, and bounds-checked access by GPA."""

from __future__ import annotations

import ctypes
import os
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kasou.errors import GuestMemoryError
from kasou.memory import GuestMemory, format_size, parse_size

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
LOW = (0, 2 * MIB)  # RAM at 0 ...
HIGH = (4 * GIB, 1 * MIB)  # ... and more above a 4 GiB hole, as the x86 layout puts it


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1073741824", GIB),
        ("512M", 512 * MIB),
        ("512m", 512 * MIB),
        ("2G", 2 * GIB),
        ("1536K", 1536 * KIB),
        ("1T", 1 << 40),
        ("64MiB", 64 * MIB),
        ("64MB", 64 * MIB),
        (" 8 G ", 8 * GIB),
        (4096, 4096),
    ],
)
def test_parse_size_reads_counts_and_binary_units(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12X", "1.5G", "-1", "0x1000", "2 G B", "G2", "5Q"])
def test_parse_size_refuses_what_is_not_a_size_and_shows_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="512M"):
        parse_size(text)


def test_parse_size_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-4096)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1, "1"),
        (4095, "4095"),
        (KIB, "1K"),
        (1536 * KIB, "1536K"),
        (512 * MIB, "512M"),
        (2 * GIB, "2G"),
        (3 << 40, "3T"),
    ],
)
def test_format_size_picks_the_largest_exact_unit(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_then_parse_gives_the_size_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from("KMGT"))
def test_parse_multiplies_by_the_unit(count: int, unit: str) -> None:
    multiplier = {"K": KIB, "M": MIB, "G": GIB, "T": 1 << 40}[unit]
    assert parse_size(f"{count}{unit}") == count * multiplier


# --- guest memory ---------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.create([HIGH, LOW])  # given out of order: regions come back sorted
    yield ram
    ram.close()


def test_create_maps_each_region_at_its_gpa(memory: GuestMemory) -> None:
    assert [(r.gpa, r.size) for r in memory.regions] == [LOW, HIGH]
    assert memory.size == LOW[1] + HIGH[1]
    assert memory.regions[1].end == 4 * GIB + MIB
    # Fresh RAM reads as zeros, in both regions.
    assert memory.read(0, 16) == bytes(16)
    assert memory.read(HIGH[0] + HIGH[1] - 16, 16) == bytes(16)


def test_bytes_written_read_back_in_both_regions(memory: GuestMemory) -> None:
    memory.write(0x1000, b"low ram")
    memory.write(4 * GIB + 0x20, bytearray(b"high ram"))
    memory.write(0x3000, memoryview(b"from a view"))
    assert memory.read(0x1000, 7) == b"low ram"
    assert memory.read(4 * GIB + 0x20, 8) == b"high ram"
    assert memory.read(0x3000, 11) == b"from a view"
    # The two regions are separate: the same offset in the other region is untouched.
    assert memory.read(4 * GIB + 0x1000, 7) == bytes(7)


def test_write_takes_a_memoryview_of_any_item_size(memory: GuestMemory) -> None:
    words = array("I", [0x11223344, 0x55667788])
    memory.write(0x40, memoryview(words))
    assert memory.read(0x40, 8) == words.tobytes()


def test_view_is_zero_copy_and_writable(memory: GuestMemory) -> None:
    view = memory.view(0x2000, 4)
    view[:] = b"abcd"
    assert memory.read(0x2000, 4) == b"abcd"
    memory.write(0x2001, b"X")
    assert bytes(view) == b"aXcd"
    view.release()


def test_integers_are_little_endian(memory: GuestMemory) -> None:
    memory.write_int(0x100, 4, 0xDEADBEEF)
    assert memory.read(0x100, 4) == b"\xef\xbe\xad\xde"
    assert memory.read_int(0x100, 2) == 0xBEEF
    memory.write_int(4 * GIB, 8, (1 << 64) - 2)
    assert memory.read_int(4 * GIB, 8) == (1 << 64) - 2
    assert memory.read_int(4 * GIB + 7, 1) == 0xFF


def test_fill_sets_exactly_the_range(memory: GuestMemory) -> None:
    memory.write(0x500, bytes(range(1, 17)))
    memory.fill(0x504, 8, 0xAA)
    assert memory.read(0x500, 16) == bytes([1, 2, 3, 4]) + b"\xaa" * 8 + bytes([13, 14, 15, 16])
    memory.fill(0x500, 16)  # zero by default
    assert memory.read(0x500, 16) == bytes(16)


def test_host_address_is_where_the_view_lives(memory: GuestMemory) -> None:
    for gpa in (0x1234, 4 * GIB + 0x10):
        address = memory.host_address(gpa, 5)
        ctypes.memmove(address, b"hello", 5)  # as libc or KVM would write it
        assert memory.read(gpa, 5) == b"hello"
        memory.write(gpa, b"world")
        assert ctypes.string_at(address, 5) == b"world"
    assert memory.host_address(0x1001) == memory.host_address(0x1000) + 1


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (LOW[1] - 4, 8),  # straddles the end of low RAM
        (LOW[1], 1),  # just past low RAM: in the hole
        (3 * GIB, 4),  # deep in the hole
        (4 * GIB - 2, 4),  # straddles the start of high RAM
        (4 * GIB + MIB - 1, 2),  # straddles the end of high RAM
        (4 * GIB + MIB, 1),  # past the end of guest RAM
        (0, LOW[1] + HIGH[1]),  # the whole size, but not in one region
        (-1, 1),
        (0x1000, -1),
    ],
)
def test_accesses_outside_one_region_are_refused(memory: GuestMemory, gpa: int, size: int) -> None:
    accesses = [
        lambda: memory.read(gpa, size),
        lambda: memory.view(gpa, size),
        lambda: memory.read_int(gpa, size),
        lambda: memory.fill(gpa, size, 0xFF),
        lambda: memory.host_address(gpa, size),
    ]
    if size >= 0:
        assert not memory.contains(gpa, size)
        accesses.append(lambda: memory.write(gpa, bytes(size)))
        accesses.append(lambda: memory.write_int(gpa, size, 0))
    for access in accesses:
        with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
            access()


def test_a_refused_write_changes_nothing(memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        memory.write(LOW[1] - 2, b"abcd")
    assert memory.read(LOW[1] - 2, 2) == bytes(2)


def test_contains_matches_the_layout(memory: GuestMemory) -> None:
    assert memory.contains(0)
    assert memory.contains(0, LOW[1])
    assert memory.contains(4 * GIB, HIGH[1])
    assert not memory.contains(LOW[1] - 1, 2)
    assert not memory.contains(4 * GIB - 1)


@pytest.mark.parametrize(
    "layout", [[(0x800, 4096)], [(0, 100)], [(0, 0)], [(0, 8192), (4096, 8192)]]
)
def test_create_refuses_unaligned_empty_or_overlapping_regions(
    layout: list[tuple[int, int]],
) -> None:
    with pytest.raises(ValueError, match=r"page aligned|overlap"):
        GuestMemory.create(layout)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_memfd_backing_shares_pages_with_its_fd() -> None:
    before = _open_fds()
    memory = GuestMemory.create([LOW, HIGH], backing="memfd")
    try:
        for region in memory.regions:
            assert region.fd is not None
            assert "memfd:kasou-ram-" in os.readlink(f"/proc/self/fd/{region.fd}")
            assert os.fstat(region.fd).st_size == region.size
        memory.write(0x10, b"shared")
        memory.write(4 * GIB + 0x20, b"pages")
        # Another mapping of the fd (a snapshot writer, a migration sender) sees the writes.
        assert os.pread(memory.regions[0].fd, 6, 0x10) == b"shared"  # type: ignore[arg-type]
        assert os.pread(memory.regions[1].fd, 5, 0x20) == b"pages"  # type: ignore[arg-type]
        os.pwrite(memory.regions[0].fd, b"back", 0x100)  # type: ignore[arg-type]
        assert memory.read(0x100, 4) == b"back"
    finally:
        memory.close()
    assert _open_fds() == before


def test_close_releases_the_mappings() -> None:
    memory = GuestMemory.create([LOW, HIGH])
    region = memory.regions[0]
    view = memory.view(0, 4)
    view.release()  # views handed out are released before close
    memory.close()
    assert region.mapping.closed
    assert memory.regions == ()
    assert memory.size == 0
    with pytest.raises(GuestMemoryError):
        memory.read(0, 1)


# --- giving pages back to the host ------------------------------------------------------------

PAGE = 4096


def _resident_pages(memory: GuestMemory, gpa: int, size: int) -> int:
    """How many pages of ``[gpa, gpa + size)`` occupy host memory now (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    flags = ctypes.create_string_buffer(size // PAGE)
    if libc.mincore(memory.host_address(gpa, size), size, flags) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(byte & 1 for byte in flags.raw)


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_discard_gives_pages_back_and_they_read_zero(backing: str) -> None:
    memory = GuestMemory.create([LOW, HIGH], backing=backing)  # type: ignore[arg-type]
    try:
        for gpa in (0x10000, 4 * GIB + 0x4000):
            memory.fill(gpa, 8 * PAGE, 0x5A)
            assert _resident_pages(memory, gpa, 8 * PAGE) == 8
            assert memory.discard(gpa + 2 * PAGE, 4 * PAGE) == 4 * PAGE
            # Only the four pages left host memory; the pages around them kept their bytes.
            assert _resident_pages(memory, gpa, 8 * PAGE) == 4
            assert memory.read(gpa + 2 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
            assert memory.read(gpa, 2 * PAGE) == b"\x5a" * 2 * PAGE
            assert memory.read(gpa + 6 * PAGE, 2 * PAGE) == b"\x5a" * 2 * PAGE
        if backing == "memfd":
            # The shared object itself lost the pages: another mapping of the fd sees zeros.
            fd = memory.regions[0].fd
            assert fd is not None
            assert os.pread(fd, PAGE, 0x10000 + 2 * PAGE) == bytes(PAGE)
    finally:
        memory.close()


def test_discard_keeps_the_partial_pages_at_the_ends(memory: GuestMemory) -> None:
    memory.fill(0, 4 * PAGE, 0x77)
    # From the middle of page 0 to the middle of page 3: only pages 1 and 2 are whole.
    assert memory.discard(PAGE // 2, 3 * PAGE) == 2 * PAGE
    assert memory.read(0, PAGE) == b"\x77" * PAGE
    assert memory.read(PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert memory.read(3 * PAGE, PAGE) == b"\x77" * PAGE
    assert memory.discard(0x100, 0x200) == 0  # no whole page inside
    assert memory.read(0, PAGE) == b"\x77" * PAGE


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (LOW[1] - PAGE, 2 * PAGE),
        (LOW[1], PAGE),
        (3 * GIB, PAGE),
        (0, LOW[1] + HIGH[1]),
        (-PAGE, PAGE),
    ],
)
def test_discard_outside_one_region_is_refused_and_changes_nothing(
    memory: GuestMemory, gpa: int, size: int
) -> None:
    memory.fill(LOW[1] - PAGE, PAGE, 0x33)
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        memory.discard(gpa, size)
    assert memory.read(LOW[1] - PAGE, PAGE) == b"\x33" * PAGE
