"""Identity-mapped page tables and the control-register bits for entering 64-bit mode.

This module owns the 4-level page tables the vCPU starts with: guest-virtual equals
guest-physical for the first 4 GiB, in 2 MiB pages (Intel SDM vol. 3, 4.5: PML4 -> PDPT ->
PD with PS=1). boot.rst's 64-bit entry wants the kernel (through ``init_size``), the zero page,
the command line and the initrd identity mapped; kasou keeps all of them below 4 GiB. It also
names the CR0, CR4 and EFER bits that turn on long mode with these tables. The kernel replaces
the tables early; it does not read them back.
"""

from __future__ import annotations

import functools
import struct

from kasou.arch.x86_64.layout import PAGE_TABLES_SIZE, PD, PDPT, PML4
from kasou.memory import GuestMemory

__all__ = [
    "CR0_ET",
    "CR0_NE",
    "CR0_PE",
    "CR0_PG",
    "CR4_PAE",
    "EFER_LMA",
    "EFER_LME",
    "IDENTITY_MAP_SIZE",
    "LONG_MODE_CR0",
    "LONG_MODE_CR4",
    "LONG_MODE_EFER",
    "PML4_ADDRESS",
    "PTE_PRESENT",
    "PTE_PS",
    "PTE_WRITABLE",
    "write_identity_map",
]

# Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
CR0_PE = 1 << 0  # protected mode
CR0_ET = 1 << 4  # extension type: hard-wired 1 on modern CPUs
CR0_NE = 1 << 5  # native x87 error reporting
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # physical address extension: required for IA-32e paging
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (set by the CPU; KVM_SET_SREGS wants it given)

LONG_MODE_CR0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
LONG_MODE_CR4 = CR4_PAE
LONG_MODE_EFER = EFER_LME | EFER_LMA

# Paging-structure entry bits (SDM vol. 3, tables 4-15 to 4-18).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PS = 1 << 7  # in a PD entry: maps a 2 MiB page

_PAGE = 4096
_ENTRIES = 512
_PAGE_2M = 2 << 20
_PAGE_1G = 1 << 30
IDENTITY_MAP_SIZE = 4 * _PAGE_1G  # what the four page directories at layout.PD cover
PML4_ADDRESS = PML4  # the CR3 value write_identity_map returns


def write_identity_map(memory: GuestMemory, size: int = IDENTITY_MAP_SIZE) -> int:
    """Write page tables mapping ``[0, size)`` onto itself, present and writable, in 2 MiB
    pages (``size`` is rounded up to 2 MiB, at most 4 GiB); return the CR3 value.

    Unmapped entries are zero (not present), so an access above ``size`` faults.
    """
    if not 0 < size <= IDENTITY_MAP_SIZE:
        raise ValueError(f"identity map size {size:#x} must be in (0, 4 GiB]")
    memory.fill(PML4, PAGE_TABLES_SIZE, 0)
    pages = (size + _PAGE_2M - 1) // _PAGE_2M
    directories = (pages + _ENTRIES - 1) // _ENTRIES
    memory.write_int(PML4, 8, PDPT | PTE_PRESENT | PTE_WRITABLE)
    for directory in range(directories):
        memory.write_int(
            PDPT + 8 * directory, 8, (PD + directory * _PAGE) | PTE_PRESENT | PTE_WRITABLE
        )
    # The page directories are consecutive pages, so their entries form one array.
    memory.write(PD, _directories(pages))
    return PML4


@functools.lru_cache(maxsize=4)
def _directories(pages: int) -> bytes:
    """The page directories' entries for ``pages`` 2 MiB pages from 0 (made once a process:
    the same for every VM)."""
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_PS
    return struct.pack(f"<{pages}Q", *(page * _PAGE_2M | flags for page in range(pages)))
