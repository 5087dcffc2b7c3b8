"""virtio-console (virtio 1.2 §5.3): the guest's hvc0 console and one named port.

Scope: two ports with VIRTIO_CONSOLE_F_MULTIPORT. Port 0 is a console (hvc0): what the guest
writes goes to ``output`` (the same sink as COM1), and host keyboard input comes in through
``enqueue_input``. Port 1 is a named port ("org.kasou.port1", /dev/vport*p1 in the guest)
whose host end is a Unix socket server: one client at a time, bytes both ways. Emergency
writes (VIRTIO_CONSOLE_F_EMERG_WRITE, the emerg_wr config field) go to ``output`` too. Not
done: console size (VIRTIO_CONSOLE_F_SIZE and RESIZE messages), ports added or removed
while the guest runs.

Queues (§5.3.2): port 0 receiveq 0 and transmitq 1, control receiveq 2 and transmitq 3, port
1 receiveq 4 and transmitq 5. A driver without MULTIPORT has port 0's queues only.

The control handshake (§5.3.6.2), which the device follows rather than leads: the driver
sends DEVICE_READY; the device answers DEVICE_ADD for ports 0 and 1; for each port the
driver answers PORT_READY, and the device then sends CONSOLE_PORT and PORT_OPEN for port 0,
PORT_NAME for port 1 and PORT_OPEN for port 1 while a socket client is connected (PORT_OPEN
with value 0 when it leaves). The driver's PORT_OPEN says whether the guest has the port
open; only then does the device hand it input (Linux drops input for a port nobody holds
open, drivers/char/virtio_console.c ``in_intr``).

Back-pressure, both ways and without unbounded buffers: receive buffers the driver makes
available are held until there is input for them; the socket is read only while the guest
has port 1 open and has given buffers, straight into them (``recvmsg_into``), so a client
that writes faster than the guest reads fills its own socket buffer. Transmit chains are
held until the socket has taken their bytes (``sendmsg`` from the guest's buffers), so a
slow client makes the guest run out of transmit descriptors. Console input waits in a
bounded buffer (``INPUT_LIMIT``); ``enqueue_input`` takes what fits and says how much.

Untrusted input: a control message shorter than its header, for a port that does not exist,
or with an event the driver may not send is ignored (and counted); a control receive
buffer too short for a message is returned unused; a transmit chain larger than
``MAX_CHAIN`` or with device-writable buffers fails that chain only.

Snapshots (``ConsoleState``): console input not yet given to the guest, the chains the
device holds (their heads, by queue), control messages waiting for a buffer and the
handshake's progress. Port 1's client is the host's and is not saved: after a restore the
port has no client until one connects, and a guest that was told the host end was open is
told it closed (PORT_OPEN 0); transmit chains held for the old client are dropped as they
are for none.

Threads: the queues, the socket and the timers run on the device's reactor;
``enqueue_input`` and ``counters`` may come from any thread; config writes (emerg_wr) from
vCPU threads.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket as sockets
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.devices.virtio.device import Reactor, VirtioDevice
from kasou.devices.virtio.queue import Chain, ChainError, Virtqueue, split_views
from kasou.devices.virtio.spec import DeviceType
from kasou.event.unix import listen_unix
from kasou.persist import encode_state

__all__ = [
    "F_EMERG_WRITE",
    "F_MULTIPORT",
    "INPUT_LIMIT",
    "MAX_CHAIN",
    "PORT1_NAME",
    "Console",
    "ConsoleState",
]

log = logging.getLogger(__name__)

# Feature bits (§5.3.3).
F_SIZE = 1 << 0
F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2

# Queue indexes (§5.3.2).
PORT0_RX, PORT0_TX, CONTROL_RX, CONTROL_TX, PORT1_RX, PORT1_TX = range(6)
PORTS = 2
QUEUE_SIZES = (128, 128, 32, 32, 128, 128)

# Control events (§5.3.6.2).
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

# struct virtio_console_control (§5.3.6.2): le32 id, le16 event, le16 value.
_CONTROL = struct.Struct("<IHH")
# struct virtio_console_config (§5.3.4): le16 cols, le16 rows, le32 max_nr_ports,
# le32 emerg_wr.
_CONFIG = struct.Struct("<HHII")
_EMERG_WR_AT = 8

PORT1_NAME = "org.kasou.port1"
INPUT_LIMIT = 64 << 10
"""Console input bytes waiting for the guest, at most."""
MAX_CHAIN = 1 << 20
"""The most bytes one transmit chain may carry (Linux sends at most 32 KiB a write)."""
CONTROL_BACKLOG = 64
"""Control messages waiting for a receive buffer, at most (the handshake needs six)."""
_MAX_CONTROL_MESSAGE = _CONTROL.size + len(PORT1_NAME)  # PORT_NAME is the longest
_IOV_MAX = 1024  # buffers one sendmsg/recvmsg may take (limits.h IOV_MAX)
_SEND_FLAGS = getattr(sockets, "MSG_NOSIGNAL", 0)


@dataclass(frozen=True)
class ConsoleState:
    """A virtio console as saved. Field names are a snapshot format contract.

    ``input``: console input waiting for the guest; ``*_heads``: the chains the device holds
    on each of those queues, oldest first; ``tx_offset``: bytes of the first held port 1
    transmit chain already sent; ``control``: control messages waiting for a buffer, in
    order; ``device_ready``, ``port_ready``, ``guest_open``: the handshake (§5.3.6.2);
    ``host_open``: whether the guest was told port 1's host end is open."""

    input: bytes
    port0_rx_heads: tuple[int, ...]
    control_rx_heads: tuple[int, ...]
    port1_rx_heads: tuple[int, ...]
    port1_tx_heads: tuple[int, ...]
    tx_offset: int
    control: tuple[bytes, ...]
    device_ready: bool
    port_ready: tuple[bool, bool]
    guest_open: tuple[bool, bool]
    host_open: bool


_HELD_FIELDS = (
    (PORT0_RX, "port0_rx_heads"),
    (CONTROL_RX, "control_rx_heads"),
    (PORT1_RX, "port1_rx_heads"),
    (PORT1_TX, "port1_tx_heads"),
)


class Console(VirtioDevice):
    """A two-port virtio console: hvc0 to ``output``, port 1 to a Unix socket."""

    device_type = DeviceType.CONSOLE
    name = "console"

    def __init__(
        self,
        reactor: Reactor,
        output: Callable[[bytes], None],
        socket: Path | None = None,
        name: str = "console",
    ) -> None:
        super().__init__(reactor, QUEUE_SIZES, F_MULTIPORT | F_EMERG_WRITE)
        self.name = name
        self._output = output
        self.socket_path = socket
        self._input = bytearray()
        self._input_lock = threading.Lock()
        # Per activation (set by ``_new_session``, on the reactor once the device runs): the
        # chains the device holds, by queue; control messages waiting for a buffer; the
        # handshake's progress.
        self._held: dict[int, deque[Chain]]
        self._tx_offset: int  # bytes of port 1's first held transmit chain already sent
        self._control: deque[bytes]
        self._device_ready: bool
        self._port_ready: list[bool]
        self._guest_open: list[bool]
        self._new_session()
        self._restored: ConsoleState | None = None  # from ``load_state``, for ``on_activate``
        self.figures = {
            "output_bytes": 0,
            "input_bytes": 0,
            "port1_to_host_bytes": 0,
            "port1_to_guest_bytes": 0,
            "port1_dropped_bytes": 0,
            "port1_clients": 0,
            "ignored_control": 0,
        }
        self._client: sockets.socket | None = None
        self._client_events = 0
        self._listener: sockets.socket | None = None
        if socket is not None:
            self._listener = listen_unix(socket, "virtio-console", backlog=1)
            reactor.add_reader(self._listener.fileno(), self._on_accept)

    # --- the host's side (any thread) ---------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue keyboard input for hvc0; returns how many bytes of ``data`` it took (the
        rest did not fit in ``INPUT_LIMIT``: keep it and try again)."""
        with self._input_lock:
            taken = data[: INPUT_LIMIT - len(self._input)]
            self._input += taken
        if taken:
            self.reactor.call_soon(self._feed_console)
        return len(taken)

    def input_space(self) -> int:
        """How many bytes ``enqueue_input`` would take now."""
        with self._input_lock:
            return INPUT_LIMIT - len(self._input)

    @property
    def connected(self) -> bool:
        """Whether a client is connected to port 1's socket."""
        return self._client is not None

    def counters(self) -> dict[str, Any]:
        return {
            **self.figures,
            "port1_connected": self.connected,
            "port1_guest_open": self._guest_open[1],
        }

    def close(self) -> None:
        super().close()
        self._drop_client()
        self._new_session()  # the chains held are views of guest RAM, which is unmapped next
        if self._listener is not None:
            self.reactor.remove(self._listener.fileno())
            self._listener.close()
            self._listener = None
            if self.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()

    # --- config space (vCPU threads) ----------------------------------------------------

    def config(self) -> bytes:
        return _CONFIG.pack(0, 0, PORTS, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # §5.3.4: a write to emerg_wr puts its low byte out on port 0, even before the driver
        # has set up any queue (an early console).
        if offset == _EMERG_WR_AT and data:
            self.figures["output_bytes"] += 1
            self._output(data[:1])

    # --- activation ---------------------------------------------------------------------

    def on_activate(self) -> None:
        self._new_session()
        restored, self._restored = self._restored, None
        if restored is not None:
            self._take_back(restored)
        self._update_client()

    def on_reset(self) -> None:
        # On the vCPU thread: the chains held belong to rings the driver is tearing down;
        # the reactor forgets them (before a later activation starts, as it keeps order).
        self._restored = None
        self.reactor.call_soon(self._forget)

    # --- snapshots ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        with self._input_lock:
            waiting = bytes(self._input)
        session = self.active  # a stopped device's session is being forgotten
        held = {index: tuple(chain.head for chain in self._held[index]) for index in self._held}

        def heads(index: int) -> tuple[int, ...]:
            return held[index] if session else ()

        state = ConsoleState(
            input=waiting,
            port0_rx_heads=heads(PORT0_RX),
            control_rx_heads=heads(CONTROL_RX),
            port1_rx_heads=heads(PORT1_RX),
            port1_tx_heads=heads(PORT1_TX),
            tx_offset=self._tx_offset if session and held[PORT1_TX] else 0,
            control=tuple(self._control) if session else (),
            device_ready=session and self._device_ready,
            port_ready=(session and self._port_ready[0], session and self._port_ready[1]),
            guest_open=(session and self._guest_open[0], session and self._guest_open[1]),
            host_open=session and self._port_ready[1] and self._client is not None,
        )
        return encode_state(state)

    def load_state(self, data: bytes) -> None:
        state = self.decode_state(data, ConsoleState)
        if len(state.input) > INPUT_LIMIT:
            raise self.state_error("input", f"{len(state.input)} bytes (at most {INPUT_LIMIT})")
        for index, field in _HELD_FIELDS:
            self.check_heads(field, getattr(state, field), index)
        if not 0 <= state.tx_offset <= (MAX_CHAIN if state.port1_tx_heads else 0):
            raise self.state_error("tx_offset", f"{state.tx_offset} for the chains held")
        if len(state.control) > CONTROL_BACKLOG:
            raise self.state_error(
                "control", f"{len(state.control)} messages (at most {CONTROL_BACKLOG})"
            )
        for message in state.control:
            if not _CONTROL.size <= len(message) <= _MAX_CONTROL_MESSAGE:
                raise self.state_error("control", f"a message of {len(message)} bytes")
        if not state.device_ready and any(state.port_ready):
            raise self.state_error("port_ready", "a port ready before the device was")
        with self._input_lock:
            self._input[:] = state.input
        self._restored = state

    def _take_back(self, state: ConsoleState) -> None:
        """The session as it was at the snapshot (on the reactor, once the device is live)."""
        for index, field in _HELD_FIELDS:
            queue = self.queues[index] if index < len(self.queues) else None
            if queue is not None and queue.live:
                self._held[index].extend(self.held_chains(queue, getattr(state, field)))
        held_tx = self._held[PORT1_TX]
        self._tx_offset = min(state.tx_offset, held_tx[0].readable_len) if held_tx else 0
        self._control.extend(state.control)
        self._device_ready = state.device_ready
        self._port_ready = list(state.port_ready)
        self._guest_open = list(state.guest_open)
        # Port 1's client is not the one the guest was told of: tell it what is there now.
        connected = self._client is not None
        if self._port_ready[1] and connected != state.host_open:
            self._send_control(1, PORT_OPEN, int(connected))

    def _forget(self) -> None:
        self._new_session()
        self._update_client()

    def _new_session(self) -> None:
        self._held = {index: deque() for index in (PORT0_RX, CONTROL_RX, PORT1_RX, PORT1_TX)}
        self._tx_offset = 0
        self._control = deque()
        self._device_ready = False
        self._port_ready = [False] * PORTS
        self._guest_open = [False] * PORTS

    # --- the queues (the reactor) -------------------------------------------------------

    def process(self, queue: Virtqueue) -> None:
        index = queue.index
        if index in self._held:
            # Receive queues (and port 1's transmit queue) are taken whole and their chains
            # held: the device uses them as input comes (or as the socket takes output).
            held = self._held[index]
            while self.active:
                chain = self._pop(queue)
                if chain is None:
                    break
                if index == PORT1_TX and not self._check_transmit(queue, chain):
                    continue
                held.append(chain)
            if index == PORT0_RX:
                self._feed_console()
            elif index == CONTROL_RX:
                self._flush_control()
            elif index == PORT1_RX:
                self._update_client()
            else:
                self._send_to_client()
            self.signal(queue)  # for chains returned unused
            return
        while self.active:
            chain = self._pop(queue)
            if chain is None:
                break
            if index == PORT0_TX:
                if self._check_transmit(queue, chain):
                    data = chain.read()
                    self.figures["output_bytes"] += len(data)
                    if data:
                        self._output(data)
                    queue.use(chain, 0)
            else:
                self._control_message(chain)
                queue.use(chain, 0)
        self.signal(queue)

    def _pop(self, queue: Virtqueue) -> Chain | None:
        while True:
            try:
                return queue.pop()
            except ChainError as error:
                # Without its traceback, a kept error (a log record) holds no view of guest
                # RAM, which would stop the RAM from being unmapped.
                self.bad_chain(queue, error.with_traceback(None))

    def _check_transmit(self, queue: Virtqueue, chain: Chain) -> bool:
        """Whether a transmit chain is one to serve; a bad one goes back unused."""
        problem = ""
        if chain.writable:
            problem = "a transmit chain with device-writable buffers"
        elif chain.readable_len > MAX_CHAIN:
            problem = f"a transmit chain of {chain.readable_len} bytes (at most {MAX_CHAIN})"
        if problem:
            self.bad_chain(queue, ChainError(chain.head, problem))
            return False
        return True

    # --- control messages ---------------------------------------------------------------

    def _control_message(self, chain: Chain) -> None:
        if chain.readable_len < _CONTROL.size:
            self._ignore("a control message shorter than its header")
            return
        port, event, value = _CONTROL.unpack(chain.read(_CONTROL.size))
        if event == DEVICE_READY:
            # The driver is ready for ports (value 1) or failed to set up (0).
            if value == 1 and not self._device_ready:
                self._device_ready = True
                if self.has_feature(F_MULTIPORT):
                    for number in range(PORTS):
                        self._send_control(number, DEVICE_ADD, 0)
            return
        if event not in (PORT_READY, PORT_OPEN):
            self._ignore(f"control event {event}, which a driver does not send")
            return
        if port >= PORTS or not self._device_ready:
            self._ignore(f"a control message for port {port}, which was not added")
            return
        if event == PORT_OPEN:
            # The guest opened (1) or closed (0) its end of the port.
            self._guest_open[port] = bool(value)
            if port == 0:
                self._feed_console()
            else:
                self._update_client()
            return
        if value != 1 or self._port_ready[port]:
            return  # the port failed in the guest, or this PORT_READY is a repeat
        self._port_ready[port] = True
        if port == 0:
            self._send_control(0, CONSOLE_PORT, 1)
            self._send_control(0, PORT_OPEN, 1)  # the host end of hvc0 is always there
        else:
            self._send_control(1, PORT_NAME, 0, PORT1_NAME.encode())
            if self._client is not None:
                self._send_control(1, PORT_OPEN, 1)

    def _ignore(self, what: str) -> None:
        self.figures["ignored_control"] += 1
        log.debug("%s: ignored %s", self.name, what)

    def _send_control(self, port: int, event: int, value: int, payload: bytes = b"") -> None:
        if len(self._control) >= CONTROL_BACKLOG:
            log.warning("%s: the driver takes no control messages; one is dropped", self.name)
            return
        self._control.append(_CONTROL.pack(port, event, value) + payload)
        self._flush_control()

    def _flush_control(self) -> None:
        held = self._held[CONTROL_RX]
        if not self.active or not (self._control and held):
            return
        queue = self.queues[CONTROL_RX]
        while self._control and held:
            chain = held.popleft()
            message = self._control[0]
            if chain.writable_len < len(message):
                # A buffer the message does not fit: returned empty, the message waits.
                self.bad_chain(queue, ChainError(chain.head, "a control buffer too short"))
                continue
            queue.use(chain, chain.write(message))
            self._control.popleft()
        self.signal(queue)

    # --- port 0: console input ----------------------------------------------------------

    def _feed_console(self) -> None:
        held = self._held[PORT0_RX]
        if not self.active or not held:
            return
        if self.has_feature(F_MULTIPORT) and not self._guest_open[0]:
            return  # the guest would drop it (hvc0 is not set up yet)
        queue = self.queues[PORT0_RX]
        with self._input_lock:
            while self._input and held:
                chain = held.popleft()
                written = chain.write(memoryview(self._input)[: chain.writable_len])
                del self._input[:written]
                self.figures["input_bytes"] += written
                queue.use(chain, written)
        self.signal(queue)

    # --- port 1: the socket -------------------------------------------------------------

    def _on_accept(self, events: int) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if self._client is not None:
            client.close()  # one client at a time: a second one is hung up on
            return
        client.setblocking(False)
        self._client = client
        self.figures["port1_clients"] += 1
        if self.active and self._port_ready[1]:
            self._send_control(1, PORT_OPEN, 1)
        self._update_client()

    def _drop_client(self) -> None:
        client = self._client
        if client is None:
            return
        if self._client_events:
            self.reactor.remove(client.fileno())
            self._client_events = 0
        client.close()
        self._client = None
        if self.active and self._port_ready[1]:
            self._send_control(1, PORT_OPEN, 0)
        self._send_to_client()  # drops what was waiting for this client

    def _update_client(self) -> None:
        """Watch the client for what the device can do now: read while the guest holds the
        port open and has buffers, write while transmit chains wait."""
        client = self._client
        if client is None:
            return
        events = 0
        if self.active:
            if self._guest_open[1] and self._held[PORT1_RX]:
                events |= select.EPOLLIN
            if self._held[PORT1_TX]:
                events |= select.EPOLLOUT
        if events == self._client_events:
            return
        if self._client_events:
            self.reactor.remove(client.fileno())
        if events:
            self.reactor.add_reader(client.fileno(), self._on_client, events)
        self._client_events = events

    def _on_client(self, events: int) -> None:
        if events & select.EPOLLOUT or events & (select.EPOLLHUP | select.EPOLLERR):
            self._send_to_client()
        if self._client is not None and events & (select.EPOLLIN | select.EPOLLHUP):
            self._receive_from_client()
        self._update_client()

    def _receive_from_client(self) -> None:
        held = self._held[PORT1_RX]
        if not self.active or not self._guest_open[1]:
            return
        queue = self.queues[PORT1_RX]
        while held and self._client is not None:
            chain = held[0]
            try:
                count = self._client.recvmsg_into(chain.writable[:_IOV_MAX])[0]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                log.info("%s: port 1 client: %s", self.name, error)
                self._drop_client()
                break
            if count == 0:
                self._drop_client()  # the client hung up; the buffer waits for the next
                break
            held.popleft()
            queue.use(chain, count)
            self.figures["port1_to_guest_bytes"] += count
        self.signal(queue)

    def _send_to_client(self) -> None:
        held = self._held[PORT1_TX]
        if not self.active or not held:
            return
        queue = self.queues[PORT1_TX]
        while held:
            chain = held[0]
            remaining = chain.readable_len - self._tx_offset
            if self._client is None:
                # With nobody on the host end the output is dropped (Linux does not write to
                # a port whose host end is closed: virtio_console.c ``will_write_block``).
                self.figures["port1_dropped_bytes"] += remaining
            elif remaining:
                views = split_views(chain.readable, self._tx_offset, remaining)[:_IOV_MAX]
                try:
                    sent = self._client.sendmsg(views, [], _SEND_FLAGS)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    log.info("%s: port 1 client: %s", self.name, error)
                    self._drop_client()
                    return  # dropping the client ran this again, without it
                self.figures["port1_to_host_bytes"] += sent
                self._tx_offset += sent
                if sent < remaining:
                    continue
            held.popleft()
            self._tx_offset = 0
            queue.use(chain, 0)
        self.signal(queue)
        self._update_client()
