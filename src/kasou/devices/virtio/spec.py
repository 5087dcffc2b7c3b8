"""Numbers from the virtio 1.2 specification that more than one virtio module needs.

This module owns the constants of the spec (device ids, status and feature bits, the
virtio-mmio register offsets, descriptor flags) and the byte layouts of the split virtqueue.
It holds no behaviour. Section numbers refer to "Virtual I/O Device (VIRTIO) Version 1.2"
(OASIS, 2022).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "AVAIL_F_NO_INTERRUPT",
    "DESC",
    "DESC_SIZE",
    "F_ACCESS_PLATFORM",
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "F_RING_PACKED",
    "F_VERSION_1",
    "MMIO_MAGIC",
    "MMIO_VERSION",
    "USED_ELEM",
    "USED_F_NO_NOTIFY",
    "VENDOR_ID",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "DeviceType",
    "Interrupt",
    "Reg",
    "Status",
]


class DeviceType(enum.IntEnum):
    """Device ids (§5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    VSOCK = 19


class Status(enum.IntFlag):
    """The device status field (§2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


class Interrupt(enum.IntFlag):
    """InterruptStatus bits of the MMIO transport (§4.2.2)."""

    USED_BUFFER = 1
    CONFIG_CHANGE = 2


# Reserved feature bits (§6).
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34


class Reg(enum.IntEnum):
    """virtio-mmio registers, version 2 (§4.2.2, table "MMIO Device Register Layout")."""

    MAGIC = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


MMIO_MAGIC = 0x74726976  # "virt", little endian
MMIO_VERSION = 2  # the modern (non-legacy) register layout
VENDOR_ID = 0x554D4551  # "QEMU": what Linux drivers expect; the field carries no meaning

# struct virtq_desc (§2.7.5): addr u64, len u32, flags u16, next u16.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# struct virtq_used_elem (§2.7.8): id u32, len u32.
USED_ELEM = struct.Struct("<II")

AVAIL_F_NO_INTERRUPT = 1  # virtq_avail.flags (§2.7.6)
USED_F_NO_NOTIFY = 1  # virtq_used.flags (§2.7.8)

assert DESC_SIZE == 16 and USED_ELEM.size == 8
