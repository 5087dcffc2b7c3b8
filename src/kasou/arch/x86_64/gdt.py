"""The boot GDT, IDT and TSS for entering a Linux kernel in 64-bit mode.

This module owns the segment descriptors a vCPU starts with and their place in guest memory.
Documentation/arch/x86/boot.rst (64-bit Boot Protocol) asks for a GDT with flat 4 GiB
descriptors for ``__BOOT_CS`` (0x10, execute/read) and ``__BOOT_DS`` (0x18, read/write), CS
holding the first and DS, ES, SS the second; the table below follows the layout of Linux's
own early GDT (arch/x86/include/asm/segment.h: a 32-bit code segment at 0x08) and adds the
TSS that a vCPU in IA-32e mode must have in TR (Intel SDM vol. 3, 8.2.3 and 27.3.1.2). The
same table serves a Multiboot kernel's 32-bit protected-mode entry (Multiboot 0.6.96, 3.2: CS
a flat 32-bit code segment, the other segment registers flat data): CS is then 0x08. It
describes the registers as plain data (``Segment``); loading them into a vCPU is the VMM's job.
"""

from __future__ import annotations

from typing import NamedTuple

from kasou.arch.x86_64.layout import GDT, GDT_SIZE, IDT, IDT_SIZE, TSS, TSS_SIZE
from kasou.memory import GuestMemory

__all__ = [
    "BOOT_CS",
    "BOOT_CS32",
    "BOOT_DS",
    "BOOT_TSS",
    "GDT_ADDRESS",
    "GDT_LIMIT",
    "BootSegments",
    "DescriptorTable",
    "Segment",
    "boot_segments",
    "gdt_entries",
    "protected_mode_segments",
    "write_gdt",
    "write_idt",
]

BOOT_CS32 = 0x08  # 32-bit flat code, as Linux's GDT_ENTRY_KERNEL32_CS; the Multiboot entry
BOOT_CS = 0x10  # __BOOT_CS: 64-bit code (L=1)
BOOT_DS = 0x18  # __BOOT_DS: flat data for DS, ES, FS, GS, SS
BOOT_TSS = 0x20  # the TSS: a 16-byte system descriptor in IA-32e mode (slots 4 and 5)

# Access byte: P (bit 7), DPL (6:5), S (4, code/data), type (3:0). Segment types (SDM vol. 3,
# table 3-1 and 3-2): code execute/read accessed 0xb, data read/write accessed 0x3, busy 64-bit
# TSS 0xb (S=0). VMX requires the accessed bit on usable segments and a busy TSS in TR (SDM
# vol. 3, 27.3.1.2).
_CODE_ACCESS = 0x9B
_DATA_ACCESS = 0x93
_TSS_ACCESS = 0x8B
# Flags nibble: G (3, 4 KiB granularity), D/B (2), L (1, 64-bit code), AVL (0).
_FLAGS_CODE64 = 0b1010
_FLAGS_FLAT32 = 0b1100
_FLAT_LIMIT = 0xFFFFF  # 20-bit limit; with G=1 it covers 4 GiB
_TSS_IOMAP_BASE_OFFSET = 0x66  # I/O map base field of the 64-bit TSS (SDM vol. 3, fig. 8-11)


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor (SDM vol. 3, figure 3-8) as an integer."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


def gdt_entries() -> list[int]:
    """The boot GDT as 8-byte descriptors, indexed by selector / 8."""
    return [
        0,  # the null descriptor
        _descriptor(0, _FLAT_LIMIT, _CODE_ACCESS, _FLAGS_FLAT32),  # 0x08
        _descriptor(0, _FLAT_LIMIT, _CODE_ACCESS, _FLAGS_CODE64),  # 0x10 __BOOT_CS
        _descriptor(0, _FLAT_LIMIT, _DATA_ACCESS, _FLAGS_FLAT32),  # 0x18 __BOOT_DS
        _descriptor(TSS, TSS_SIZE - 1, _TSS_ACCESS, 0),  # 0x20 TSS, low half
        TSS >> 32,  # 0x28 TSS, high half: base bits 63:32 (SDM vol. 3, figure 8-4)
    ]


GDT_ADDRESS = GDT
GDT_LIMIT = 8 * len(gdt_entries()) - 1  # the GDTR limit write_gdt returns
assert GDT_LIMIT < GDT_SIZE


class Segment(NamedTuple):
    """A segment register's hidden state, decoded from its descriptor (the fields of
    ``struct kvm_segment``). ``limit`` is in bytes, already scaled by the granularity."""

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the descriptor bit's name
    g: int
    avl: int

    @classmethod
    def decode(cls, selector: int, entries: list[int]) -> Segment:
        """Decode the descriptor that ``selector`` picks out of ``entries``."""
        low = entries[selector >> 3]
        access = (low >> 40) & 0xFF
        flags = (low >> 52) & 0xF
        base = (low >> 16) & 0xFFFFFF | ((low >> 56) & 0xFF) << 24
        system = not access & 0x10
        if system:  # a 16-byte system descriptor in IA-32e mode: base 63:32 follows
            base |= (entries[(selector >> 3) + 1] & 0xFFFF_FFFF) << 32
        limit = (low & 0xFFFF) | ((low >> 48) & 0xF) << 16
        granular = flags >> 3 & 1
        return cls(
            selector=selector,
            base=base,
            limit=(limit << 12) | 0xFFF if granular else limit,
            type=access & 0xF,
            present=access >> 7 & 1,
            dpl=access >> 5 & 3,
            db=flags >> 2 & 1,
            s=access >> 4 & 1,
            l=flags >> 1 & 1,
            g=granular,
            avl=flags & 1,
        )


class BootSegments(NamedTuple):
    """The segment registers at the 64-bit entry."""

    code: Segment  # CS
    data: Segment  # DS, ES, FS, GS, SS
    tss: Segment  # TR


class DescriptorTable(NamedTuple):
    """A GDTR or IDTR value: base address and limit (size - 1)."""

    base: int
    limit: int


def boot_segments() -> BootSegments:
    """CS, the data segments and TR as boot.rst's 64-bit entry wants them."""
    entries = gdt_entries()
    return BootSegments(
        code=Segment.decode(BOOT_CS, entries),
        data=Segment.decode(BOOT_DS, entries),
        tss=Segment.decode(BOOT_TSS, entries),
    )


def protected_mode_segments() -> BootSegments:
    """CS, the data segments and TR for a 32-bit protected-mode entry (Multiboot 0.6.96,
    3.2): flat 4 GiB code with D=1 and flat data. TR keeps the boot TSS: outside IA-32e mode
    its type 0xb reads as a busy 32-bit TSS, which VM entry accepts (SDM vol. 3, 27.3.1.2);
    the TSS's upper descriptor half (slot 0x28) is then an unused null descriptor."""
    entries = gdt_entries()
    return BootSegments(
        code=Segment.decode(BOOT_CS32, entries),
        data=Segment.decode(BOOT_DS, entries),
        tss=Segment.decode(BOOT_TSS, entries),
    )


def write_gdt(memory: GuestMemory) -> DescriptorTable:
    """Write the GDT at ``layout.GDT`` and a zeroed TSS at ``layout.TSS``; return the GDTR."""
    table = b"".join(entry.to_bytes(8, "little") for entry in gdt_entries())
    assert len(table) <= GDT_SIZE
    memory.write(GDT, table)
    memory.fill(TSS, TSS_SIZE, 0)
    # An I/O map base at the TSS limit means no I/O permission bitmap (SDM vol. 3, 19.5.2).
    memory.write_int(TSS + _TSS_IOMAP_BASE_OFFSET, 2, TSS_SIZE)
    return DescriptorTable(GDT, len(table) - 1)


def write_idt(memory: GuestMemory) -> DescriptorTable:
    """Zero the IDT area and return an IDTR for an empty IDT.

    The kernel is entered with interrupts off and loads its own IDT first thing
    (arch/x86/kernel/head64.c, early IDT setup); until then any exception shuts the vCPU
    down, which is what a VMM wants to see rather than a jump to a garbage gate.
    """
    memory.fill(IDT, IDT_SIZE, 0)
    return DescriptorTable(IDT, 0)
