"""Guest RAM: regions of host memory mapped at guest-physical addresses.

This package owns the host mappings behind guest RAM, bounds-checked access to them by
guest-physical address, and zero-copy views for devices. It does not decide where RAM goes
in the guest's address space (``arch/``) and does not register it with KVM (``vmm/``).
"""

from kasou.memory.guest import GuestMemory, Region
from kasou.memory.size import format_size, host_memory_bytes, parse_size

__all__ = ["GuestMemory", "Region", "format_size", "host_memory_bytes", "parse_size"]
