"""Identity page tables, checked with an independent 4-level walk (Intel SDM vol. 3, 4.5)."""

from __future__ import annotations

import pytest

from kasou.arch.x86_64 import layout
from kasou.arch.x86_64.paging import (
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    LONG_MODE_CR0,
    LONG_MODE_CR4,
    LONG_MODE_EFER,
    PML4_ADDRESS,
    write_identity_map,
)
from kasou.memory import GuestMemory

GiB = 1 << 30
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000


def walk(memory: GuestMemory, cr3: int, virtual: int) -> int | None:
    """Translate ``virtual`` through the tables at ``cr3``; None if not present."""
    pml4e = memory.read_int(cr3 + 8 * (virtual >> 39 & 0x1FF), 8)
    if not pml4e & 1:
        return None
    pdpte = memory.read_int((pml4e & ADDRESS_MASK) + 8 * (virtual >> 30 & 0x1FF), 8)
    if not pdpte & 1:
        return None
    assert not pdpte & 0x80, "no 1 GiB pages expected"
    pde = memory.read_int((pdpte & ADDRESS_MASK) + 8 * (virtual >> 21 & 0x1FF), 8)
    if not pde & 1:
        return None
    assert pde & 0x82 == 0x82, "2 MiB page, writable"
    return (pde & 0x000F_FFFF_FFE0_0000) | (virtual & 0x1F_FFFF)


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.create([(0, 1 << 20)])


def test_first_4g_is_identity_mapped(memory: GuestMemory) -> None:
    memory.fill(layout.PAGE_TABLES, layout.PAGE_TABLES_SIZE, 0xFF)  # stale garbage
    cr3 = write_identity_map(memory)
    assert cr3 == layout.PML4 == PML4_ADDRESS
    for address in (0, 0x7000, 0x1000000, 0x1234_5678, 0xBFFF_FFFF, 0xFEE0_0000, 0xFFFF_FFFF):
        assert walk(memory, cr3, address) == address
    assert walk(memory, cr3, 4 * GiB) is None
    assert walk(memory, cr3, 0xFFFF_FFFF_8100_0000) is None  # upper half left to the kernel


def test_smaller_map_stops_at_its_size(memory: GuestMemory) -> None:
    cr3 = write_identity_map(memory, 1 * GiB + 1)
    assert walk(memory, cr3, 1 * GiB + 0x1000) == 1 * GiB + 0x1000  # rounded up to 2 MiB
    assert walk(memory, cr3, 1 * GiB + (2 << 20)) is None
    assert walk(memory, cr3, 3 * GiB) is None


def test_sizes_beyond_what_the_tables_hold(memory: GuestMemory) -> None:
    with pytest.raises(ValueError, match="4 GiB"):
        write_identity_map(memory, 4 * GiB + 1)


def test_long_mode_bits() -> None:
    assert LONG_MODE_CR0 & CR0_PG and LONG_MODE_CR0 & 1
    assert LONG_MODE_CR4 & CR4_PAE
    assert LONG_MODE_EFER == EFER_LME | EFER_LMA == 0x500
