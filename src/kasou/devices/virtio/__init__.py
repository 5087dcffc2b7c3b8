"""virtio devices over the MMIO transport (virtio 1.2).

- ``spec``: the spec's numbers and ring layouts;
- ``queue``: split virtqueues, every guest-written field validated;
- ``device``: ``VirtioDevice``, the shape every device has, and its event-loop glue;
- ``mmio``: the virtio-mmio register page that a device sits behind on the MMIO bus, and
  its snapshot (``VirtioMmioState``, with each queue's ``VirtqueueState``);
- one module a device: ``block``, ``net``, ``vsock``, ``rng``, ``console``, ``balloon``.
"""

from __future__ import annotations

from kasou.devices.virtio.device import Interrupt, Reactor, VirtioDevice
from kasou.devices.virtio.mmio import MMIO_SIZE, NOTIFY_OFFSET, VirtioMmio, VirtioMmioState
from kasou.devices.virtio.queue import (
    Chain,
    ChainError,
    QueueError,
    RingError,
    Virtqueue,
    VirtqueueState,
)
from kasou.devices.virtio.spec import DeviceType

__all__ = [
    "MMIO_SIZE",
    "NOTIFY_OFFSET",
    "Chain",
    "ChainError",
    "DeviceType",
    "Interrupt",
    "QueueError",
    "Reactor",
    "RingError",
    "VirtioDevice",
    "VirtioMmio",
    "VirtioMmioState",
    "Virtqueue",
    "VirtqueueState",
]
