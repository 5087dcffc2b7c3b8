"""A debug-exit port like QEMU's isa-debug-exit: a guest write ends the VM with a status.

Test kernels write a result to it to end their run: the VMM exits with status
``(value << 1) | 1``, truncated to 8 bits as a process status is (``exit_status``), so a
guest can report 128 results and none of them reads as a plain success (0). The port is
where the user puts it (QEMU's ``iobase``, 0x501 by default there; test kernels often use
0xf4), ``size`` bytes wide (QEMU's ``iosize``: 1, 2 or 4).

Scope: any write that lies in the range ends the VM with the written bytes as a
little-endian value, whatever its offset (QEMU ignores the offset too). Reads return zeros,
as QEMU's do. kasou's bus never splits an access, so a write that runs past the range is
not seen here at all; QEMU would cut it at the range's end. The device has no state to
save: a write ends the VM at once.

``on_write`` is called on the vCPU thread, in the middle of the I/O exit; it should record
the ending and kick the VM, and may be called again if the guest writes twice before its
vCPUs stop.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["DEFAULT_SIZE", "SIZES", "DebugExit", "exit_status"]

SIZES = (1, 2, 4)
DEFAULT_SIZE = 4  # wider than QEMU's 2, so that outb, outw and outl at the port all end the VM


def exit_status(value: int) -> int:
    """The process exit status for a written ``value``: ``(value << 1) | 1`` in 8 bits."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    """A ``size``-byte port range; a write calls ``on_write(value)``."""

    def __init__(self, on_write: Callable[[int], None], size: int = DEFAULT_SIZE) -> None:
        if size not in SIZES:
            raise ValueError(f"a debug-exit port is 1, 2 or 4 bytes wide, not {size}")
        self._on_write = on_write
        self.size = size

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        if offset + len(data) > self.size:
            return  # not inside the range (the bus does not send such accesses)
        self._on_write(int.from_bytes(data, "little"))
