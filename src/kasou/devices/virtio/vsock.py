"""virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host processes,
with the host side on Unix sockets in the shape Firecracker documents for its vsock device.

This module owns the packet format, the per-connection state machine (request, response,
shutdown, reset), credit-based flow control (§5.10.6.3) both ways, and the relay between
the guest's packets and Unix stream sockets. It does not offer SEQPACKET (no
VIRTIO_VSOCK_F_SEQPACKET), nor guest-to-guest or loopback traffic (the guest kernel keeps
its own loopback), nor snapshots of live connections.

Snapshots (``VsockState``) keep only the rx and event buffers the device holds. The host
side of every connection (Unix sockets, credit, queued control packets) is not saved: after
a restore the device tells a running guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.6) on
the event queue, as soon as the driver has an event buffer there, and the guest resets every
connection it had (Linux: ``virtio_vsock_event_handle``); listening sockets stay. So
connections in flight at a snapshot are reset in the restored VM, as Firecracker's vsock
does; the VM the snapshot was taken of keeps its own.

The host side:

- host-initiated: kasou listens on ``uds`` from the moment the device is built (a stale
  socket file left by an earlier run is replaced; the file is removed on ``close``). A host
  process connects and writes ``CONNECT <port>\\n``; kasou sends a REQUEST to guest port
  <port> from a fresh host port (counting from ``HOST_PORT_FIRST``), and on the guest's
  RESPONSE writes ``OK <hostport>\\n`` back and relays bytes both ways from then on. A
  guest RST (nothing listens on <port>), a bad first line, or no RESPONSE within
  ``CONNECT_TIMEOUT`` of the connection being accepted closes the Unix connection.
- guest-initiated: a guest connection to host CID 2, port P is relayed to the Unix socket
  ``<uds>_P``, connected to when the REQUEST comes; where that fails the guest gets RST.

Flow control. Each packet carries its sender's ``buf_alloc`` and ``fwd_cnt``; a sender keeps
at most ``buf_alloc - (tx_cnt - fwd_cnt)`` bytes in flight (§5.10.6.3). Towards the guest,
kasou reads a Unix socket only while the guest has credit and has posted rx buffers, and
receives straight into those buffers, so nothing is buffered in kasou that way. From the
guest, payload is written to the Unix socket straight from guest memory; what the socket
does not take is kept, at most ``BUF_ALLOC`` bytes a connection (the credit kasou grants),
and ``fwd_cnt`` only counts bytes the Unix peer was given, so a peer that stops reading
stops the guest. A guest that sends beyond its credit has that connection reset.

Everything in a packet is the guest's and untrusted: a packet whose length, CIDs, type or
operation is wrong is dropped (and resets the connection it names, if any); a packet for
no connection is answered RST; the connection table holds ``max_connections`` at most and a
REQUEST past it is answered RST. Control packets waiting for rx buffers are bounded: a
connection has at most one of each kind pending, and RSTs past ``RESET_QUEUE_LIMIT`` are
dropped.

Threads: everything but the constructor, ``reset`` and ``close`` runs on the device's
reactor. ``close`` runs after the reactor has stopped (the builder's order).
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import select
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.devices.virtio.device import Reactor, VirtioDevice
from kasou.devices.virtio.queue import Chain, ChainError, Virtqueue, gather, split_views
from kasou.devices.virtio.spec import DeviceType
from kasou.errors import ConfigError
from kasou.event.unix import listen_unix
from kasou.persist import encode_state

__all__ = [
    "BUF_ALLOC",
    "CONNECT_TIMEOUT",
    "HOST_CID",
    "HOST_PORT_FIRST",
    "MAX_CONNECTIONS",
    "MAX_PAYLOAD",
    "Op",
    "Vsock",
    "VsockState",
]

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
RX, TX, EVENT = 0, 1, 2  # §5.10.2: rxq, txq, eventq

HOST_CID = 2  # VMADDR_CID_HOST (§5.10.4)
F_STREAM = 1 << 0  # VIRTIO_VSOCK_F_STREAM (§5.10.3)
TYPE_STREAM = 1  # VIRTIO_VSOCK_TYPE_STREAM (§5.10.6)
SHUTDOWN_RCV = 1  # VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: the sender will receive no more
SHUTDOWN_SEND = 2  # VIRTIO_VSOCK_SHUTDOWN_F_SEND: the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND


class Op(enum.IntEnum):
    """Packet operations (§5.10.6)."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


# struct virtio_vsock_hdr (§5.10.6): src_cid u64, dst_cid u64, src_port u32, dst_port u32,
# len u32, type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32; little endian, packed.
_HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = _HEADER.size
_CONFIG = struct.Struct("<Q")  # struct virtio_vsock_config: guest_cid (§5.10.4)
_EVENT = struct.Struct("<I")  # struct virtio_vsock_event: id (§5.10.6.6)
EVENT_TRANSPORT_RESET = 0  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
assert HEADER_SIZE == 44

U32 = 0xFFFFFFFF

BUF_ALLOC = 256 << 10
"""The receive buffer kasou advertises for each connection: the most it holds for one."""

MAX_PAYLOAD = 64 << 10
"""The largest payload one packet may carry (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE in Linux)."""

CREDIT_THRESHOLD = 64 << 10
"""kasou sends CREDIT_UPDATE once the free space the guest knows of falls below this and
kasou has more to give."""

MAX_CONNECTIONS = 1024
"""Connections at once (host- and guest-initiated, and host ones still handshaking)."""

RESET_QUEUE_LIMIT = 4096
"""RSTs kept while the guest has posted no rx buffers; past it they are dropped (the
guest's own timeouts end those connections)."""

CONNECT_TIMEOUT = 2.0
"""Seconds a host connection has, from accept, to send its line and see the guest answer."""

LINGER = 2.0
"""Seconds kasou waits for the guest's RST after shutting a connection down both ways."""

HOST_PORT_FIRST = 1 << 30
"""The first host port given to host-initiated connections (then counting up)."""

_LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
_CONNECT_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
_READ_BATCH = 16  # packets read from one Unix socket before others get a turn
_ACCEPT_BATCH = 32
_ACCEPT_RETRY = 0.5  # seconds before accepting again after accept(2) failed (EMFILE)
_BACKLOG = 128
_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT

_OPS = frozenset(int(op) for op in Op)

# The order in which one connection's pending control packets go out: the handshake first,
# credit next, SHUTDOWN last (it follows every byte of data).
_CONTROL_ORDER = (Op.REQUEST, Op.RESPONSE, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST, Op.SHUTDOWN)


@dataclass(frozen=True)
class VsockState:
    """A vsock device as saved: the rx and event buffers it held (their heads, oldest
    first). Field names are a snapshot format contract."""

    rx_heads: tuple[int, ...]
    event_heads: tuple[int, ...]


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # a host connection whose CONNECT line is not complete
    CONNECTING = "connecting"  # REQUEST sent (or to be sent), RESPONSE not yet
    ESTABLISHED = "established"
    CLOSING = "closing"  # the Unix side is closed; waiting for the guest's RST
    CLOSED = "closed"


class _Conn:
    """One connection: a Unix stream socket and the guest's side of it."""

    __slots__ = (
        "credit_asked",
        "events",
        "fwd_cnt",
        "fwd_told",
        "guest_knows",
        "guest_no_recv",
        "guest_no_send",
        "handler",
        "host_eof",
        "host_initiated",
        "host_no_recv",
        "line",
        "local_port",
        "out",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "peer_port",
        "pending",
        "queued",
        "read_shut",
        "rx_cnt",
        "shut_told",
        "sock",
        "state",
        "tx_cnt",
        "waiting_rx",
        "write_shut",
    )

    def __init__(self, sock: socket.socket, state: _State, host_initiated: bool) -> None:
        self.sock = sock
        self.state = state
        self.host_initiated = host_initiated
        self.local_port = 0  # the host's port
        self.peer_port = 0  # the guest's port
        self.line = b""  # the CONNECT line read so far
        self.guest_knows = False  # a REQUEST went either way: ending it takes an RST
        self.events: int | None = None  # the reactor registration, None while unwatched
        self.handler: Callable[[int], None] | None = None
        # Host -> guest: bytes sent, and the guest's receive buffer as it last told.
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_asked = False
        self.waiting_rx = False  # readable, but the guest has posted no rx buffer
        # Guest -> host: bytes received, bytes given to the Unix peer (or dropped because it
        # is gone), the fwd_cnt the guest last saw, and what the Unix socket has not taken.
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.fwd_told = 0
        self.out = bytearray()
        # Shutdown, each side's view (§5.10.6.5).
        self.guest_no_send = False
        self.guest_no_recv = False
        self.host_eof = False  # the Unix peer will send no more
        self.host_no_recv = False  # the Unix peer takes no more (closed, or SHUT_RD)
        self.write_shut = False
        self.read_shut = False
        self.shut_told = 0  # SHUTDOWN flags sent to the guest so far
        # Control packets waiting for an rx buffer: a bit per Op.
        self.pending = 0
        self.queued = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def credit(self) -> int:
        """Bytes the guest can take now (§5.10.6.3); a lying guest gets 0, never more."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)


class Vsock(VirtioDevice):
    """A virtio-vsock device relaying the guest's stream connections to Unix sockets."""

    device_type = DeviceType.VSOCK
    name = "vsock"

    def __init__(
        self,
        reactor: Reactor,
        cid: int,
        uds: Path,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        linger: float = LINGER,
        name: str = "vsock",
    ) -> None:
        # §5.10.4: CIDs 0-2 are reserved, and 0xffffffff is VMADDR_CID_ANY.
        if not 3 <= cid < U32:
            raise ConfigError("vsock", f"cid={cid}: give a number from 3 to {U32 - 1}")
        super().__init__(reactor, (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE), F_STREAM)
        self.name = name
        self.cid = cid
        self.uds = Path(uds)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.linger = linger
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._handshaking: set[_Conn] = set()
        self._next_port = HOST_PORT_FIRST
        self._rx_chains: deque[Chain] = deque()
        self._event_chains: list[Chain] = []  # held for a future transport reset event
        self._resets: deque[bytes] = deque()
        self._control: deque[_Conn] = deque()
        self._rx_waiters: deque[_Conn] = deque()
        self._rx_pushed = False
        self._restored: VsockState | None = None  # from ``load_state``, for ``on_activate``
        self._transport_reset = False  # a TRANSPORT_RESET event waits for an event buffer
        self.stats = {
            "connections_total": 0,
            "host_initiated": 0,
            "guest_initiated": 0,
            "bytes_to_guest": 0,
            "bytes_from_guest": 0,
            "packets_to_guest": 0,
            "packets_from_guest": 0,
            "resets_sent": 0,
            "resets_received": 0,
            "dropped_packets": 0,
            "refused": 0,
        }
        self._listener: socket.socket | None = listen_unix(self.uds, "vsock", backlog=_BACKLOG)
        self._listener_inode = os.stat(self.uds).st_ino
        reactor.add_reader(self._listener.fileno(), self._accept)

    # --- the transport's calls ----------------------------------------------------------

    def config(self) -> bytes:
        return _CONFIG.pack(self.cid)

    def counters(self) -> dict[str, Any]:
        conns = list(self._conns.values())
        return {
            **self.stats,
            "cid": self.cid,
            "uds": str(self.uds),
            "connections": len(conns) + len(self._handshaking),
            "buffered": sum(len(conn.out) for conn in conns),
        }

    def on_activate(self) -> None:
        restored, self._restored = self._restored, None
        if restored is not None:
            # A restore: the buffers held at the snapshot are held again, and the guest is
            # told its connections are gone (the host side of them was not saved).
            for index, heads, held in (
                (RX, restored.rx_heads, self._rx_chains),
                (EVENT, restored.event_heads, self._event_chains),
            ):
                if self.queues[index].live:
                    held.extend(self.held_chains(self.queues[index], heads))
            self._transport_reset = True
            self._send_transport_reset()
        self._pump()

    def on_reset(self) -> None:
        # On the reset's thread: the connections are the reactor's, so they are closed there
        # (after the base class's ``_stopped``, before any new activation's ``_started``).
        self._restored = None
        self.reactor.call_soon(self._reset_connections)

    # --- snapshots ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        active = self.active  # a stopped device's buffers are being forgotten
        state = VsockState(
            rx_heads=tuple(chain.head for chain in self._rx_chains) if active else (),
            event_heads=tuple(chain.head for chain in self._event_chains) if active else (),
        )
        return encode_state(state)

    def load_state(self, data: bytes) -> None:
        state = self.decode_state(data, VsockState)
        self.check_heads("rx_heads", state.rx_heads, RX)
        self.check_heads("event_heads", state.event_heads, EVENT)
        self._restored = state

    def _send_transport_reset(self) -> None:
        """Put a waiting TRANSPORT_RESET event (§5.10.6.6) into the first event buffer."""
        queue = self.queues[EVENT]
        while self._transport_reset and self._event_chains and self.active:
            chain = self._event_chains.pop(0)
            if chain.writable_len < _EVENT.size:
                self.bad_chain(queue, ChainError(chain.head, "an event buffer under 4 bytes"))
                continue
            chain.write(_EVENT.pack(EVENT_TRANSPORT_RESET))
            queue.use(chain, _EVENT.size)
            self._transport_reset = False
        self.signal(queue)

    def close(self) -> None:
        super().close()
        listener, self._listener = self._listener, None
        if listener is not None:
            self.reactor.remove(listener.fileno())
            listener.close()
            try:
                if os.stat(self.uds).st_ino == self._listener_inode:
                    os.unlink(self.uds)
            except OSError:
                pass  # already gone, or replaced by someone else's: leave it
        self._reset_connections()

    def _reset_connections(self) -> None:
        for conn in [*self._conns.values(), *self._handshaking]:
            self._drop(conn, rst=False)
        self._rx_chains.clear()
        self._event_chains.clear()
        self._resets.clear()
        self._control.clear()
        self._rx_waiters.clear()
        self._rx_pushed = False
        self._transport_reset = False

    # --- queues -------------------------------------------------------------------------

    def process(self, queue: Virtqueue) -> None:
        if queue.index == TX:
            self._transmit(queue)
        elif queue.index == RX:
            self._take_rx_buffers(queue)
        else:
            self._take_event_buffers(queue)
        self._pump()

    def _take_rx_buffers(self, queue: Virtqueue) -> None:
        # The rx buffers are popped as they come and kept until there is a packet for them
        # (a virtqueue cannot be peeked), so notifications stay on while they wait.
        while self.active:
            try:
                chain = queue.pop()
            except ChainError as error:
                self.bad_chain(queue, error)
                self._rx_pushed = True
                continue
            if chain is None:
                break
            if chain.writable_len <= HEADER_SIZE:
                small = ChainError(chain.head, f"an rx buffer of {chain.writable_len} bytes")
                self.bad_chain(queue, small)
                self._rx_pushed = True
                continue
            self._rx_chains.append(chain)

    def _take_event_buffers(self, queue: Virtqueue) -> None:
        while self.active:
            try:
                chain = queue.pop()
            except ChainError as error:
                self.bad_chain(queue, error)
                self.signal(queue)
                continue
            if chain is None:
                break
            self._event_chains.append(chain)
        self._send_transport_reset()

    def _transmit(self, queue: Virtqueue) -> None:
        for chain in self.chains(queue):
            self._packet(chain)
            # Nothing of the chain is kept: what the Unix socket did not take was copied.
            queue.use(chain, 0)
        self.signal(queue)

    # --- packets from the guest -----------------------------------------------------------

    def _packet(self, chain: Chain) -> None:
        self.stats["packets_from_guest"] += 1
        if chain.readable_len < HEADER_SIZE:
            self._dropped(None, f"a packet of {chain.readable_len} bytes")
            return
        (src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt) = (
            _HEADER.unpack(chain.read(HEADER_SIZE))
        )
        conn = self._conns.get((dst_port, src_port))
        problem = self._malformed(chain, src_cid, dst_cid, length, kind, op)
        if problem:
            self._dropped(conn, problem)
            return
        if conn is None:
            if op == Op.REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != Op.RST:
                # §5.10.6.5 (and Linux's virtio_transport_reset_no_sock): a packet for no
                # connection is answered RST.
                self._reset_unknown(dst_port, src_port)
            return
        if conn.state is _State.CLOSING:
            self._closing_packet(conn, op, length)
            return
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if op == Op.RST:
            self.stats["resets_received"] += 1
            self._drop(conn, rst=False)
        elif op == Op.RW:
            if conn.state is not _State.ESTABLISHED or conn.guest_no_send:
                self._drop(conn, rst=True)
            else:
                self._from_guest(conn, chain, length)
        elif op == Op.RESPONSE:
            if conn.state is _State.CONNECTING and conn.host_initiated and conn.guest_knows:
                self._accepted(conn)
            else:
                self._drop(conn, rst=True)
        elif op == Op.SHUTDOWN:
            if conn.state is not _State.ESTABLISHED:
                self._drop(conn, rst=True)
            else:
                conn.guest_no_recv |= bool(flags & SHUTDOWN_RCV)
                conn.guest_no_send |= bool(flags & SHUTDOWN_SEND)
        elif op == Op.CREDIT_REQUEST:
            self._queue(conn, Op.CREDIT_UPDATE)
        elif op == Op.REQUEST:
            # A second REQUEST for a live connection: the guest lost track of it.
            self._drop(conn, rst=True)
        # CREDIT_UPDATE carries nothing beyond the buf_alloc and fwd_cnt taken above.
        if conn.state is _State.ESTABLISHED:
            if conn.credit():
                conn.credit_asked = False
            self._settle(conn)

    def _malformed(
        self, chain: Chain, src_cid: int, dst_cid: int, length: int, kind: int, op: int
    ) -> str:
        """Why a packet cannot be taken, or "" when it can."""
        if chain.readable_len - HEADER_SIZE != length:
            return f"len {length} but {chain.readable_len - HEADER_SIZE} bytes of payload"
        if length > MAX_PAYLOAD:
            return f"a payload of {length} bytes (at most {MAX_PAYLOAD})"
        if src_cid != self.cid:
            return f"src_cid {src_cid} is not the guest's {self.cid}"
        if dst_cid != HOST_CID:
            return f"dst_cid {dst_cid} is not the host's"
        if kind != TYPE_STREAM:
            return f"socket type {kind} (only STREAM is offered)"
        if op not in _OPS:
            return f"operation {op}"
        if length and op != Op.RW:
            return f"a {Op(op).name} packet with {length} bytes of payload"
        return ""

    def _dropped(self, conn: _Conn | None, problem: str) -> None:
        log.debug("%s: packet dropped: %s", self.name, problem)
        self.stats["dropped_packets"] += 1
        if conn is not None:
            self._drop(conn, rst=True)

    def _closing_packet(self, conn: _Conn, op: int, length: int) -> None:
        """A packet for a connection kasou has shut both ways and waits to see reset."""
        if op == Op.RST:
            self.stats["resets_received"] += 1
            self._drop(conn, rst=False)
        elif op in (Op.SHUTDOWN, Op.REQUEST):
            self._drop(conn, rst=True)
        elif op == Op.RW:
            # In flight before the guest saw the SHUTDOWN: nobody reads it; credit it back.
            conn.rx_cnt += length
            conn.fwd_cnt += length

    def _guest_connect(self, port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        """A guest REQUEST to host port ``port``: relay it to ``<uds>_<port>``."""
        if self._count() >= self.max_connections:
            log.debug("%s: guest connection to port %d refused: table full", self.name, port)
            self.stats["refused"] += 1
            self._reset_unknown(port, peer_port)
            return
        path = f"{self.uds}_{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            # A Unix stream connect completes at once, or fails (EAGAIN: backlog full).
            sock.connect(path)
        except OSError as error:
            sock.close()
            log.debug("%s: guest connection to %s failed: %s", self.name, path, error)
            self._reset_unknown(port, peer_port)
            return
        conn = _Conn(sock, _State.CONNECTING, host_initiated=False)
        conn.local_port = port
        conn.peer_port = peer_port
        conn.guest_knows = True
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        self._conns[conn.key] = conn
        self.stats["connections_total"] += 1
        self.stats["guest_initiated"] += 1
        self._queue(conn, Op.RESPONSE)  # ESTABLISHED once it is sent (``_send_control``)

    def _accepted(self, conn: _Conn) -> None:
        """The guest's RESPONSE to a host-initiated REQUEST: tell the Unix peer."""
        line = f"OK {conn.local_port}\n".encode()
        try:
            sent = conn.sock.send(line, _SEND_FLAGS)
        except OSError:
            sent = -1
        if sent != len(line):  # a fresh socket takes 20 bytes, unless its peer is gone
            self._drop(conn, rst=True)
            return
        conn.state = _State.ESTABLISHED
        self._interest(conn)

    def _from_guest(self, conn: _Conn, chain: Chain, length: int) -> None:
        """RW payload from the guest: into the Unix socket, straight from guest memory."""
        if len(conn.out) + length > BUF_ALLOC:
            self._dropped(conn, f"the guest sent {length} bytes beyond its credit")
            return
        conn.rx_cnt += length
        self.stats["bytes_from_guest"] += length
        if conn.host_no_recv:
            conn.fwd_cnt += length  # nobody to give it to: dropped, and the credit freed
        elif conn.out:
            conn.out += gather(chain.readable, HEADER_SIZE, length)
        elif length:
            views = split_views(chain.readable, HEADER_SIZE, length)
            try:
                sent = conn.sock.sendmsg(views, (), _SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError:
                conn.host_no_recv = True
                conn.fwd_cnt += length
                return
            conn.fwd_cnt += sent
            if sent < length:
                conn.out += gather(chain.readable, HEADER_SIZE + sent, length - sent)
        self._credit_update_if_low(conn)

    # --- the Unix side ------------------------------------------------------------------

    def _accept(self, events: int) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as error:
                # Out of fds or memory: stop listening a moment instead of spinning on it.
                log.warning("%s: accept on %s failed: %s", self.name, self.uds, error)
                self.reactor.remove(listener.fileno())
                self.reactor.call_later(_ACCEPT_RETRY, self._listen_again)
                break
            sock.setblocking(False)
            if self._count() >= self.max_connections:
                self.stats["refused"] += 1
                sock.close()
                continue
            conn = _Conn(sock, _State.HANDSHAKE, host_initiated=True)
            self._handshaking.add(conn)
            self._interest(conn)
            self.reactor.call_later(self.connect_timeout, functools.partial(self._expire, conn))

    def _listen_again(self) -> None:
        if self._listener is not None:
            self.reactor.add_reader(self._listener.fileno(), self._accept)

    def _expire(self, conn: _Conn) -> None:
        if conn.state in (_State.HANDSHAKE, _State.CONNECTING):
            log.debug("%s: host connection to guest port %d timed out", self.name, conn.peer_port)
            self._drop(conn, rst=True)
            self._pump()

    def _read_line(self, conn: _Conn) -> None:
        """Read the CONNECT line, and not a byte past it (that is data for the guest)."""
        try:
            data = conn.sock.recv(_LINE_MAX - len(conn.line), socket.MSG_PEEK)
            end = data.find(b"\n")
            if end >= 0:
                data = data[: end + 1]
            if data:
                conn.sock.recv(len(data))  # what was peeked is there: this takes it all
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn, rst=False)
            return
        conn.line += data
        if end < 0:
            if len(conn.line) >= _LINE_MAX:
                self._drop(conn, rst=False)
            return
        match = _CONNECT_LINE.fullmatch(conn.line)
        port = int(match.group(1)) if match else U32
        if port >= U32:  # no match, or not a port (0xffffffff is VMADDR_PORT_ANY)
            log.debug("%s: bad first line %r on %s", self.name, conn.line, self.uds)
            self._drop(conn, rst=False)
            return
        local = self._host_port(port)
        if local is None:
            self._drop(conn, rst=False)
            return
        self._handshaking.discard(conn)
        conn.state = _State.CONNECTING
        conn.local_port = local
        conn.peer_port = port
        self._conns[conn.key] = conn
        self.stats["connections_total"] += 1
        self.stats["host_initiated"] += 1
        self._interest(conn)  # no reading until the guest answers
        self._queue(conn, Op.REQUEST)

    def _host_port(self, peer_port: int) -> int | None:
        for _ in range(self.max_connections + 1):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < U32 else HOST_PORT_FIRST
            if (port, peer_port) not in self._conns:
                return port
        return None

    def _socket_handler(self, conn: _Conn) -> Callable[[int], None]:
        def handler(events: int) -> None:
            if conn.state is _State.HANDSHAKE:
                self._read_line(conn)
            elif conn.state is _State.ESTABLISHED:
                if not self.active:
                    self._drop(conn, rst=False)  # the device broke: NEEDS_RESET
                    return
                if events & select.EPOLLHUP:
                    conn.host_no_recv = True  # the peer closed, or shut both ways
                if conn.out and events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                    self._flush(conn)
                if events & (select.EPOLLIN | select.EPOLLERR) and self._reading(conn):
                    self._to_guest(conn)
                self._settle(conn)
            self._pump()

        return handler

    def _flush(self, conn: _Conn) -> None:
        """Give the Unix peer what it did not take before."""
        while conn.out:
            try:
                sent = conn.sock.send(conn.out, _SEND_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                conn.host_no_recv = True
                break
            del conn.out[:sent]
            conn.fwd_cnt += sent
        self._credit_update_if_low(conn)

    def _to_guest(self, conn: _Conn) -> None:
        """Read the Unix socket straight into rx buffers, within the guest's credit."""
        for _ in range(_READ_BATCH):
            credit = conn.credit()
            if not credit:
                if not conn.credit_asked:
                    conn.credit_asked = True
                    self._queue(conn, Op.CREDIT_REQUEST)
                return
            if not self._rx_chains:
                if not conn.waiting_rx:
                    conn.waiting_rx = True
                    self._rx_waiters.append(conn)
                return
            chain = self._rx_chains[0]
            size = min(credit, chain.writable_len - HEADER_SIZE, MAX_PAYLOAD)
            views = split_views(chain.writable, HEADER_SIZE, size)
            try:
                if len(views) == 1:
                    got = conn.sock.recv_into(views[0])
                else:
                    got = conn.sock.recvmsg_into(views)[0]
            except BlockingIOError:
                return
            except OSError:
                got = 0  # ECONNRESET: the peer is gone
                conn.host_no_recv = True
            if not got:
                conn.host_eof = True
                return
            self._rx_chains.popleft()
            self._send(chain, self._header(conn, Op.RW, got), got)
            conn.tx_cnt += got
            self.stats["bytes_to_guest"] += got
            conn.pending &= ~(1 << Op.CREDIT_UPDATE)  # this header carries fwd_cnt too

    def _reading(self, conn: _Conn) -> bool:
        return (
            conn.state is _State.ESTABLISHED
            and not conn.host_eof
            and not conn.guest_no_recv
            and not conn.waiting_rx
            and conn.credit() > 0
        )

    def _interest(self, conn: _Conn) -> None:
        """Watch the connection's socket for what kasou can act on now, and nothing else
        (the reactor's epoll is level-triggered: an fd watched for input that kasou will
        not read would spin)."""
        events: int | None = None
        if conn.state is _State.HANDSHAKE:
            events = select.EPOLLIN
        elif conn.state is _State.ESTABLISHED:
            wanted = select.EPOLLIN if self._reading(conn) else 0
            if conn.out and not conn.host_no_recv:
                wanted |= select.EPOLLOUT
            # After the peer's EOF, an empty mask still reports its full close (EPOLLHUP).
            if wanted or (conn.host_eof and not conn.host_no_recv):
                events = wanted
        if events == conn.events:
            return
        fd = conn.sock.fileno()
        if conn.events is not None:
            self.unwatch(fd)
        conn.events = events
        if events is not None:
            if conn.handler is None:
                conn.handler = self._socket_handler(conn)
            self.watch(fd, conn.handler, events)

    def _settle(self, conn: _Conn) -> None:
        """Carry shutdowns across, end the connection once nothing more can flow either
        way (§5.10.6.5), and watch its socket for what is left."""
        if conn.state is not _State.ESTABLISHED:
            return
        if conn.host_no_recv and conn.out:
            conn.fwd_cnt += len(conn.out)  # the peer is gone: what it did not take is lost
            conn.out.clear()
        if conn.guest_no_send and not conn.out and not conn.write_shut:
            conn.write_shut = True
            _shutdown(conn.sock, socket.SHUT_WR)  # the peer reads EOF
        if conn.guest_no_recv and not conn.read_shut:
            conn.read_shut = True
            _shutdown(conn.sock, socket.SHUT_RD)  # the peer's writes fail (EPIPE)
        told = conn.shut_told
        if conn.host_eof:
            conn.shut_told |= SHUTDOWN_SEND
        if conn.host_no_recv:
            conn.shut_told |= SHUTDOWN_RCV
        if conn.shut_told != told:
            self._queue(conn, Op.SHUTDOWN)
        host_to_guest_done = conn.host_eof or conn.guest_no_recv
        guest_to_host_done = conn.host_no_recv or (conn.guest_no_send and not conn.out)
        if host_to_guest_done and guest_to_host_done:
            if conn.guest_no_send and conn.guest_no_recv:
                # The guest shut down both ways: it waits for the RST that ends it.
                self._drop(conn, rst=True)
                return
            # The host side ended it: tell the guest both ways, and wait for its RST.
            self._close_socket(conn)
            conn.state = _State.CLOSING
            if conn.shut_told != SHUTDOWN_BOTH:
                conn.shut_told = SHUTDOWN_BOTH
                self._queue(conn, Op.SHUTDOWN)
            self.reactor.call_later(self.linger, lambda: self._linger_over(conn))
            return
        self._interest(conn)

    def _linger_over(self, conn: _Conn) -> None:
        if conn.state is _State.CLOSING:
            self._drop(conn, rst=True)
            self._pump()

    def _credit_update_if_low(self, conn: _Conn) -> None:
        """Tell the guest of freed space once the space it knows of runs low."""
        known_free = BUF_ALLOC - (conn.rx_cnt - conn.fwd_told)
        if conn.fwd_cnt != conn.fwd_told and known_free < CREDIT_THRESHOLD:
            self._queue(conn, Op.CREDIT_UPDATE)

    # --- packets to the guest -----------------------------------------------------------

    def _header(self, conn: _Conn, op: Op, length: int = 0, flags: int = 0) -> bytes:
        conn.fwd_told = conn.fwd_cnt
        return _HEADER.pack(
            HOST_CID,
            self.cid,
            conn.local_port,
            conn.peer_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            BUF_ALLOC,
            conn.fwd_cnt & U32,
        )

    def _queue(self, conn: _Conn, op: Op) -> None:
        conn.pending |= 1 << op
        if not conn.queued:
            conn.queued = True
            self._control.append(conn)

    def _reset_unknown(self, local_port: int, peer_port: int) -> None:
        if len(self._resets) >= RESET_QUEUE_LIMIT:
            return  # the guest's connect times out instead
        header = _HEADER.pack(
            HOST_CID, self.cid, local_port, peer_port, 0, TYPE_STREAM, Op.RST, 0, 0, 0
        )
        self._resets.append(header)
        self.stats["resets_sent"] += 1

    def _pump(self) -> None:
        """Put waiting control packets into rx buffers, wake connections that waited for
        buffers, and interrupt the driver for what was used."""
        if not self.active:
            return
        chains = self._rx_chains
        while chains and (self._resets or self._control):
            if self._resets:
                self._send(chains.popleft(), self._resets.popleft(), 0)
                continue
            conn = self._control[0]
            op = next((op for op in _CONTROL_ORDER if conn.pending & 1 << op), None)
            if op is None or conn.state is _State.CLOSED:
                conn.pending = 0
                conn.queued = False
                self._control.popleft()
                continue
            conn.pending &= ~(1 << op)
            self._send_control(chains.popleft(), conn, op)
        while chains and self._rx_waiters:
            conn = self._rx_waiters.popleft()
            conn.waiting_rx = False
            self._interest(conn)
        if self._rx_pushed:
            self._rx_pushed = False
            self.signal(self.queues[RX])

    def _send_control(self, chain: Chain, conn: _Conn, op: Op) -> None:
        flags = conn.shut_told if op == Op.SHUTDOWN else 0
        self._send(chain, self._header(conn, op, 0, flags), 0)
        if op == Op.REQUEST:
            conn.guest_knows = True
        elif op == Op.RESPONSE:
            conn.state = _State.ESTABLISHED  # the guest may send data from now on
            self._interest(conn)

    def _send(self, chain: Chain, header: bytes, length: int) -> None:
        chain.write(header)
        self.queues[RX].use(chain, HEADER_SIZE + length)
        self._rx_pushed = True
        self.stats["packets_to_guest"] += 1

    # --- ending connections -------------------------------------------------------------

    def _drop(self, conn: _Conn, rst: bool) -> None:
        """Forget a connection, closing its socket; ``rst``: tell the guest if it knows."""
        if conn.state is _State.CLOSED:
            return
        if rst and conn.guest_knows and len(self._resets) < RESET_QUEUE_LIMIT:
            header = _HEADER.pack(
                HOST_CID,
                self.cid,
                conn.local_port,
                conn.peer_port,
                0,
                TYPE_STREAM,
                Op.RST,
                0,
                BUF_ALLOC,
                conn.fwd_cnt & U32,
            )
            self._resets.append(header)
            self.stats["resets_sent"] += 1
        self._handshaking.discard(conn)
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        conn.pending = 0
        conn.out.clear()
        self._close_socket(conn)
        conn.state = _State.CLOSED

    def _close_socket(self, conn: _Conn) -> None:
        if conn.events is not None:
            self.unwatch(conn.sock.fileno())
            conn.events = None
        conn.sock.close()

    def _count(self) -> int:
        return len(self._conns) + len(self._handshaking)


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # the peer is already gone: nothing left to tell it
