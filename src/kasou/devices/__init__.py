"""Device models: pure register machines behind the PIO and MMIO buses.

A device model gets what it needs handed in (an interrupt ``Trigger``, an output callback,
guest memory, its backend) and knows nothing of KVM, the VMM, the event loop or threads: it
imports neither ``kasou.kvm``, ``kasou.vmm`` nor ``kasou._sys``, and starts no thread. Every
device has one shape, so a reader who knows one knows them all:

- ``Xxx``: the live device, with ``read(offset, data)``/``write(offset, data)`` for the bus;
- ``XxxState``: a frozen dataclass of plain data, returned by ``Xxx.save()``;
- ``Xxx.restore(deps..., state)``: a constructor that validates ``state`` as untrusted input
  and raises ``DeviceStateError`` when it is not a state the device could have been in.

``bus`` maps address ranges to devices; ``legacy`` holds the PC devices a Linux guest expects
(8250 UART, i8042, CMOS RTC).
"""

from __future__ import annotations

from kasou.devices.bus import Bus, BusDevice, BusError
from kasou.devices.trigger import Trigger
from kasou.errors import SnapshotError

__all__ = ["Bus", "BusDevice", "BusError", "DeviceStateError", "Trigger"]


class DeviceStateError(SnapshotError):
    """A saved device state that no device could have been in: corrupt or foreign data."""
