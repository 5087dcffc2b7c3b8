"""virtio-rng (virtio 1.2 §5.4): fills the driver's buffers from the host's getrandom(2).

One request queue; every chain is a device-writable buffer the device fills completely. No
config space, no features. Requests are capped so that one chain cannot make the host hand
out unbounded amounts at once (the driver asks again).
"""

from __future__ import annotations

import os
from typing import Any

from kasou.devices.virtio.device import Reactor, VirtioDevice
from kasou.devices.virtio.queue import Virtqueue
from kasou.devices.virtio.spec import DeviceType

__all__ = ["MAX_REQUEST", "Rng"]

QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10
"""The most bytes one chain gets (more buffer than that is left unwritten)."""


class Rng(VirtioDevice):
    """An entropy device backed by getrandom(2)."""

    device_type = DeviceType.RNG
    name = "rng"

    def __init__(self, reactor: Reactor) -> None:
        super().__init__(reactor, (QUEUE_SIZE,))
        self.bytes_served = 0
        self.requests = 0

    def process(self, queue: Virtqueue) -> None:
        for chain in self.chains(queue):
            size = min(chain.writable_len, MAX_REQUEST)
            written = chain.write(os.getrandom(size)) if size else 0
            queue.use(chain, written)
            self.bytes_served += written
            self.requests += 1
        self.signal(queue)

    def counters(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes_served}
