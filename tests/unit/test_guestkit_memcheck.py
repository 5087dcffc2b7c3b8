"""The host's side of the memcheck workload: the status block parser, the position arithmetic
and the mirror of the guest's words, without a VM (tests/kvm/test_guest_memcheck.py holds
them to the running guest)."""

from __future__ import annotations

import re
import struct

import pytest

from kasou.guestkit import cmdline
from kasou.guestkit.build import SOURCE_DIR, GuestKitError
from kasou.guestkit.memcheck import (
    MEMCHECK_BASE,
    MEMCHECK_MAGIC,
    MEMCHECK_MAX_MIB,
    MEMCHECK_STATUS_GPA,
    PAGE_SIZE,
    MemcheckStatus,
    expected_page,
    expected_word,
    memory_needed,
    mismatch_line,
    page_gpa,
    read_status,
)


class FakeRam:
    """Guest RAM from 0: a bytearray with GuestMemory's read."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.data[gpa : gpa + size])


def _ram_with_status(*fields: int) -> FakeRam:
    ram = FakeRam(MEMCHECK_STATUS_GPA + PAGE_SIZE)
    struct.pack_into("<6Q", ram.data, MEMCHECK_STATUS_GPA, *fields)
    return ram


def test_the_c_source_uses_the_same_addresses_and_magic() -> None:
    source = (SOURCE_DIR / "user.c").read_text()
    defines = dict(re.findall(r"#define (MEMCHECK_\w+) (\w+)", source))
    assert int(defines["MEMCHECK_STATUS"].rstrip("UL"), 16) == MEMCHECK_STATUS_GPA
    assert int(defines["MEMCHECK_BASE"].rstrip("UL"), 16) == MEMCHECK_BASE
    assert int(defines["MEMCHECK_MAGIC"].rstrip("UL"), 16) == MEMCHECK_MAGIC
    assert int(defines["MEMCHECK_MAX_MIB"]) == MEMCHECK_MAX_MIB


def test_mix_is_splitmix64() -> None:
    # splitmix64 seeded with 0 first returns 0xe220a8397b1dcdaf: the key 0 is pass 0, page 0,
    # word 0; seeded with 1, 0x910a2dec89025cc1 (key 1: word 1).
    assert expected_word(0, 0, 0) == 0xE220A8397B1DCDAF
    assert expected_word(0, 0, 1) == 0x910A2DEC89025CC1


def test_page_is_its_words_little_endian_and_every_word_differs() -> None:
    page = expected_page(5, 3)
    words = struct.unpack("<512Q", page)
    assert words[0] == expected_word(5, 3, 0)
    assert words[511] == expected_word(5, 3, 511)
    assert len(set(words)) == 512
    assert expected_page(5, 4) != page
    assert expected_page(6, 3) != page


@pytest.mark.parametrize(("pass_", "page", "word"), [(-1, 0, 0), (0, -1, 0), (0, 0, 512)])
def test_words_outside_the_workload_are_refused(pass_: int, page: int, word: int) -> None:
    with pytest.raises(ValueError):
        expected_word(pass_, page, word)


def test_status_is_read_and_pages_are_placed_by_the_position() -> None:
    ram = _ram_with_status(MEMCHECK_MAGIC, MEMCHECK_BASE, 256, 3, 3 * 256 + 10, 0)
    status = read_status(ram)
    assert status == MemcheckStatus(pass_=3, pages=3 * 256 + 10, mismatches=0, area_pages=256)
    assert status.passes_done == 3
    assert status.page_pass(9) == 3
    assert status.page_pass(10) is None  # being written
    assert status.page_pass(11) == 2
    assert status.page_pass(255) == 2
    with pytest.raises(ValueError):
        status.page_pass(256)


def test_first_pass_leaves_the_pages_after_the_position_unwritten() -> None:
    status = read_status(_ram_with_status(MEMCHECK_MAGIC, MEMCHECK_BASE, 256, 0, 10, 0))
    assert status.page_pass(9) == 0
    assert status.page_pass(11) is None


def test_pass_field_may_lag_just_as_a_pass_starts() -> None:
    status = read_status(_ram_with_status(MEMCHECK_MAGIC, MEMCHECK_BASE, 256, 1, 2 * 256, 0))
    assert status.passes_done == 2
    assert status.page_pass(0) is None
    assert status.page_pass(1) == 1


def test_no_status_block_before_the_workload_starts() -> None:
    with pytest.raises(GuestKitError, match="has not started"):
        read_status(FakeRam(MEMCHECK_STATUS_GPA + PAGE_SIZE))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ((MEMCHECK_BASE + PAGE_SIZE, 256, 0, 0, 0), "base"),
        ((MEMCHECK_BASE, 0, 0, 0, 0), "0 pages"),
        ((MEMCHECK_BASE, 100, 0, 0, 0), "100 pages"),
        ((MEMCHECK_BASE, (MEMCHECK_MAX_MIB + 1) << 8, 0, 0, 0), "pages"),
        ((MEMCHECK_BASE, 256, 2, 256 + 5, 0), "pass 2"),
        ((MEMCHECK_BASE, 256, 0, 256 + 5, 0), "pass 0"),
        ((MEMCHECK_BASE, 256, 0, 0, 7), "7 mismatches"),
    ],
)
def test_a_status_block_that_does_not_hold_together_is_refused(
    fields: tuple[int, ...], problem: str
) -> None:
    with pytest.raises(GuestKitError, match=f"corrupt: .*{problem}"):
        read_status(_ram_with_status(MEMCHECK_MAGIC, *fields))


def test_addresses_and_sizes() -> None:
    assert page_gpa(0) == MEMCHECK_BASE
    assert page_gpa(3) == MEMCHECK_BASE + 3 * PAGE_SIZE
    assert memory_needed(16) == 32 << 20
    assert cmdline("memcheck", mib=4, rate=2, report=1) == (
        "kasou.test=memcheck mib=4 rate=2 report=1"
    )


def test_mismatch_line_is_what_the_guest_prints() -> None:
    assert mismatch_line(560, 77, 2, 0x22256B7D8C0B77DA, 0x22256B7D8C0B57DA) == (
        "memcheck: page 560 word 77 pass 2: got 0x22256b7d8c0b77da want 0x22256b7d8c0b57da"
    )
