"""The guest-physical memory map of an x86-64 kasou VM.

This module owns where things live in guest-physical address space: the boot structures the
VMM writes below 1 MiB, guest RAM (split around a 32-bit MMIO hole), the MMIO windows of
devices and interrupt controllers, and the e820 map that tells the guest which is which. It
only computes addresses; other modules write the structures (``gdt.py``, ``paging.py``,
``mptable.py``, ``acpi.py``, ``kasou.loader``).

Below 1 MiB (all of it guest RAM)::

    0x0_0000 - 0x0_04ff   real-mode IVT and BIOS data area: left zero
    0x0_0500 - 0x0_052f   GDT                         (gdt.py)
    0x0_0540 - 0x0_054f   IDT, empty                  (gdt.py)
    0x0_0580 - 0x0_05e7   TSS                         (gdt.py)
    0x0_7000 - 0x0_7fff   zero page (boot_params)     (loader/bootparams.py)
    0x0_8000 - 0x0_8fff   boot stack, grows down from BOOT_STACK
    0x0_9000 - 0x0_efff   page tables: PML4, PDPT, 4 PDs (paging.py)
    0x1_0000 - 0x1_ffff   Multiboot information, for Multiboot kernels (loader/multiboot.py)
    0x2_0000 - 0x2_ffff   kernel command line
    0x9_fc00 - 0xa_1fff   EBDA: MP table from 0x9fc00 (mptable.py); e820-reserved to 1 MiB
    0xe_0000 - 0xf_efff   ACPI tables, RSDP first     (acpi.py)
    0xf_f000 - 0xf_f00f   VM generation ID, 16 bytes; the rest of its page unused (acpi.py)
    0x10_0000 -           HIMEM: kernel, initrd, the rest of RAM

Above: RAM up to 3 GiB, then the MMIO hole [3 GiB, 4 GiB) with virtio-mmio devices at
0xd000_0000, the IOAPIC at 0xfec0_0000, the local APIC at 0xfee0_0000 and KVM's private pages at
0xfffb_c000; RAM beyond 3 GiB continues at 4 GiB.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from kasou.errors import ConfigError

__all__ = [
    "ACPI_SIZE",
    "ACPI_START",
    "BOOT_AREAS",
    "BOOT_STACK",
    "CMDLINE",
    "CMDLINE_SIZE",
    "E820_RAM",
    "E820_RESERVED",
    "EBDA_START",
    "GDT",
    "GDT_SIZE",
    "HIMEM",
    "IDT",
    "IDT_SIZE",
    "IOAPIC_ADDRESS",
    "IOAPIC_PINS",
    "IOAPIC_SIZE",
    "IRQ_COM1",
    "IRQ_COM2",
    "IRQ_I8042",
    "IRQ_PIT",
    "IRQ_RTC",
    "IRQ_SCI",
    "KVM_IDENTITY_MAP",
    "KVM_TSS",
    "KVM_TSS_SIZE",
    "LAPIC_ADDRESS",
    "LAPIC_SIZE",
    "MAX_MEMORY",
    "MIN_MEMORY",
    "MMIO_HOLE_END",
    "MMIO_HOLE_START",
    "MPTABLE",
    "MPTABLE_SIZE",
    "MULTIBOOT_INFO",
    "MULTIBOOT_INFO_SIZE",
    "PAGE_TABLES",
    "PAGE_TABLES_SIZE",
    "PD",
    "PDPT",
    "PML4",
    "TSS",
    "TSS_SIZE",
    "VIRTIO_IRQS",
    "VIRTIO_MMIO_BASE",
    "VIRTIO_MMIO_SIZE",
    "VIRTIO_MMIO_SLOTS",
    "VMGENID_ADDRESS",
    "VMGENID_SIZE",
    "ZERO_PAGE",
    "ZERO_PAGE_SIZE",
    "e820_map",
    "ram_layout",
    "virtio_mmio_address",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
_PAGE = 4 * KiB

# Boot structures below 1 MiB. 0x500 is the first byte after the real-mode IVT (0x0-0x3ff)
# and the BIOS data area (0x400-0x4ff), free on a PC.
GDT = 0x500
GDT_SIZE = 0x30  # 6 descriptors of 8 bytes (gdt.py), the 64-bit TSS taking two
IDT = 0x540
IDT_SIZE = 0x10  # room for one 16-byte gate; the IDT is loaded empty (limit 0)
TSS = 0x580
TSS_SIZE = 0x68  # a 64-bit TSS without an I/O permission bitmap (Intel SDM vol. 3, 8.7)
ZERO_PAGE = 0x7000  # struct boot_params; RSI points here at the 64-bit entry
ZERO_PAGE_SIZE = 0x1000
BOOT_STACK = 0x8FF0  # initial RSP: top of the page at 0x8000, 16-byte aligned
PML4 = 0x9000
PDPT = 0xA000
PD = 0xB000  # four page directories, 0xb000-0xefff, 2 MiB pages for the first 4 GiB
PAGE_TABLES = PML4
PAGE_TABLES_SIZE = 6 * _PAGE
MULTIBOOT_INFO = 0x10000  # the Multiboot information structure, its memory map and strings
MULTIBOOT_INFO_SIZE = 64 * KiB
CMDLINE = 0x20000
CMDLINE_SIZE = 64 * KiB  # room for the command line and its NUL
# Linux scans the last KiB of 640 KiB of base memory for the MP floating pointer
# (arch/x86/kernel/mpparse.c, smp_scan_config(639 * 0x400, 0x400)); MP spec 1.4 §4 puts it in
# the EBDA. Everything from here to 1 MiB is e820-reserved, so the table may run past 640 KiB.
EBDA_START = 0x9FC00
MPTABLE = EBDA_START
MPTABLE_SIZE = 0xA2000 - MPTABLE  # 9 KiB: floating pointer + config table for 254 vCPUs
# ACPI 6.5 §5.2.5.1: on IA-PC systems the OS finds the RSDP by scanning the first KiB of the
# EBDA and the BIOS area 0xe0000-0xfffff on 16-byte boundaries; kasou also passes its address
# in boot_params.acpi_rsdp_addr. The tables follow the RSDP in the same reserved area.
ACPI_START = 0xE0000
ACPI_SIZE = 0x1F000
# The VM Generation ID (Microsoft's "Virtual Machine Generation ID" paper, 2012; QEMU's
# docs/specs/vmgenid.rst lists its rules R1a-R1e): a 16-byte, 8-byte aligned value in memory
# the OS reads as ordinary cacheable memory and never uses itself, covered by no e820 RAM or
# ACPI entry. The last page of the BIOS area is all of that: guest RAM, e820-reserved, and
# below 1 MiB, which Linux keeps in its direct map (memremap of it is a plain pointer). A page
# of its own keeps the ACPI tables from ever growing into it.
VMGENID_ADDRESS = ACPI_START + ACPI_SIZE
VMGENID_SIZE = 16
HIMEM = 0x100000  # 1 MiB: the kernel and everything not above goes at or above this

BOOT_AREAS: tuple[tuple[str, int, int], ...] = (
    ("gdt", GDT, GDT_SIZE),
    ("idt", IDT, IDT_SIZE),
    ("tss", TSS, TSS_SIZE),
    ("zero page", ZERO_PAGE, ZERO_PAGE_SIZE),
    ("boot stack", BOOT_STACK & ~(_PAGE - 1), _PAGE),
    ("page tables", PAGE_TABLES, PAGE_TABLES_SIZE),
    ("multiboot info", MULTIBOOT_INFO, MULTIBOOT_INFO_SIZE),
    ("command line", CMDLINE, CMDLINE_SIZE),
    ("mp table", MPTABLE, MPTABLE_SIZE),
    ("acpi tables", ACPI_START, ACPI_SIZE),
    ("vm generation id", VMGENID_ADDRESS, _PAGE),
)

# The 32-bit MMIO hole: no RAM here, devices only.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000  # one page per device: registers at 0x000, config space at 0x100
VIRTIO_MMIO_SLOTS = 64
IOAPIC_ADDRESS = 0xFEC0_0000  # the IOAPIC's default base (82093AA datasheet, 3.0)
IOAPIC_SIZE = 0x1000
IOAPIC_PINS = 24  # KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS)
LAPIC_ADDRESS = 0xFEE0_0000  # IA32_APIC_BASE default (Intel SDM vol. 3, 11.4.1)
LAPIC_SIZE = 0x1000
# Pages KVM on Intel needs in guest-physical space for its own use, outside RAM: the real-mode
# TSS (KVM_SET_TSS_ADDR, three pages) and the EPT identity page table (KVM_SET_IDENTITY_MAP_ADDR,
# one page) (Documentation/virt/kvm/api.rst). Just below the BIOS area at the top of 4 GiB.
KVM_IDENTITY_MAP = 0xFFFB_C000
KVM_TSS = 0xFFFB_D000
KVM_TSS_SIZE = 0x3000

# ISA interrupt lines as on a PC; each is the IOAPIC pin of the same number (mptable.py).
IRQ_PIT = 0
IRQ_I8042 = 1
IRQ_COM2 = 3
IRQ_COM1 = 4
IRQ_RTC = 8
IRQ_SCI = 9  # the ACPI system control interrupt, level-triggered (acpi.py's MADT override)
# Lines free for virtio-mmio devices: the IOAPIC pins not used by a legacy device or the SCI
# (12 is the PS/2 mouse on a PC, left alone).
VIRTIO_IRQS: tuple[int, ...] = tuple(
    irq for irq in range(5, IOAPIC_PINS) if irq not in (IRQ_RTC, IRQ_SCI, 12)
)

# e820 address range types (ACPI spec, "Address Range Types"; asm/e820/types.h). The same numbers
# as kasou.loader.bootparams; arch/ and loader/ are sibling layers and do not import each other.
E820_RAM = 1
E820_RESERVED = 2

MIN_MEMORY = 16 * MiB  # the boot structures, a small kernel and room to run
MAX_MEMORY = 1 << 40  # 1 TiB: a sanity bound well inside 46 bits of guest-physical address


def _check_boot_areas() -> None:
    # Every boot structure lies below 1 MiB and none overlaps another.
    ordered = sorted(BOOT_AREAS, key=lambda area: area[1])
    for (name, start, size), (following, next_start, _) in itertools.pairwise(ordered):
        assert start + size <= next_start, f"{name} overlaps {following}"
    assert ordered[-1][1] + ordered[-1][2] <= HIMEM


_check_boot_areas()


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Guest RAM regions ``(address, size)`` for ``size`` bytes of guest memory.

    RAM fills from 0 up to the MMIO hole; whatever does not fit below 3 GiB continues at
    4 GiB. Raises ``ConfigError("memory", ...)`` for a size kasou cannot lay out.
    """
    if size % _PAGE:
        raise ConfigError("memory", f"{size} bytes is not a whole number of 4 KiB pages")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ConfigError(
            "memory",
            f"{size // MiB} MiB is outside what kasou supports "
            f"({MIN_MEMORY // MiB} MiB to {MAX_MEMORY // GiB} GiB)",
        )
    low = min(size, MMIO_HOLE_START)
    regions = [(0, low)]
    if size > low:
        regions.append((MMIO_HOLE_END, size - low))
    return regions


def e820_map(ram: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The e820 memory map ``(address, size, type)`` for RAM regions from ``ram_layout``.

    The region at 0 is split: RAM up to the EBDA, reserved from the EBDA to 1 MiB (where a PC
    has its EBDA, video memory and BIOS ROMs, and kasou its MP table, ACPI tables and VM
    generation ID), RAM from 1 MiB on.
    """
    entries: list[tuple[int, int, int]] = []
    for address, size in sorted(ram):
        if address == 0:
            if size < HIMEM:
                raise ValueError("the RAM region at 0 must reach 1 MiB")
            entries.append((0, EBDA_START, E820_RAM))
            entries.append((EBDA_START, HIMEM - EBDA_START, E820_RESERVED))
            if size > HIMEM:
                entries.append((HIMEM, size - HIMEM, E820_RAM))
        else:
            entries.append((address, size, E820_RAM))
    return entries


def virtio_mmio_address(slot: int) -> int:
    """The base of virtio-mmio device ``slot`` (0 to ``VIRTIO_MMIO_SLOTS`` - 1)."""
    if not 0 <= slot < VIRTIO_MMIO_SLOTS:
        raise ValueError(f"virtio-mmio slot {slot} out of range 0..{VIRTIO_MMIO_SLOTS - 1}")
    return VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE
