"""Boot GDT, TSS and IDT: descriptors as boot.rst's 64-bit entry and VMX want them."""

from __future__ import annotations

from kasou.arch.x86_64 import layout
from kasou.arch.x86_64.gdt import (
    BOOT_CS,
    BOOT_CS32,
    BOOT_DS,
    BOOT_TSS,
    GDT_ADDRESS,
    GDT_LIMIT,
    Segment,
    boot_segments,
    gdt_entries,
    protected_mode_segments,
    write_gdt,
    write_idt,
)
from kasou.memory import GuestMemory


def test_selectors_are_boot_rst_ones() -> None:
    assert (BOOT_CS, BOOT_DS) == (0x10, 0x18)


def test_descriptors_are_the_well_known_flat_ones() -> None:
    entries = gdt_entries()
    assert entries[0] == 0
    assert entries[BOOT_CS >> 3] == 0x00AF9B000000FFFF  # 64-bit code, flat
    assert entries[BOOT_DS >> 3] == 0x00CF93000000FFFF  # data, flat 4 GiB
    assert entries[1] == 0x00CF9B000000FFFF  # 32-bit code, flat 4 GiB


def test_decoded_segments() -> None:
    code, data, tss = boot_segments()
    assert code == Segment(
        selector=0x10,
        base=0,
        limit=0xFFFFFFFF,
        type=0xB,
        present=1,
        dpl=0,
        db=0,
        s=1,
        l=1,
        g=1,
        avl=0,
    )
    assert (data.selector, data.type, data.db, data.l, data.s, data.limit) == (
        0x18,
        0x3,
        1,
        0,
        1,
        0xFFFFFFFF,
    )
    assert (tss.selector, tss.base, tss.limit, tss.type, tss.s, tss.g, tss.present) == (
        BOOT_TSS,
        layout.TSS,
        layout.TSS_SIZE - 1,
        0xB,  # busy 64-bit TSS, as VMX requires of TR
        0,
        0,
        1,
    )


def test_the_multiboot_entry_gets_flat_32_bit_segments_from_the_same_table() -> None:
    # Multiboot 0.6.96 §3.2: CS a 32-bit read/execute segment with offset 0 and limit
    # 0xffffffff; DS, ES, FS, GS, SS read/write with the same offset and limit.
    code, data, tss = protected_mode_segments()
    assert (code.selector, code.base, code.limit, code.db, code.l, code.type) == (
        BOOT_CS32,
        0,
        0xFFFFFFFF,
        1,
        0,
        0xB,
    )
    assert (data.selector, data.base, data.limit, data.db, data.type) == (
        BOOT_DS,
        0,
        0xFFFFFFFF,
        1,
        0x3,
    )
    assert tss == boot_segments().tss  # type 0xb: a busy 32-bit TSS outside IA-32e mode


def test_tss_descriptor_base_high_half_is_decoded() -> None:
    entries = [0, 0, 0, 0, 0x0000_8B00_0000_0067, 0x1234_5678]
    assert Segment.decode(0x20, entries).base == 0x1234_5678_0000_0000


def test_write_gdt_and_idt() -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    memory.fill(0, 0x1000, 0xEE)
    gdtr = write_gdt(memory)
    assert gdtr == (layout.GDT, 6 * 8 - 1) == (GDT_ADDRESS, GDT_LIMIT)
    table = memory.read(layout.GDT, gdtr.limit + 1)
    assert [int.from_bytes(table[i : i + 8], "little") for i in range(0, 48, 8)] == gdt_entries()
    assert memory.read_int(layout.TSS + 0x66, 2) == layout.TSS_SIZE  # no I/O bitmap
    assert memory.read(layout.TSS, 0x66) == bytes(0x66)
    assert write_idt(memory) == (layout.IDT, 0)
    assert memory.read(layout.IDT, layout.IDT_SIZE) == bytes(layout.IDT_SIZE)
    memory.close()
