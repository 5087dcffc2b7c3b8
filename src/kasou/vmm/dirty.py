"""Which guest pages changed: KVM's dirty log and the devices' write log, together.

KVM logs the pages a vCPU writes once a memory slot has ``KVM_MEM_LOG_DIRTY_PAGES``
(Documentation/virt/kvm/api.rst, 4.35 KVM_SET_USER_MEMORY_REGION and 4.8
KVM_GET_DIRTY_LOG). It cannot see what kasou itself writes into guest RAM: a virtio device's
used buffers (a disk read, a received packet). Those are logged by ``GuestMemory`` when its
write log is on (``mark_written``, called by the virtqueue on every used element). A diff
snapshot and every pre-copy round of a migration take the union of the two.

Reading KVM's log also clears it, so each ``collect`` returns what changed since the
previous one (or since ``start``).
"""

from __future__ import annotations

import ctypes
import logging

from kasou.kvm import VmFd
from kasou.memory import GuestMemory, PageBitmap

__all__ = ["DirtyTracker"]

log = logging.getLogger(__name__)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0  # linux/kvm.h
PAGE_SIZE = 4096


class DirtyTracker:
    """Dirty-page tracking for every memory slot of one VM (slot ``i`` is region ``i``)."""

    def __init__(self, vm_fd: VmFd, memory: GuestMemory) -> None:
        self._vm_fd = vm_fd
        self._memory = memory
        self._bitmaps = [
            (ctypes.c_uint64 * -(-(region.size // PAGE_SIZE) // 64))() for region in memory.regions
        ]
        self.active = False

    def start(self) -> None:
        """Turn logging on; what changes from now on is reported by ``collect``."""
        if self.active:
            return
        self._set_slots(KVM_MEM_LOG_DIRTY_PAGES)
        self._memory.start_write_log()
        self.active = True
        self.collect()  # start from a clean log

    def stop(self) -> None:
        """Turn logging off (KVM stops write-protecting pages: no more faults)."""
        if not self.active:
            return
        self.active = False
        self._memory.stop_write_log()
        try:
            self._set_slots(0)
        except Exception:  # the VM may be closing; a slot left logging costs only speed
            log.debug("could not turn dirty logging off", exc_info=True)

    def collect(self) -> list[PageBitmap]:
        """The pages written since the last call, one bitmap per region."""
        written = self._memory.take_write_log()
        for slot, bitmap in enumerate(self._bitmaps):
            ctypes.memset(bitmap, 0, ctypes.sizeof(bitmap))
            self._vm_fd.get_dirty_log(slot, bitmap)
            written[slot].merge_kvm(bitmap)
        return written

    def _set_slots(self, flags: int) -> None:
        for slot, region in enumerate(self._memory.regions):
            self._vm_fd.set_user_memory_region(
                slot, region.gpa, region.size, region.host_address, flags
            )
