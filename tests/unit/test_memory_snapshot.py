"""Guest memory in snapshots and migration (kasou.memory): page bitmaps, the write log,
memory files written sparse and mapped back copy-on-write, diff files folded into a base."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.errors import HostError, SnapshotError
from kasou.memory import (
    GuestMemory,
    PageBitmap,
    file_offsets,
    merge_memory,
    save_memory,
)

PAGE = 4096
MIB, GIB = 1 << 20, 1 << 30
LOW = (0, 2 * MIB)  # 512 pages of RAM at 0 ...
HIGH = (4 * GIB, 1 * MIB)  # ... and 256 above the 4 GiB MMIO hole, as the x86 layout puts it
LAYOUT = (LOW, HIGH)
HIGH_OFFSET = LOW[1]  # where the high region starts in a memory file


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _data_pages(path: Path) -> set[int]:
    """The file pages that hold data (not holes), by SEEK_DATA/SEEK_HOLE."""
    pages: set[int] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as error:
                assert error.errno == errno.ENXIO
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            pages.update(range(data // PAGE, -(-hole // PAGE)))
            position = hole
    finally:
        os.close(fd)
    return pages


def _page_of(memory: GuestMemory, gpa: int) -> bytes:
    return memory.read(gpa, PAGE)


# --- PageBitmap -----------------------------------------------------------------------------


def test_a_new_bitmap_is_empty_and_marks_show() -> None:
    bitmap = PageBitmap(100)
    assert bitmap.pages == 100
    assert bitmap.count() == 0
    assert list(bitmap.runs()) == []
    bitmap.mark(0)
    bitmap.mark(7)
    bitmap.mark(8)
    bitmap.mark(99)
    assert [page for page in range(100) if page in bitmap] == [0, 7, 8, 99]
    assert bitmap.count() == 4
    assert list(bitmap.runs()) == [(0, 1), (7, 2), (99, 1)]
    assert 100 not in bitmap
    assert -1 not in bitmap


@pytest.mark.parametrize(
    ("first", "count"),
    [(0, 0), (3, 2), (5, 3), (0, 8), (6, 11), (13, 40), (1, 99), (0, 100), (64, 36)],
)
def test_mark_sets_exactly_the_range(first: int, count: int) -> None:
    bitmap = PageBitmap(100)
    bitmap.mark(first, count)
    assert [page for page in range(100) if page in bitmap] == list(range(first, first + count))
    assert bitmap.count() == count


@pytest.mark.parametrize(("first", "count"), [(-1, 1), (99, 2), (100, 1), (0, 101), (5, -1)])
def test_mark_refuses_pages_outside_the_region(first: int, count: int) -> None:
    bitmap = PageBitmap(100)
    with pytest.raises(ValueError, match="not inside a region of 100 pages"):
        bitmap.mark(first, count)
    assert bitmap.count() == 0


def test_runs_join_across_bytes_and_the_internal_pieces() -> None:
    bitmap = PageBitmap(4096)
    bitmap.mark(500, 100)  # crosses the 512-page pieces runs() converts at a time
    bitmap.mark(1023, 2)
    bitmap.mark(2000, 2096)  # to the very end
    assert list(bitmap.runs()) == [(500, 100), (1023, 2), (2000, 2096)]


@given(
    st.integers(min_value=0, max_value=3000).flatmap(
        lambda pages: st.tuples(st.just(pages), st.sets(st.integers(0, max(pages - 1, 0))))
    )
)
def test_runs_are_the_marked_pages_ascending_and_maximal(case: tuple[int, set[int]]) -> None:
    pages, marked = case
    marked = {page for page in marked if page < pages}
    bitmap = PageBitmap(pages)
    for page in marked:
        bitmap.mark(page)
    runs = list(bitmap.runs())
    covered = [page for first, count in runs for page in range(first, first + count)]
    assert covered == sorted(marked)
    for (first, count), (after, _) in itertools.pairwise(runs):
        assert first + count < after  # a gap between runs, or they would be one
    assert bitmap.count() == len(marked)


def test_merge_kvm_reads_kvm_word_layout() -> None:
    # KVM_GET_DIRTY_LOG: page n is bit n % 64 of 64-bit word n // 64 (api.rst 4.8).
    bitmap = PageBitmap(130)
    words = (ctypes.c_uint64 * 3)()
    words[0] = (1 << 0) | (1 << 63)
    words[1] = 1 << 1  # page 65
    words[2] = (1 << 1) | (1 << 2) | (1 << 40)  # pages 129, 130 (past the end), 168
    bitmap.mark(10)
    bitmap.merge_kvm(words)
    assert [page for page in range(130) if page in bitmap] == [0, 10, 63, 65, 129]
    # Bits past the region were dropped, so the bitmap still serialises cleanly.
    assert PageBitmap.from_bytes(bitmap.to_bytes(), 130) == bitmap
    # The same words as bytes (a copy of the buffer) merge the same way.
    other = PageBitmap(130)
    other.merge_kvm(bytes(words))
    other.mark(10)
    assert other == bitmap


@pytest.mark.parametrize("length", [0, 16, 32, 25])
def test_merge_kvm_refuses_a_bitmap_of_another_size(length: int) -> None:
    # 130 pages: 17 bytes of our own layout, 24 as KVM lays it out; others are refused.
    bitmap = PageBitmap(130)
    with pytest.raises(ValueError, match="does not fit a region of 130 pages"):
        bitmap.merge_kvm(bytes(length))
    bitmap.merge_kvm(bytes(17))
    bitmap.merge_kvm(bytes(24))


@given(
    st.integers(0, 2000).flatmap(
        lambda n: st.tuples(st.just(n), st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8))
    )
)
def test_bytes_round_trip(case: tuple[int, bytes]) -> None:
    pages, data = case
    if pages % 8 and data:
        data = data[:-1] + bytes([data[-1] & ((1 << (pages % 8)) - 1)])  # no stray bits
    bitmap = PageBitmap.from_bytes(data, pages)
    assert bitmap.to_bytes() == data
    assert bitmap.count() == sum(bin(byte).count("1") for byte in data)
    assert PageBitmap.from_bytes(bitmap.to_bytes(), pages) == bitmap


@pytest.mark.parametrize(("data", "pages"), [(bytes(2), 17), (bytes(4), 24), (b"", 1)])
def test_from_bytes_refuses_the_wrong_size(data: bytes, pages: int) -> None:
    with pytest.raises(SnapshotError, match=f"does not fit a region of {pages} pages"):
        PageBitmap.from_bytes(data, pages)


def test_from_bytes_refuses_pages_past_the_end() -> None:
    with pytest.raises(SnapshotError, match="past the region's end"):
        PageBitmap.from_bytes(b"\x00\x20", 13)  # bit 13: page 13 of a 13-page region
    assert 12 in PageBitmap.from_bytes(b"\x00\x10", 13)


def test_or_clear_copy_and_equality() -> None:
    first, second = PageBitmap(64), PageBitmap(64)
    first.mark(1)
    second.mark(2, 3)
    snapshot = first.copy()
    first |= second
    assert list(first.runs()) == [(1, 4)]
    assert list(snapshot.runs()) == [(1, 1)]  # the copy is independent
    assert first != snapshot
    first.clear()
    assert first.count() == 0
    assert first == PageBitmap(64)
    with pytest.raises(ValueError, match="cannot merge a bitmap of 65 pages"):
        first |= PageBitmap(65)


# --- the write log --------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.create(LAYOUT)
    yield ram
    ram.close()


def _marked(bitmaps: list[PageBitmap]) -> list[list[tuple[int, int]]]:
    return [list(bitmap.runs()) for bitmap in bitmaps]


def test_layout_lists_the_regions_sorted() -> None:
    memory = GuestMemory.create([HIGH, LOW])
    try:
        assert memory.layout == (LOW, HIGH)
        assert file_offsets(memory.layout) == [0, HIGH_OFFSET]
    finally:
        memory.close()


def test_nothing_is_logged_until_started(memory: GuestMemory) -> None:
    memory.mark_written(0, PAGE)
    memory.write(0x1000, b"x")
    with pytest.raises(SnapshotError, match="not logging writes"):
        memory.take_write_log()
    memory.start_write_log()
    assert _marked(memory.take_write_log()) == [[], []]


def test_marks_are_pages_clamped_to_each_region(memory: GuestMemory) -> None:
    memory.start_write_log()
    memory.mark_written(0x1FFF, 2)  # two bytes across pages 1 and 2
    memory.mark_written(0x10000, PAGE)  # exactly page 16
    # From the last page of low RAM across the MMIO hole into the first two of high RAM.
    memory.mark_written(LOW[1] - PAGE, HIGH[0] + 2 * PAGE - (LOW[1] - PAGE))
    memory.mark_written(HIGH[0] + HIGH[1] - 1, 100)  # the last byte of RAM and beyond
    memory.mark_written(3 * GIB, PAGE)  # in the hole: nothing
    memory.mark_written(-PAGE, PAGE)  # below RAM: nothing
    memory.mark_written(0x5000, 0)  # empty: nothing
    memory.mark_written(0x6000, -PAGE)
    low, high = memory.take_write_log()
    assert low.pages == 512 and high.pages == 256
    assert list(low.runs()) == [(1, 2), (16, 1), (511, 1)]
    assert list(high.runs()) == [(0, 2), (255, 1)]


def test_take_resets_the_log_and_stop_drops_it(memory: GuestMemory) -> None:
    memory.start_write_log()
    memory.mark_written(0, 1)
    memory.start_write_log()  # already on: keeps what is marked
    assert _marked(memory.take_write_log()) == [[(0, 1)], []]
    memory.mark_written(HIGH[0], 1)
    assert _marked(memory.take_write_log()) == [[], [(0, 1)]]
    assert _marked(memory.take_write_log()) == [[], []]
    memory.mark_written(0, 1)
    memory.stop_write_log()
    memory.start_write_log()
    assert _marked(memory.take_write_log()) == [[], []]


def test_kasous_own_writes_and_discards_are_logged(memory: GuestMemory) -> None:
    memory.fill(0x20000, 4 * PAGE, 0x11)
    memory.start_write_log()
    memory.write(0x3000, b"abc")
    memory.write_int(HIGH[0] + 0x2FFE, 4, 0xFFFFFFFF)  # crosses pages 2 and 3 of high RAM
    memory.fill(0x8000, 2 * PAGE)
    memory.discard(0x20000 + PAGE, 2 * PAGE)
    assert _marked(memory.take_write_log()) == [[(3, 1), (8, 2), (33, 2)], [(2, 2)]]


def test_marks_from_other_threads_land_in_exactly_one_take(memory: GuestMemory) -> None:
    memory.start_write_log()
    threads_pages = [range(start, 512, 4) for start in range(4)]
    go = threading.Barrier(len(threads_pages) + 1)

    def device(pages: range) -> None:
        go.wait()
        for page in pages:
            memory.mark_written(page * PAGE, 1)

    threads = [threading.Thread(target=device, args=(pages,)) for pages in threads_pages]
    for thread in threads:
        thread.start()
    go.wait()
    taken: list[PageBitmap] = []
    while any(thread.is_alive() for thread in threads):
        taken.append(memory.take_write_log()[0])
    for thread in threads:
        thread.join()
    taken.append(memory.take_write_log()[0])
    seen = [
        page
        for bitmap in taken
        for first, count in bitmap.runs()
        for page in range(first, first + count)
    ]
    assert sorted(seen) == list(range(512))  # every mark once: none lost, none twice


# --- full memory files ----------------------------------------------------------------------


def _fill_pattern(memory: GuestMemory) -> dict[int, int]:
    """Write a few recognisable pages into both regions; return {file page: byte}."""
    pages = {3: 0x33, 4: 0x44, 200: 0x20, 511: 0x51}  # low RAM
    high = {0: 0xA0, 100: 0xA1, 255: 0xAF}
    for page, byte in pages.items():
        memory.fill(page * PAGE, PAGE, byte)
    for page, byte in high.items():
        memory.fill(HIGH[0] + page * PAGE, PAGE, byte)
    expected = dict(pages)
    expected.update({HIGH_OFFSET // PAGE + page: byte for page, byte in high.items()})
    return expected


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_full_save_writes_data_pages_and_leaves_zeros_as_holes(
    tmp_path: Path, backing: str
) -> None:
    memory = GuestMemory.create(LAYOUT, backing=backing)  # type: ignore[arg-type]
    try:
        expected = _fill_pattern(memory)
        memory.write(100 * PAGE + PAGE - 1, b"\x01")  # one byte at a page's very end
        expected[100] = -1
        memory.fill(50 * PAGE, PAGE, 0x77)
        memory.fill(50 * PAGE, PAGE, 0)  # touched, but zeros again
        memory.read(300 * PAGE, 100 * PAGE)  # read, never written
        path = tmp_path / "memory"
        written = save_memory(memory, path)
        assert written.pages == len(expected)
        assert written.bytes == len(expected) * PAGE
        assert written.seconds >= 0
        assert os.stat(path).st_size == memory.size
        assert _data_pages(path) == set(expected)
        with open(path, "rb") as file:
            content = file.read()
        for gpa, size in memory.layout:
            offset = file_offsets(memory.layout)[memory.layout.index((gpa, size))]
            assert content[offset : offset + size] == memory.read(gpa, size)
    finally:
        memory.close()


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_a_saved_file_maps_back_as_the_same_memory(tmp_path: Path, backing: str) -> None:
    memory = GuestMemory.create(LAYOUT, backing=backing)  # type: ignore[arg-type]
    path = tmp_path / "memory"
    try:
        _fill_pattern(memory)
        save_memory(memory, path)
        before = [memory.read(gpa, size) for gpa, size in memory.layout]
    finally:
        memory.close()
    restored = GuestMemory.from_file(LAYOUT, path)
    try:
        assert restored.layout == LAYOUT
        assert [restored.read(gpa, size) for gpa, size in LAYOUT] == before
        assert all(region.source == path for region in restored.regions)
    finally:
        restored.close()


def test_from_file_is_copy_on_write(tmp_path: Path) -> None:
    memory = GuestMemory.create(LAYOUT)
    path = tmp_path / "memory"
    try:
        memory.fill(PAGE, PAGE, 0x42)
        save_memory(memory, path)
    finally:
        memory.close()
    original = path.read_bytes()
    before = _open_fds()
    clones = [GuestMemory.from_file(LAYOUT, path) for _ in range(2)]
    try:
        clones[0].fill(PAGE, PAGE, 0x99)
        clones[0].write(HIGH[0] + 5, b"mine")
        clones[0].write(9 * PAGE, b"in a hole")
        assert path.read_bytes() == original  # nothing reached the file
        assert _page_of(clones[1], PAGE) == b"\x42" * PAGE  # nor the other clone
        assert clones[1].read(9 * PAGE, 9) == bytes(9)
        # Discarding drops the private copy: the page reads the snapshot's content again.
        assert clones[0].discard(PAGE, PAGE) == PAGE
        assert _page_of(clones[0], PAGE) == b"\x42" * PAGE
    finally:
        for clone in clones:
            clone.close()
    assert _open_fds() == before


def test_memory_from_a_file_saves_whole_again(tmp_path: Path) -> None:
    # Pages the restored guest never touched live only in the first file; they must be
    # carried into a snapshot of the restored VM, beside what it wrote since.
    memory = GuestMemory.create(LAYOUT)
    first = tmp_path / "first"
    try:
        expected = _fill_pattern(memory)
        save_memory(memory, first)
    finally:
        memory.close()
    restored = GuestMemory.from_file(LAYOUT, first, hugepages=True)
    second = tmp_path / "second"
    try:
        restored.fill(7 * PAGE, PAGE, 0x07)
        restored.fill(3 * PAGE, PAGE, 0)  # a snapshot page the guest zeroed
        save_memory(restored, second)
        assert second.read_bytes() == b"".join(restored.read(gpa, size) for gpa, size in LAYOUT)
    finally:
        restored.close()
    assert _data_pages(second) == (set(expected) | {7}) - {3}


@given(
    st.dictionaries(st.integers(0, 767), st.integers(0, 255), max_size=40),
    st.sampled_from(["anonymous", "memfd"]),
)
@settings(max_examples=25, deadline=None)
def test_random_pages_round_trip_through_a_file(pages: dict[int, int], backing: str) -> None:
    memory = GuestMemory.create(LAYOUT, backing=backing)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "memory"
        try:
            for page, byte in pages.items():
                gpa = page * PAGE if page < 512 else HIGH[0] + (page - 512) * PAGE
                memory.fill(gpa, PAGE, byte)
            written = save_memory(memory, path)
        finally:
            memory.close()
        nonzero = {page for page, byte in pages.items() if byte}
        assert written.pages == len(nonzero)
        assert _data_pages(path) == nonzero
        restored = GuestMemory.from_file(LAYOUT, path)
        try:
            for page in range(768):
                gpa = page * PAGE if page < 512 else HIGH[0] + (page - 512) * PAGE
                assert _page_of(restored, gpa) == bytes([pages.get(page, 0)]) * PAGE
        finally:
            restored.close()


def test_save_never_overwrites_a_file(tmp_path: Path, memory: GuestMemory) -> None:
    path = tmp_path / "memory"
    path.write_bytes(b"keep me")
    with pytest.raises(
        HostError, match=re.escape(f"cannot create the memory file {path}: File exists")
    ):
        save_memory(memory, path)
    assert path.read_bytes() == b"keep me"


def test_a_full_disk_gives_host_error_and_no_partial_file(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "kasou-test", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to fill: {result.stderr.strip()}")
    memory = GuestMemory.create(LAYOUT)
    try:
        memory.fill(0, LOW[1], 0x5A)  # 2 MiB of data for 1 MiB of space
        before = _open_fds()
        path = mount / "memory"
        with pytest.raises(HostError, match=re.escape(f"{path}: No space left on device")):
            save_memory(memory, path)
        assert not path.exists()
        assert _open_fds() == before
    finally:
        memory.close()
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ((LOW, HIGH, (8 * GIB, PAGE)), "holds 3145728 bytes but the memory layout needs"),
        ((), "has no regions"),
        (((0, 100),), "not page aligned"),
        (((0x800, PAGE),), "not page aligned"),
        ((HIGH, LOW), "out of order or overlapping"),
        (((0, 2 * PAGE), (PAGE, PAGE)), "out of order or overlapping"),
    ],
)
def test_from_file_refuses_a_short_file_or_a_bad_layout(
    tmp_path: Path, layout: tuple[tuple[int, int], ...], message: str
) -> None:
    path = tmp_path / "memory"
    with open(path, "wb") as file:
        file.truncate(LOW[1] + HIGH[1])
    before = _open_fds()
    with pytest.raises(SnapshotError, match=message):
        GuestMemory.from_file(layout, path)
    assert _open_fds() == before


def test_from_file_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"cannot open the memory file .*No such file"):
        GuestMemory.from_file(LAYOUT, tmp_path / "absent")


# --- diff files and merging -----------------------------------------------------------------


def _full_then_diff(
    tmp_path: Path, backing: str, change: dict[int, int]
) -> tuple[Path, Path, Path, list[PageBitmap], int]:
    """Save a full file, change ``change`` ({page of the file: byte}, 0 meaning zeros;
    byte -1 meaning discard), save a diff and a full file of the later memory."""
    memory = GuestMemory.create(LAYOUT, backing=backing)  # type: ignore[arg-type]
    base, diff, later = tmp_path / "base", tmp_path / "diff", tmp_path / "later"
    try:
        _fill_pattern(memory)
        save_memory(memory, base)
        memory.start_write_log()
        for page, byte in change.items():
            gpa = page * PAGE if page < 512 else HIGH[0] + (page - 512) * PAGE
            if byte < 0:
                memory.discard(gpa, PAGE)
            else:
                memory.fill(gpa, PAGE, byte)
        bitmaps = memory.take_write_log()
        written = save_memory(memory, diff, only=bitmaps).pages
        save_memory(memory, later)
    finally:
        memory.close()
    return base, diff, later, bitmaps, written


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_diff_holds_only_the_marked_pages_and_merges_into_the_later_memory(
    tmp_path: Path, backing: str
) -> None:
    # 3 and 511 had data and become zeros (one zeroed, one discarded); 4 changes; 600 (high
    # page 88) and 10 are new; 12 is marked but written zeros over zeros.
    change = {3: 0, 511: -1, 4: 0xEE, 600: 0x60, 10: 0x10, 12: 0}
    base, diff, later, bitmaps, written = _full_then_diff(tmp_path, backing, change)
    assert written == 3  # 4, 10 and 600: marked pages that are zeros stay holes
    assert _data_pages(diff) == {4, 10, 600}
    assert os.stat(diff).st_size == os.stat(base).st_size
    assert merge_memory(base, diff, bitmaps, LAYOUT) == len(change)
    assert base.read_bytes() == later.read_bytes()
    assert _data_pages(base) == _data_pages(later)  # the pages that became zero are holes


@given(st.dictionaries(st.integers(0, 767), st.integers(-1, 3), max_size=30))
@settings(max_examples=25, deadline=None)
def test_random_diffs_merge_into_the_later_memory(change: dict[int, int]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        base, diff, later, bitmaps, _ = _full_then_diff(Path(directory), "anonymous", change)
        assert merge_memory(base, diff, bitmaps, LAYOUT) == len(change)
        assert base.read_bytes() == later.read_bytes()
        assert _data_pages(base) == _data_pages(later)


def test_merge_refuses_bitmaps_or_files_of_another_layout(tmp_path: Path) -> None:
    base, diff, _, bitmaps, _ = _full_then_diff(tmp_path, "anonymous", {1: 1})
    original = base.read_bytes()
    with pytest.raises(SnapshotError, match="1 page bitmaps for 2 memory regions"):
        merge_memory(base, diff, bitmaps[:1], LAYOUT)
    with pytest.raises(SnapshotError, match="region 1 has 255 pages, the region 256"):
        merge_memory(base, diff, [bitmaps[0], PageBitmap(255)], LAYOUT)
    with open(diff, "r+b") as file:
        file.truncate(PAGE)
    with pytest.raises(SnapshotError, match=re.escape(f"{diff} holds 4096 bytes")):
        merge_memory(base, diff, bitmaps, LAYOUT)
    assert base.read_bytes() == original


def test_save_refuses_bitmaps_that_do_not_fit(tmp_path: Path, memory: GuestMemory) -> None:
    with pytest.raises(SnapshotError, match="region 0 has 10 pages, the region 512"):
        save_memory(memory, tmp_path / "memory", only=[PageBitmap(10), PageBitmap(256)])
    assert not (tmp_path / "memory").exists()


def test_a_memory_file_reads_by_guest_physical_address(tmp_path: Path) -> None:
    from kasou.errors import GuestMemoryError
    from kasou.memory import MemoryFile

    layout = [(0, 1 << 20), (4 << 20, 1 << 20)]
    memory = GuestMemory.create(layout)
    try:
        memory.write(0x1000, b"low")
        memory.write((4 << 20) + 0x2000, b"high")
        save_memory(memory, tmp_path / "memory.bin")
    finally:
        memory.close()
    saved = MemoryFile(tmp_path / "memory.bin", layout)
    assert saved.read(0x1000, 3) == b"low"
    assert saved.read((4 << 20) + 0x2000, 4) == b"high"
    assert saved.read(0x3000, 4) == bytes(4)  # a hole
    with pytest.raises(GuestMemoryError):
        saved.read(2 << 20, 1)  # between the regions
