"""Guest RAM: regions of host memory mapped at guest-physical addresses.

This package owns the host mappings behind guest RAM, bounds-checked access to them by
guest-physical address, zero-copy views for devices, the record of which pages changed
(``PageBitmap``, the write log) and guest RAM's files in a snapshot (``save_memory``,
``merge_memory``, ``GuestMemory.from_file``). It does not decide where RAM goes in the
guest's address space (``arch/``), does not register it with KVM or read KVM's dirty log
(``vmm/``), and does not write a snapshot's other state (``persist/``, ``vmm/``).
"""

from typing import TYPE_CHECKING, Any

from kasou.memory.guest import GuestMemory, Region, file_offsets
from kasou.memory.pages import PageBitmap
from kasou.memory.size import format_size, host_memory_bytes, parse_size

if TYPE_CHECKING:
    from kasou.memory.snapfile import (
        MemoryFile,
        MemoryWrite,
        merge_memory,
        nonzero_pages,
        save_memory,
    )

__all__ = [
    "GuestMemory",
    "MemoryFile",
    "MemoryWrite",
    "PageBitmap",
    "Region",
    "file_offsets",
    "format_size",
    "host_memory_bytes",
    "merge_memory",
    "nonzero_pages",
    "parse_size",
    "save_memory",
]


_SNAPFILE = {"MemoryFile", "MemoryWrite", "merge_memory", "nonzero_pages", "save_memory"}


def __getattr__(name: str) -> Any:
    """The snapshot-file functions, imported on first use: ``kasou run`` never needs them
    unless it saves or migrates a VM, and start-up time counts (docs/design.md)."""
    if name in _SNAPFILE:
        from kasou.memory import snapfile

        return getattr(snapfile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
