"""virtio-blk (virtio 1.2 §5.2): a disk for the guest, backed by a ``BlockBackend``.

This module owns the request format (header, data, status byte), the config space
(capacity, block size, discard and write-zeroes limits) and the checks on every request. It
does not know image formats: a backend (``kasou.disk``: raw files, block devices, qcow2)
does the I/O, straight between the file and guest RAM (the buffers are views of it).

One request queue. Requests are served in order on the device's reactor thread and the
driver is interrupted once per batch. A request the guest got wrong (no room for the status
byte, a header that is short, a range past the end of the disk, a write to a read-only disk)
is answered IOERR or UNSUPP; a backend failure (EIO, ENOSPC, a file truncated under the VM)
is answered IOERR and logged. Neither stops the device.

Rate limits (``devices/ratelimit.py``): a disk may be held to a bandwidth and a number of
requests a second. Reads and writes cost their data bytes and one operation, every other
request one operation. A throttled disk stops taking requests from the ring, leaving them
there in order, until a timer on its reactor says the buckets allow more: requests are
delayed, never failed, dropped or reordered.

Durability: the device offers VIRTIO_BLK_F_FLUSH, so the guest treats the disk as a
write-back cache and sends FLUSH when it needs data on stable storage; FLUSH is answered only
once the backend's fdatasync has returned. A write the guest saw flushed survives kill -9.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kasou.devices.ratelimit import Clock, RateLimit, Throttle
from kasou.devices.virtio.device import Reactor, VirtioDevice
from kasou.devices.virtio.queue import Chain, Virtqueue, split_views
from kasou.devices.virtio.spec import DeviceType

__all__ = ["Block", "BlockBackend", "BlockConfig"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
SECTOR = 512  # request sectors are always 512 bytes, whatever blk_size says (§5.2.6)

# Feature bits (§5.2.3).
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# Request types and status values (§5.2.6).
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES
_HEADER = struct.Struct("<IIQ")  # struct virtio_blk_req: type, reserved, sector
_SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes
_WRITE_ZEROES_UNMAP = 1

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB a segment
MAX_DISCARD_SEGMENTS = 32
SIZE_MAX = 1 << 20  # the largest single buffer the driver should use


class BlockBackend(Protocol):
    """What the device needs of a disk image (``kasou.disk.Disk`` is one)."""

    size: int
    read_only: bool

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None: ...

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...

    def close(self) -> None: ...


class BlockConfig(Protocol):
    """How the user asked for the disk (``vmm.config.DiskConfig`` is one)."""

    @property
    def read_only(self) -> bool: ...

    @property
    def serial(self) -> str | None: ...

    @property
    def sector_size(self) -> int: ...

    @property
    def rate(self) -> RateLimit | None: ...


class _Failed(Exception):
    """A request that ends with a status other than OK."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Block(VirtioDevice):
    """A virtio-blk device over one backend."""

    device_type = DeviceType.BLOCK
    name = "block"

    def __init__(
        self,
        reactor: Reactor,
        backend: BlockBackend,
        config: BlockConfig,
        name: str = "block",
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.read_only = config.read_only or backend.read_only
        features = F_SEG_MAX | F_SIZE_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY
        if self.read_only:
            features |= F_RO
        else:
            features |= F_DISCARD | F_WRITE_ZEROES
        super().__init__(reactor, (QUEUE_SIZE,), features)
        self.name = name
        self.backend = backend
        self.sector_size = config.sector_size
        serial = (config.serial or "").encode()[:ID_BYTES]
        self.serial = serial + bytes(ID_BYTES - len(serial))
        self.stats = {
            "reads": 0,
            "writes": 0,
            "read_bytes": 0,
            "write_bytes": 0,
            "flushes": 0,
            "discards": 0,
            "write_zeroes": 0,
            "errors": 0,
            "requests": 0,
        }
        self._config = self._config_space()
        self.throttle = Throttle(reactor, self._resume, config.rate, clock)

    def _config_space(self) -> bytes:
        # struct virtio_blk_config (§5.2.4), 60 bytes up to write_zeroes_may_unmap.
        exponent = 0  # physical block = logical block
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.backend.size // SECTOR,  # capacity, in 512-byte sectors
            SIZE_MAX,  # size_max
            QUEUE_SIZE - 2,  # seg_max: header and status take two descriptors
            0,  # geometry.cylinders
            0,  # geometry.heads
            0,  # geometry.sectors
            self.sector_size,  # blk_size
            exponent,  # topology.physical_block_exp
            0,  # topology.alignment_offset
            1,  # topology.min_io_size, in blocks
            0,  # topology.opt_io_size
            0,  # writeback (only with CONFIG_WCE)
            0,  # unused0
            1,  # num_queues
            MAX_DISCARD_SECTORS,  # max_discard_sectors
            MAX_DISCARD_SEGMENTS,  # max_discard_seg
            self.sector_size // SECTOR,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,  # max_write_zeroes_sectors
            MAX_DISCARD_SEGMENTS,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    def config(self) -> bytes:
        return self._config

    def counters(self) -> dict[str, Any]:
        return {
            **self.stats,
            "size": self.backend.size,
            "read_only": self.read_only,
            "rate_limit": self.throttle.describe(),
        }

    def set_rate_limit(self, limit: RateLimit | None) -> None:
        """Change the disk's rate limit (any thread; ``None``: no limit)."""
        self.throttle.set(limit)

    def close(self) -> None:
        super().close()
        self.backend.close()

    # --- requests -----------------------------------------------------------------------

    def process(self, queue: Virtqueue) -> None:
        throttle = self.throttle
        if not throttle.active:
            for chain in self.chains(queue):
                queue.use(chain, self._serve(chain))
        elif not (queue.has_available() and throttle.blocked()):
            for chain in self.chains(queue):
                queue.use(chain, self._serve(chain))
                # Data bytes (header and status byte aside) and one operation.
                throttle.charge(max(0, chain.readable_len + chain.writable_len - _HEADER.size - 1))
                if queue.has_available() and throttle.blocked():
                    break
        self.signal(queue)

    def held_back(self) -> bool:
        return self.throttle.waiting

    def _resume(self) -> None:
        if self.active and self.queues:
            self.run_queue(self.queues[0])

    def _serve(self, chain: Chain) -> int:
        """Do one request; return the bytes written into the chain (data and status)."""
        self.stats["requests"] += 1
        if chain.writable_len < 1:
            # No room for a status byte: nothing can be reported, the request is dropped.
            self.stats["errors"] += 1
            log.warning("%s: request %d has no status byte; dropped", self.name, chain.head)
            return 0
        status_view = split_views(chain.writable, chain.writable_len - 1, 1)[0]
        written = 0
        try:
            if chain.readable_len < _HEADER.size:
                raise _Failed(S_IOERR, f"header of {chain.readable_len} bytes, 16 needed")
            kind, _, sector = _HEADER.unpack(chain.read(_HEADER.size))
            written = self._request(chain, kind, sector)
            status = S_OK
        except _Failed as failure:
            status = failure.status
            self.stats["errors"] += 1
            log.debug("%s: request %d: %s", self.name, chain.head, failure)
        status_view[0] = status
        return written + 1

    def _request(self, chain: Chain, kind: int, sector: int) -> int:
        if kind == T_IN:
            data = split_views(chain.writable, 0, chain.writable_len - 1)
            length = chain.writable_len - 1
            offset = self._range(sector, length)
            self._io("read", self.backend.readv, offset, data)
            self.stats["reads"] += 1
            self.stats["read_bytes"] += length
            return length
        if kind == T_OUT:
            self._writable()
            length = chain.readable_len - _HEADER.size
            data = split_views(chain.readable, _HEADER.size, length)
            offset = self._range(sector, length)
            self._io("write", self.backend.writev, offset, data)
            self.stats["writes"] += 1
            self.stats["write_bytes"] += length
            return 0
        if kind == T_FLUSH:
            self._io("flush", self.backend.flush)
            self.stats["flushes"] += 1
            return 0
        if kind == T_GET_ID:
            if chain.writable_len - 1 < 1:
                raise _Failed(S_IOERR, "GET_ID without a buffer")
            length = min(ID_BYTES, chain.writable_len - 1)
            return chain.write(self.serial[:length])
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            self._writable()
            self._segments(chain, zeroes=kind == T_WRITE_ZEROES)
            return 0
        raise _Failed(S_UNSUPP, f"request type {kind} is not supported")

    def _segments(self, chain: Chain, zeroes: bool) -> None:
        payload = chain.read(chain.readable_len - _HEADER.size, _HEADER.size)
        if not payload or len(payload) % _SEGMENT.size:
            raise _Failed(S_IOERR, f"discard/write-zeroes payload of {len(payload)} bytes")
        if len(payload) // _SEGMENT.size > MAX_DISCARD_SEGMENTS:
            raise _Failed(S_IOERR, "more discard/write-zeroes segments than offered")
        for sector, count, flags in _SEGMENT.iter_unpack(payload):
            if count > MAX_DISCARD_SECTORS:
                raise _Failed(S_IOERR, f"a segment of {count} sectors")
            if flags & ~_WRITE_ZEROES_UNMAP or (flags and not zeroes):
                raise _Failed(S_UNSUPP, f"segment flags {flags:#x}")
            offset = self._range(sector, count * SECTOR)
            length = count * SECTOR
            if zeroes:
                unmap = bool(flags & _WRITE_ZEROES_UNMAP)
                self._io("write zeroes", self.backend.write_zeroes, offset, length, unmap)
                self.stats["write_zeroes"] += 1
            else:
                self._io("discard", self.backend.discard, offset, length)
                self.stats["discards"] += 1

    def _range(self, sector: int, length: int) -> int:
        offset = sector * SECTOR
        if offset + length > self.backend.size:
            raise _Failed(
                S_IOERR,
                f"sectors {sector}+{length // SECTOR} are past the end "
                f"({self.backend.size // SECTOR} sectors)",
            )
        return offset

    def _writable(self) -> None:
        if self.read_only:
            raise _Failed(S_IOERR, "the disk is read-only")

    def _io(self, what: str, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except Exception as error:  # OSError (EIO, ENOSPC), the backend's own errors
            message = f"{what} failed: {error}"
        else:
            return
        # Raised outside the handler, and logged as text: the backend's exception holds frames
        # with views of guest RAM, which must not outlive the request.
        log.warning("%s: %s", self.name, message)
        raise _Failed(S_IOERR, message)
