"""Guest RAM: regions of host memory mapped at guest-physical addresses.

This package owns the host mappings behind guest RAM, bounds-checked access to them by
guest-physical address, zero-copy views for devices, the record of which pages changed
(``PageBitmap``, the write log) and guest RAM's files in a snapshot (``save_memory``,
``merge_memory``, ``GuestMemory.from_file``). It does not decide where RAM goes in the
guest's address space (``arch/``), does not register it with KVM or read KVM's dirty log
(``vmm/``), and does not write a snapshot's other state (``persist/``, ``vmm/``).
"""

from kasou.memory.guest import GuestMemory, Region, file_offsets
from kasou.memory.pages import PageBitmap
from kasou.memory.size import format_size, host_memory_bytes, parse_size
from kasou.memory.snapfile import MemoryWrite, merge_memory, save_memory

__all__ = [
    "GuestMemory",
    "MemoryWrite",
    "PageBitmap",
    "Region",
    "file_offsets",
    "format_size",
    "host_memory_bytes",
    "merge_memory",
    "parse_size",
    "save_memory",
]
