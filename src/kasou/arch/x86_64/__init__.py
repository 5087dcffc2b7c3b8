"""x86-64 boot state for a Linux guest entered through the 64-bit boot protocol.

This package owns, as plain data and writes to guest memory, everything a vCPU and guest
memory hold when an x86-64 guest starts: the memory map (``layout``), the boot GDT, IDT and
TSS (``gdt``), identity page tables and the long-mode control bits (``paging``), the MP table
(``mptable``), the CPUID table (``cpuid``) and the boot MSRs (``msrs``). It never calls KVM:
the VMM turns these values into ``KVM_SET_SREGS``, ``KVM_SET_CPUID2`` and ``KVM_SET_MSRS``.
"""

from kasou.arch.x86_64.cpuid import CpuidEntry, guest_cpuid
from kasou.arch.x86_64.gdt import (
    BOOT_CS,
    BOOT_DS,
    BOOT_TSS,
    BootSegments,
    DescriptorTable,
    Segment,
    boot_segments,
    gdt_entries,
    write_gdt,
    write_idt,
)
from kasou.arch.x86_64.layout import e820_map, ram_layout
from kasou.arch.x86_64.mptable import MAX_VCPUS, write_mptable
from kasou.arch.x86_64.msrs import boot_msrs
from kasou.arch.x86_64.paging import (
    LONG_MODE_CR0,
    LONG_MODE_CR4,
    LONG_MODE_EFER,
    write_identity_map,
)

__all__ = [
    "BOOT_CS",
    "BOOT_DS",
    "BOOT_TSS",
    "LONG_MODE_CR0",
    "LONG_MODE_CR4",
    "LONG_MODE_EFER",
    "MAX_VCPUS",
    "BootSegments",
    "CpuidEntry",
    "DescriptorTable",
    "Segment",
    "boot_msrs",
    "boot_segments",
    "e820_map",
    "gdt_entries",
    "guest_cpuid",
    "ram_layout",
    "write_gdt",
    "write_identity_map",
    "write_idt",
    "write_mptable",
]
