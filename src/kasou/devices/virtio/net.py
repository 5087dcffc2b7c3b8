"""virtio-net (virtio 1.2 §5.1): an Ethernet interface for the guest, backed by a host TAP.

This module owns the device's side of the two queues (receive 0, transmit 1), the config
space (MAC, link status, MTU), the feature set, and moving frames between the rings and the
TAP. It does not open or configure the TAP (``kasou.tap`` does) and knows nothing of IP:
addresses, bridges and routes on the host side are the user's.

Frames carry a 12-byte ``struct virtio_net_hdr_v1`` (§5.1.6) in front, in both directions,
and the TAP is opened with the same header (``IFF_VNET_HDR``), so a frame crosses between the
ring and the TAP without being parsed or rewritten: offloads (partial checksums, TSO/ECN)
pass straight through. The device offers the checksum and TCP segmentation offloads both ways
and mergeable receive buffers; what the guest accepts for receiving is set on the TAP
(TUNSETOFFLOAD) when the driver starts the device. UFO is not offered: Linux stopped making
UFO packets in 4.14 and the host kernel never hands them to a TAP reader, so it buys nothing.
There is no control queue.

Transmit: each chain is the header and one frame, written with one ``writev`` from the
chain's views of guest RAM (no copy). A chain with no header, an empty or oversized frame,
device-writable buffers, or offload fields the driver did not negotiate is dropped and
counted; a frame the TAP refuses (EINVAL for a header the kernel finds inconsistent, EIO
while the TAP is down) is dropped and counted as an error. When the TAP pushes back (EAGAIN,
ENOBUFS) the chain is kept and sent again once the TAP is writable (EPOLLOUT): nothing is
dropped for being fast.

Receive: when the TAP is readable and the driver has posted buffers, frames are read
straight into a chain that can hold any frame the TAP may deliver; otherwise into a bounce
buffer and copied, across several chains when VIRTIO_NET_F_MRG_RXBUF is negotiated
(``num_buffers`` says how many, §5.1.6.4). With no buffers posted the device stops watching
the TAP (a readable TAP would wake the loop for nothing) and asks the driver for a
notification; it reads again when the driver posts buffers. Frames wait in the TAP's own
queue meanwhile and the kernel drops them when that is full, as a NIC does.

Rate limits (``devices/ratelimit.py``), one for each direction: a frame costs its bytes
(the virtio-net header aside) and one packet. A throttled transmit side stops taking chains
from the ring; a throttled receive side stops reading the TAP, so frames wait in the TAP's
queue and the kernel drops what overflows it, as at a real NIC; a frame kasou has read is
always delivered. Both go on when a timer on the reactor says the buckets allow more.

Work runs on the device's reactor in batches: up to ``BATCH`` frames a turn each way, one
interrupt a batch, and the rest in a later turn so other devices of the VM get theirs.

Snapshots (``NetState``): what the device holds between two reactor turns is saved: the
receive chains it popped and has not used, a transmit chain the TAP pushed back, and a frame
waiting in the bounce buffer for receive chains. Nothing else is buffered in Python. The TAP
is the host's and is not saved: frames in its queue at the snapshot stay with the old TAP.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from kasou.devices.ratelimit import Clock, RateLimit, Throttle
from kasou.devices.virtio.device import Reactor, VirtioDevice
from kasou.devices.virtio.queue import Chain, ChainError, RingError, Virtqueue, scatter
from kasou.devices.virtio.spec import DeviceType
from kasou.errors import ConfigError, KasouError
from kasou.persist import encode_state

__all__ = ["HEADER_SIZE", "MAX_FRAME", "Net", "NetBackend", "NetState", "mac_for"]

log = logging.getLogger(__name__)

RX = 0
TX = 1
QUEUE_SIZE = 256
BATCH = 128
"""Frames moved each way in one reactor turn before other handlers get a turn."""

# Feature bits (§5.1.3).
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16

S_LINK_UP = 1  # virtio_net_config.status (§5.1.4)

# struct virtio_net_hdr_v1 (§5.1.6): flags u8, gso_type u8, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers (le16 each).
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size
NUM_BUFFERS_AT = 10
NUM_BUFFERS = struct.Struct("<H")
HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
assert HEADER_SIZE == 12

MAX_FRAME = 0xFFFF + 14 + 4
"""The longest frame either side may move: an IP packet's 16-bit total length (a TSO frame
is one packet to the TAP) plus an Ethernet header with a VLAN tag."""

VLAN_ETH_HLEN = 18  # Ethernet header and one 802.1Q tag: frames are at most MTU + this
IOV_MAX = 1024  # UIO_MAXIOV: the most buffers one readv/writev takes

# What one receive step ended with.
_DONE = 0  # a frame was delivered (or dropped): go on
_EMPTY = 1  # the TAP has nothing to read
_NO_BUFFERS = 2  # the driver posted no (or not enough) buffers


@dataclass(frozen=True)
class NetState:
    """What a virtio-net device held at a snapshot. Field names are a format contract.

    ``rx_heads``: receive chains popped and not yet used, oldest first; ``tx_head``: the
    transmit chain the TAP pushed back, if any; ``rx_frame``: a frame (with its virtio-net
    header) read from the TAP and waiting for receive chains, or empty."""

    rx_heads: tuple[int, ...]
    tx_head: int | None
    rx_frame: bytes


class NetBackend(Protocol):
    """What the device needs of a TAP (``kasou.tap.Tap`` is one): a non-blocking fd with a
    ``vnet_header_size``-byte virtio-net header before each frame."""

    fd: int
    name: str
    mtu: int
    vnet_header_size: int

    def set_offload(
        self,
        *,
        csum: bool = False,
        tso4: bool = False,
        tso6: bool = False,
        ecn: bool = False,
        ufo: bool = False,
    ) -> None: ...

    def close(self) -> None: ...


def mac_for(name: str) -> bytes:
    """A locally administered unicast MAC derived from an interface name: the same TAP gives
    the guest the same MAC on every run (the guest's DHCP leases and neighbours stay valid)."""
    digest = bytearray(hashlib.sha256(b"kasou-net:" + name.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02  # IEEE 802: bit 0 unicast, bit 1 locally administered
    return bytes(digest)


def _parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(part, 16) for part in parts if len(part) == 2)
    except ValueError:
        mac = b""
    if len(mac) != 6 or len(parts) != 6:
        raise ConfigError("net", f"mac={text}: write it like 52:54:00:12:34:56")
    if mac[0] & 1:
        raise ConfigError("net", f"mac={text} is a multicast address: use a unicast one")
    return mac


class Net(VirtioDevice):
    """A virtio-net device over one TAP."""

    device_type = DeviceType.NET
    name = "net"

    def __init__(
        self,
        reactor: Reactor,
        tap: NetBackend,
        mac: str | None = None,
        name: str = "net",
        *,
        rx_rate: RateLimit | None = None,
        tx_rate: RateLimit | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        try:
            if tap.vnet_header_size != HEADER_SIZE:
                raise ConfigError(
                    "net", f"TAP {tap.name} carries {tap.vnet_header_size}-byte headers, not 12"
                )
            self.mac = mac_for(tap.name) if mac is None else _parse_mac(mac)
        except KasouError:
            tap.close()
            raise
        features = (
            F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_STATUS
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_MRG_RXBUF
        )
        # §5.1.4.1: an MTU below IPv4's minimum would make the driver refuse the device.
        if 68 <= tap.mtu <= 0xFFFF:
            features |= F_MTU
        super().__init__(reactor, (QUEUE_SIZE, QUEUE_SIZE), features)
        self.name = name
        self.tap = tap
        self.link_up = True
        self.stats = {
            "rx_packets": 0,
            "rx_bytes": 0,
            "rx_dropped": 0,
            "rx_errors": 0,
            "rx_waits": 0,  # times the TAP had frames but the driver had posted no buffers
            "tx_packets": 0,
            "tx_bytes": 0,
            "tx_dropped": 0,
            "tx_errors": 0,
            "tx_waits": 0,  # times the TAP pushed back (EAGAIN/ENOBUFS) and a frame waited
        }
        # One buffer for frames that do not go straight into a chain; one byte more than the
        # longest frame, so a frame that fills it is known to be cut short.
        self._bounce = bytearray(HEADER_SIZE + MAX_FRAME + 1)
        self._bounce_view = memoryview(self._bounce)
        self.rx_throttle = Throttle(reactor, self._rx_resume, rx_rate, clock)
        self.tx_throttle = Throttle(reactor, self._transmit, tx_rate, clock)
        # Set on the reactor once an activation's state is in place, cleared by a reset: a
        # handler still running for the last activation when the driver resets and starts
        # the device again (``active`` is already back on) must not use that state.
        self._live = False
        self._warned_down = False
        self._restored: NetState | None = None  # from ``load_state``, for ``on_activate``
        self._reset_datapath()

    # --- config space and features ------------------------------------------------------

    def config(self) -> bytes:
        # struct virtio_net_config (§5.1.4) up to mtu: mac, status, max_virtqueue_pairs, mtu.
        status = S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, self.tap.mtu & 0xFFFF)

    def counters(self) -> dict[str, Any]:
        return {
            **self.stats,
            "tap": self.tap.name,
            "mac": self.mac.hex(":"),
            "link": "up" if self.link_up else "down",
            "rx_rate_limit": self.rx_throttle.describe(),
            "tx_rate_limit": self.tx_throttle.describe(),
        }

    def close(self) -> None:
        super().close()
        self._live = False
        # Held chains are views of guest RAM: drop them, or RAM could not be unmapped.
        self._reset_datapath()
        self.tap.close()

    # --- activation ---------------------------------------------------------------------

    def _reset_datapath(self) -> None:
        """Forget everything tied to one activation (on the reactor thread)."""
        self._held: deque[Chain] = deque()  # rx chains popped and not yet used
        self._held_bytes = 0
        self._pending_len = 0  # bytes of a frame waiting in the bounce buffer for chains
        self._tx_pending: Chain | None = None  # a chain the TAP pushed back
        self._tx_continue = False  # a later turn is scheduled to go on transmitting
        self._want_in = False
        self._want_out = False
        self._events = 0  # what the TAP's fd is registered for now (0: not registered)

    def on_reset(self) -> None:
        self._live = False
        self._restored = None

    # --- snapshots ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        serving = self._serving()
        state = NetState(
            rx_heads=tuple(chain.head for chain in self._held) if serving else (),
            tx_head=(self._tx_pending.head if serving and self._tx_pending is not None else None),
            rx_frame=bytes(self._bounce_view[: self._pending_len]) if serving else b"",
        )
        return encode_state(state)

    def load_state(self, data: bytes) -> None:
        state = self.decode_state(data, NetState)
        self.check_heads("rx_heads", state.rx_heads, RX)
        tx_head = state.tx_head
        if tx_head is not None and not 0 <= tx_head < QUEUE_SIZE:
            raise self.state_error("tx_head", f"{tx_head} is not below the queue's {QUEUE_SIZE}")
        frame = len(state.rx_frame)
        if frame and not HEADER_SIZE + 14 <= frame <= HEADER_SIZE + MAX_FRAME:
            raise self.state_error(
                "rx_frame", f"{frame} bytes (a header and a frame of 14 to {MAX_FRAME} bytes)"
            )
        self._restored = state

    def _take_back(self, state: NetState) -> None:
        """Hold again what the device held at the snapshot (on the reactor, once live)."""
        rx, tx = self.queues[RX], self.queues[TX]
        if rx.live:
            for chain in self.held_chains(rx, state.rx_heads):
                if chain.writable_len < HEADER_SIZE:
                    rx.push(chain.head, 0)  # as ``_take`` does: it cannot hold a frame
                    continue
                self._held.append(chain)
                self._held_bytes += chain.writable_len
        if tx.live and state.tx_head is not None:
            for chain in self.held_chains(tx, (state.tx_head,)):
                self._tx_pending = chain
        if state.rx_frame:
            self._bounce[: len(state.rx_frame)] = state.rx_frame
            self._pending_len = len(state.rx_frame)

    def _serving(self) -> bool:
        return self.active and self._live

    def on_activate(self) -> None:
        self._reset_datapath()
        csum = self.has_feature(F_GUEST_CSUM)
        tso4 = csum and self.has_feature(F_GUEST_TSO4)
        tso6 = csum and self.has_feature(F_GUEST_TSO6)
        ecn = (tso4 or tso6) and self.has_feature(F_GUEST_ECN)
        try:
            self.tap.set_offload(csum=csum, tso4=tso4, tso6=tso6, ecn=ecn)
        except KasouError as error:
            # The TAP then hands over plain, fully checksummed frames: any guest takes those.
            log.warning("%s: %s; receiving without offloads", self.name, error)
            csum = tso4 = tso6 = ecn = False
            try:
                self.tap.set_offload()
            except KasouError:
                pass  # nothing better to fall back to; TUNSETOFFLOAD 0 was set at open
        self._rx_csum = csum
        self._mergeable = self.has_feature(F_MRG_RXBUF)
        # A chain at least this long takes any frame the TAP can deliver: read straight in.
        longest = MAX_FRAME if tso4 or tso6 else min(MAX_FRAME, self.tap.mtu + VLAN_ETH_HLEN)
        self._direct_min = HEADER_SIZE + longest
        # What the driver may ask of the TAP on transmit (§5.1.6.2: only negotiated offloads).
        self._tx_csum = self.has_feature(F_CSUM)
        allowed = {GSO_NONE}
        if self._tx_csum and self.has_feature(F_HOST_TSO4):
            allowed.add(GSO_TCPV4)
        if self._tx_csum and self.has_feature(F_HOST_TSO6):
            allowed.add(GSO_TCPV6)
        if self.has_feature(F_HOST_ECN):
            allowed |= {kind | GSO_ECN for kind in allowed if kind != GSO_NONE}
        self._tx_gso = frozenset(allowed)
        self._live = True
        restored, self._restored = self._restored, None
        if restored is not None:
            self._take_back(restored)
        # A transmit chain taken back waits for the TAP to be writable, as it did.
        self._set_watch(rx=True, tx=self._tx_pending is not None)

    def _set_watch(self, *, rx: bool, tx: bool) -> None:
        """Register the TAP's fd for what the device waits on now (the loop has no modify,
        so a change is a remove and an add; it happens when buffers or room run out)."""
        self._want_in, self._want_out = rx, tx
        events = (select.EPOLLIN if rx else 0) | (select.EPOLLOUT if tx else 0)
        if not self.link_up or not self._serving():
            events = 0
        if events == self._events:
            return
        if self._events:
            self.unwatch(self.tap.fd)
        self._events = events
        if events:
            self.watch(self.tap.fd, self._tap_ready, events)

    def _tap_ready(self, events: int) -> None:
        if not self._serving():
            # NEEDS_RESET (or a reset on its way): a readable TAP must not spin the loop.
            self._set_watch(rx=False, tx=False)
            return
        if events & (select.EPOLLERR | select.EPOLLHUP):
            self._link_lost("the TAP was detached (deleted?)")
            return
        if events & select.EPOLLOUT:
            self._set_watch(rx=self._want_in, tx=False)
            self._transmit()
        if events & select.EPOLLIN and self._serving():
            self._receive()

    def _link_lost(self, reason: str) -> None:
        """The TAP is gone: stop watching it, tell the guest the link is down (§5.1.4:
        status with VIRTIO_NET_F_STATUS, announced by a config change)."""
        if not self.link_up:
            return
        log.warning("%s: TAP %s: %s; the link is down", self.name, self.tap.name, reason)
        self._set_watch(rx=False, tx=False)
        self.link_up = False
        if self.interrupt is not None:
            self.interrupt.signal_config()
        if self._tx_pending is not None:
            self._transmit()  # the waiting frame fails now instead of waiting for ever

    def run_queue(self, queue: Virtqueue) -> None:
        """A notification on ``queue``: transmit what the driver queued, or receive into the
        buffers it posted. (Both loops handle notifications themselves: neither may spin on
        buffers that wait for the TAP.)"""
        if not self._serving() or not queue.live:
            return
        if queue.index == TX:
            self._transmit()
        else:
            self._receive()

    def process(self, queue: Virtqueue) -> None:
        self.run_queue(queue)

    # --- transmit -----------------------------------------------------------------------

    def _transmit(self) -> None:
        queue = self.queues[TX]
        if not self._serving() or not queue.live or self._want_out:
            return  # not running, or waiting for the TAP to take the pending frame
        sent = 0
        throttle = self.tx_throttle
        try:
            while self._serving():
                queue.disable_notifications()
                while sent < BATCH:
                    if (
                        throttle.active
                        and (self._tx_pending or queue.has_available())
                        and throttle.blocked()
                    ):
                        return  # notifications stay off: the throttle's timer goes on
                    chain = self._tx_pending or self._pop(queue, "tx")
                    if chain is None:
                        break
                    self._tx_pending = None
                    if not self._send(chain):
                        # The TAP pushed back: keep the chain, go on when it is writable.
                        self._tx_pending = chain
                        self.stats["tx_waits"] += 1
                        self._set_watch(rx=self._want_in, tx=True)
                        return
                    queue.use(chain, 0)
                    if throttle.active:
                        throttle.charge(max(0, chain.readable_len - HEADER_SIZE))
                    sent += 1
                if sent >= BATCH:
                    self._continue_later()
                    return
                if not queue.enable_notifications():
                    return
        except RingError as error:
            self.fail(str(error))
        finally:
            self.signal(queue)  # one interrupt for the batch, if the driver wants one

    def _continue_later(self) -> None:
        if not self._tx_continue:
            self._tx_continue = True
            self.reactor.call_soon(self._continued)

    def _continued(self) -> None:
        self._tx_continue = False
        self._transmit()

    def _send(self, chain: Chain) -> bool:
        """Write one frame to the TAP; False when the TAP pushed back (try again later)."""
        problem = self._tx_problem(chain)
        if problem:
            self.stats["tx_dropped"] += 1
            log.debug("%s: tx chain %d dropped: %s", self.name, chain.head, problem)
            return True
        views = chain.readable
        try:
            if len(views) <= IOV_MAX:
                os.writev(self.tap.fd, views)
            else:
                os.writev(self.tap.fd, [chain.read()])
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ENOBUFS) and self.link_up:
                return False
            # EINVAL: the kernel found the header or frame inconsistent; EIO: the TAP is
            # down; EBADFD: it was deleted. The frame is lost, as on a wire.
            self.stats["tx_errors"] += 1
            if error.errno == errno.EIO and not self._warned_down:
                self._warned_down = True
                log.warning(
                    "%s: TAP %s is down: frames from the guest are dropped until it is up "
                    "(ip link set %s up)",
                    self.name,
                    self.tap.name,
                    self.tap.name,
                )
            log.debug("%s: the TAP refused a frame: %s", self.name, error.strerror)
            return True
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += chain.readable_len - HEADER_SIZE
        return True

    def _tx_problem(self, chain: Chain) -> str:
        """Why a transmit chain cannot go to the TAP ("" when it can). Every field checked
        here is the driver's; nothing else is read from the header."""
        if chain.writable:
            return "it has device-writable buffers"
        size = chain.readable_len
        if size <= HEADER_SIZE:
            return f"{size} bytes: no frame after the 12-byte header"
        if size - HEADER_SIZE > MAX_FRAME:
            return f"a frame of {size - HEADER_SIZE} bytes (at most {MAX_FRAME})"
        first = chain.readable[0]
        if len(first) < 2:
            first = memoryview(chain.read(2))
        flags, gso_type = first[0], first[1]
        if flags & HDR_F_NEEDS_CSUM and not self._tx_csum:
            return "a partial checksum without VIRTIO_NET_F_CSUM"
        if gso_type not in self._tx_gso:
            return f"gso_type {gso_type:#x} was not negotiated"
        return ""

    # --- receive ------------------------------------------------------------------------

    def _receive(self) -> None:
        queue = self.queues[RX]
        if not self._serving() or not queue.live or not self.link_up:
            return
        delivered = 0
        try:
            queue.disable_notifications()
            while self._serving():
                if not self._pending_len and self.rx_throttle.active and self.rx_throttle.blocked():
                    # Leave frames in the TAP until the throttle's timer (``_rx_resume``).
                    self._set_watch(rx=False, tx=self._want_out)
                    break
                if delivered >= BATCH:
                    # More may wait: the TAP stays watched and wakes the loop again after
                    # the other handlers had their turn.
                    self._set_watch(rx=True, tx=self._want_out)
                    break
                outcome = self._receive_one(queue)
                if outcome == _DONE:
                    delivered += 1
                    continue
                if outcome == _EMPTY:
                    self._set_watch(rx=True, tx=self._want_out)
                    break
                # No buffers: ask for a notification when the driver posts some (§2.7.10),
                # unless some came in meanwhile; stop watching the TAP until then.
                if queue.enable_notifications():
                    queue.disable_notifications()
                    continue
                self.stats["rx_waits"] += 1
                self._set_watch(rx=False, tx=self._want_out)
                break
        except RingError as error:
            self.fail(str(error))
        finally:
            self.signal(queue)

    def _rx_resume(self) -> None:
        if self._serving():
            self._receive()

    def _rx_chain(self, queue: Virtqueue) -> Chain | None:
        """The next buffer to fill: one held back earlier, else the next the driver posted."""
        if self._held:
            return self._held[0]
        if not self._take(queue):
            return None
        return self._held[0]

    def _take(self, queue: Virtqueue) -> bool:
        """Pop one more usable receive chain into the held ones; False when none is there."""
        while True:
            chain = self._pop(queue, "rx")
            if chain is None:
                return False
            if chain.writable_len < HEADER_SIZE:
                # Too short for even the header (§5.1.6.3.1 asks for far more): unusable.
                self.stats["rx_errors"] += 1
                log.debug("%s: rx chain %d of %d bytes", self.name, chain.head, chain.writable_len)
                queue.push(chain.head, 0)
                continue
            self._held.append(chain)
            self._held_bytes += chain.writable_len
            return True

    def _use(self, queue: Virtqueue, length: int) -> None:
        """Return the first held chain to the driver with ``length`` bytes written."""
        chain = self._held.popleft()
        self._held_bytes -= chain.writable_len
        queue.use(chain, length)

    def _receive_one(self, queue: Virtqueue) -> int:
        if self._pending_len:
            return self._place(queue)
        chain = self._rx_chain(queue)
        if chain is None:
            return _NO_BUFFERS
        if chain.writable_len >= self._direct_min and len(chain.writable) <= IOV_MAX:
            # The chain takes any frame the TAP can deliver: read straight into guest RAM.
            length = self._read(chain.writable)
            if length < 0:
                return _EMPTY
            if length < HEADER_SIZE + 14:
                self.stats["rx_errors"] += 1
                return _DONE  # the chain stays held for the next frame
            self._finish_header(chain.writable, 1)
            self._use(queue, length)
            self._count_rx(length)
            return _DONE
        length = self._read([self._bounce_view])
        if length < 0:
            return _EMPTY
        if length == len(self._bounce) or length < HEADER_SIZE + 14:
            self.stats["rx_dropped" if length > HEADER_SIZE else "rx_errors"] += 1
            return _DONE
        self._pending_len = length
        return self._place(queue)

    def _place(self, queue: Virtqueue) -> int:
        """Copy the frame in the bounce buffer into as many chains as it needs (one without
        mergeable buffers); hold it while the driver has not posted enough."""
        length = self._pending_len
        if not self._mergeable:
            chain = self._rx_chain(queue)
            if chain is None:
                return _NO_BUFFERS
            self._pending_len = 0
            if chain.writable_len < length:
                # The driver's buffers are smaller than §5.1.6.3.1 asks for this frame.
                self.stats["rx_dropped"] += 1
                return _DONE
            self._finish_header([self._bounce_view], 1)
            chain.write(self._bounce_view[:length])
            self._use(queue, length)
            self._count_rx(length)
            return _DONE
        while self._held_bytes < length:
            if not self._take(queue):
                if len(self._held) >= queue.size:
                    # The whole ring cannot hold it: this frame can never be delivered.
                    self._pending_len = 0
                    self.stats["rx_dropped"] += 1
                    return _DONE
                return _NO_BUFFERS
        # §5.1.6.4: num_buffers in the first buffer's header counts the buffers used.
        count = 0
        covered = 0
        for chain in self._held:
            count += 1
            covered += chain.writable_len
            if covered >= length:
                break
        self._finish_header([self._bounce_view], count)
        self._pending_len = 0
        offset = 0
        for _ in range(count):
            chain = self._held[0]
            piece = min(chain.writable_len, length - offset)
            chain.write(self._bounce_view[offset : offset + piece])
            offset += piece
            self._use(queue, piece)
        self._count_rx(length)
        return _DONE

    def _finish_header(self, views: list[memoryview], count: int) -> None:
        """Set what the TAP leaves to the device: ``num_buffers``, and no checksum flags
        for a driver that did not negotiate them (§5.1.6.4)."""
        scatter(views, NUM_BUFFERS_AT, NUM_BUFFERS.pack(count))
        if not self._rx_csum:
            scatter(views, 0, b"\0")

    def _read(self, views: list[memoryview]) -> int:
        """One frame from the TAP into ``views``; -1 when there is none (or the TAP failed)."""
        try:
            length = os.readv(self.tap.fd, views)
            if self.rx_throttle.active:
                self.rx_throttle.charge(max(0, length - HEADER_SIZE))
            return length
        except BlockingIOError:
            return -1
        except OSError as error:
            self.stats["rx_errors"] += 1
            self._link_lost(f"reading failed: {error.strerror}")
            return -1

    def _count_rx(self, length: int) -> None:
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += length - HEADER_SIZE

    # --- common -------------------------------------------------------------------------

    def _pop(self, queue: Virtqueue, direction: str) -> Chain | None:
        """The next chain, with malformed ones returned to the driver (and counted)."""
        while self._serving():
            try:
                return queue.pop()
            except ChainError as error:
                self.stats[f"{direction}_dropped"] += 1
                self.bad_chain(queue, error)
        return None
