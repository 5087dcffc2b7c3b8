"""virtio-vsock with its Unix-socket host side: the Python driver plays the guest's vsock
driver (posts rx buffers, sends tx packets, reads the packets the device writes), real Unix
sockets play the host processes, and the device runs on a real event loop."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from virtio_driver import WAIT, Driver

from kasou.devices.virtio.spec import VIRTQ_DESC_F_NEXT, Reg, Status
from kasou.devices.virtio.vsock import BUF_ALLOC, HOST_PORT_FIRST, MAX_PAYLOAD, Op, Vsock
from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.memory import GuestMemory

RXQ, TXQ, EVQ = 0, 1, 2
GUEST_CID = 3
HEADER = struct.Struct("<QQIIIHHIII")
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
TX_SLOTS = 32
TX_DATA = MAX_PAYLOAD + 4096  # room for a payload longer than the device takes


class Packet(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes


class Guest:
    """The guest's virtio-vsock driver, as much of it as the tests need: rx buffers that
    are read and posted again, a ring of tx slots (header and payload buffers), packets."""

    def __init__(
        self,
        driver: Driver,
        memory: GuestMemory,
        *,
        rx_buffers: int = 64,
        rx_size: int = 4096,
        split_rx: bool = False,
        repost: bool = True,
    ) -> None:
        self.driver = driver
        self.memory = memory
        self.repost = repost
        self.rx_size = rx_size
        self.split_rx = split_rx  # header and payload in two buffers, as Linux 6.1 posts
        driver.start()
        self.rx: dict[int, list[tuple[int, int, bool]]] = {}  # head -> its buffers
        for _ in range(rx_buffers):
            self.post_rx(notify=False)
        driver.notify(RXQ)
        for _ in range(8):  # as Linux does; the device holds them
            driver.submit(EVQ, writable=[8])
        self.tx_free = list(range(TX_SLOTS))
        self.tx_buffers = [(driver.alloc(64), driver.alloc(TX_DATA)) for _ in range(TX_SLOTS)]
        self.received: deque[Packet] = deque()

    def post_rx(self, notify: bool = True) -> None:
        sizes = [HEADER.size, self.rx_size] if self.split_rx else [HEADER.size + self.rx_size]
        head, parts = self.driver.submit(RXQ, writable=sizes, notify=notify)
        self.rx[head] = parts

    # --- tx ---------------------------------------------------------------------------

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = BUF_ALLOC,
        fwd_cnt: int = 0,
        src_cid: int = GUEST_CID,
        dst_cid: int = 2,
        kind: int = 1,
        length: int | None = None,
    ) -> None:
        header = HEADER.pack(
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len(payload) if length is None else length,
            kind,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        )
        self.send_raw(header, payload)

    def send_raw(self, header: bytes, payload: bytes = b"") -> None:
        """One tx chain: ``header`` in one buffer, ``payload`` (if any) in a second."""
        slot = self._tx_slot()
        header_at, payload_at = self.tx_buffers[slot]
        queue = self.driver.queues[TXQ]
        self.memory.write(header_at, header)
        self.memory.write(payload_at, payload)
        self.driver.write_desc(
            queue,
            2 * slot,
            header_at,
            len(header),
            VIRTQ_DESC_F_NEXT if payload else 0,
            2 * slot + 1,
        )
        self.driver.write_desc(queue, 2 * slot + 1, payload_at, len(payload), 0, 0)
        self.driver.publish(TXQ, 2 * slot)

    def _tx_slot(self) -> int:
        entries = self.driver.take_used(TXQ)
        if not self.tx_free and not entries:
            entries = self.driver.wait_used(TXQ, 1)
        self.tx_free += [head // 2 for head, _ in entries]
        return self.tx_free.pop()

    # --- rx ---------------------------------------------------------------------------

    def recv(self, timeout: float = WAIT) -> Packet:
        """The next packet from the device."""
        if not self.received:
            entries = self.driver.take_used(RXQ)
            if not entries:
                entries = self.driver.wait_used(RXQ, 1, timeout) + self.driver.take_used(RXQ)
            self._collect(entries)
        return self.received.popleft()

    def poll(self) -> list[Packet]:
        """The packets there now, without waiting."""
        self._collect(self.driver.take_used(RXQ))
        out = list(self.received)
        self.received.clear()
        return out

    def _collect(self, entries: list[tuple[int, int]]) -> None:
        for head, length in entries:
            data = b"".join(self.memory.read(at, size) for at, size, _ in self.rx[head])[:length]
            fields = HEADER.unpack_from(data)
            assert length == HEADER.size + fields[4], "the used length is header + len"
            self.received.append(Packet(*fields, data[HEADER.size :]))
            if self.repost:
                self.driver.publish(RXQ, head, notify=False)
        if entries and self.repost:
            self.driver.notify(RXQ)

    def expect(self, op: int, timeout: float = WAIT) -> Packet:
        packet = self.recv(timeout)
        assert packet.op == op, f"expected {Op(op).name}, got {packet}"
        return packet


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def folder() -> Iterator[Path]:
    # Short: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="vsock", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def uds(folder: Path) -> Path:
    return folder / "v.sock"


Rig = Callable[..., tuple[Vsock, Driver]]


@pytest.fixture
def rig(loop: EventLoop, memory: GuestMemory, uds: Path) -> Iterator[Rig]:
    made: list[Driver] = []

    def make(**options: Any) -> tuple[Vsock, Driver]:
        device = Vsock(loop, GUEST_CID, uds, **options)
        made.append(Driver.attach(device, memory))
        return device, made[-1]

    yield make
    loop.stop()  # the builder's order: the reactor stops, then the devices close
    for driver in made:
        driver.close()


# --- host helpers ---------------------------------------------------------------------


def host_socket(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(path))
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed: EOF, or a reset where it left bytes of ours unread."""
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


_CYCLE = bytes(range(251)) * (MAX_PAYLOAD // 251 + 2)


def stream(offset: int, size: int) -> bytes:
    """Bytes ``offset`` to ``offset + size`` of a stream that tells misplaced bytes apart."""
    start = offset % 251
    return _CYCLE[start : start + size]


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


def open_from_host(
    guest: Guest, uds: Path, port: int, buf_alloc: int = BUF_ALLOC, first: bytes = b""
) -> tuple[socket.socket, int]:
    """A host process connects to guest ``port``; the guest accepts. Returns the host's
    socket and the host port kasou chose."""
    host = host_socket(uds)
    host.sendall(b"CONNECT %d\n" % port + first)
    request = guest.expect(Op.REQUEST)
    assert (request.src_cid, request.dst_cid, request.dst_port) == (2, GUEST_CID, port)
    assert (request.type, request.len, request.buf_alloc) == (1, 0, BUF_ALLOC)
    guest.send(Op.RESPONSE, port, request.src_port, buf_alloc=buf_alloc)
    assert read_line(host) == b"OK %d\n" % request.src_port
    return host, request.src_port


def listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.settimeout(WAIT)
    listener.bind(path)
    listener.listen(64)
    return listener


def open_from_guest(
    guest: Guest, listener: socket.socket, port: int, guest_port: int, buf_alloc: int = BUF_ALLOC
) -> tuple[socket.socket, Packet]:
    """The guest connects to host ``port`` (a listener at ``<uds>_<port>``)."""
    guest.send(Op.REQUEST, guest_port, port, buf_alloc=buf_alloc)
    response = guest.expect(Op.RESPONSE)
    assert (response.src_cid, response.dst_cid) == (2, GUEST_CID)
    assert (response.src_port, response.dst_port) == (port, guest_port)
    host, _ = listener.accept()
    host.settimeout(WAIT)
    return host, response


def assert_gone(guest: Guest, local: int, peer: int) -> None:
    """The device no longer knows the connection: a CREDIT_REQUEST on it is answered RST
    (a round trip through the device's loop, so it also orders what came before)."""
    guest.send(Op.CREDIT_REQUEST, peer, local)
    reset = guest.expect(Op.RST)
    assert (reset.src_port, reset.dst_port) == (local, peer)


# --- the device -----------------------------------------------------------------------


def test_identity_config_and_features(rig: Rig) -> None:
    _, driver = rig()
    assert driver.read(Reg.DEVICE_ID) == 19
    assert driver.config(0, 8) == GUEST_CID.to_bytes(8, "little")
    offered = driver.device_features()
    assert offered & 1  # VIRTIO_VSOCK_F_STREAM
    assert not offered & 2  # no SEQPACKET


def test_reserved_cids_are_refused(loop: EventLoop, uds: Path) -> None:
    for cid in (0, 1, 2, 0xFFFFFFFF):
        with pytest.raises(ConfigError, match="cid"):
            Vsock(loop, cid, uds)
    assert not uds.exists()


def test_the_socket_listens_from_construction_and_a_stale_one_is_replaced(
    rig: Rig, uds: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(uds))
    stale.close()  # the file stays, nobody listens: what a killed kasou leaves
    rig()
    with host_socket(uds):  # connects before any driver has started the device
        pass


def test_a_path_in_use_or_not_a_socket_is_refused(loop: EventLoop, uds: Path) -> None:
    with listen(str(uds)), pytest.raises(ConfigError, match="in use by another process"):
        Vsock(loop, GUEST_CID, uds)
    uds.unlink()
    uds.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        Vsock(loop, GUEST_CID, uds)
    assert uds.read_text() == "precious"


def test_close_removes_the_socket_file_and_closes_connections(
    rig: Rig, loop: EventLoop, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    host, _ = open_from_host(guest, uds, 80)
    loop.stop()
    device.close()
    assert not uds.exists()
    assert host.recv(1) == b""


# --- host-initiated -------------------------------------------------------------------


def test_a_host_process_connects_with_connect_and_exchanges_data(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    host, port = open_from_host(guest, uds, 1234)
    assert port >= HOST_PORT_FIRST
    host.sendall(b"ping")
    data = guest.expect(Op.RW)
    assert (data.src_cid, data.dst_cid, data.src_port, data.dst_port) == (2, 3, port, 1234)
    assert (data.payload, data.type, data.buf_alloc) == (b"ping", 1, BUF_ALLOC)
    guest.send(Op.RW, 1234, port, b"pong")
    assert read_exactly(host, 4) == b"pong"
    counters = device.counters()
    assert counters["connections"] == 1 and counters["host_initiated"] == 1
    assert counters["bytes_to_guest"] == 4 and counters["bytes_from_guest"] == 4


def test_rx_buffers_split_in_header_and_payload_work(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory, split_rx=True)
    host, _ = open_from_host(guest, uds, 1234)
    sent = os.urandom(3 * 4096 + 10)
    host.sendall(sent)
    received = b""
    while len(received) < len(sent):
        received += guest.expect(Op.RW).payload
    assert received == sent


def test_each_host_connection_gets_its_own_host_port(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    opened = [open_from_host(guest, uds, 1024) for _ in range(3)]
    assert len({port for _, port in opened}) == 3


def test_bytes_sent_right_after_the_connect_line_reach_the_guest(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    open_from_host(guest, uds, 7, first=b"early")
    assert guest.expect(Op.RW).payload == b"early"


def test_a_guest_rst_closes_the_host_connection(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    host = host_socket(uds)
    host.sendall(b"CONNECT 9\n")
    request = guest.expect(Op.REQUEST)
    guest.send(Op.RST, 9, request.src_port)  # nothing listens on port 9
    assert host.recv(16) == b""
    assert device.counters()["resets_received"] == 1


def test_a_guest_that_does_not_answer_times_out(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    _, driver = rig(connect_timeout=0.2)
    guest = Guest(driver, memory)
    host = host_socket(uds)
    host.sendall(b"CONNECT 9\n")
    request = guest.expect(Op.REQUEST)
    assert host.recv(16) == b""
    reset = guest.expect(Op.RST)  # so that a late RESPONSE finds nothing
    assert (reset.src_port, reset.dst_port) == (request.src_port, 9)


@pytest.mark.parametrize(
    "line",
    [
        b"HELLO\n",
        b"CONNECT\n",
        b"CONNECT -1\n",
        b"CONNECT 4294967295\n",  # VMADDR_PORT_ANY
        b"CONNECT 99999999999\n",
        b"CONNECT 12 \n",
        b"connect 12\n",
        b"CONNECT " + b"1" * 40,  # no end of line within the limit
    ],
)
def test_a_bad_first_line_closes_the_connection(
    rig: Rig, memory: GuestMemory, uds: Path, line: bytes
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    bad = host_socket(uds)
    bad.sendall(line)
    assert closed(bad)
    # The guest saw nothing of it: the first packet it gets is the next good connection's.
    open_from_host(guest, uds, 5)
    assert device.counters()["connections"] == 1


def test_a_connect_before_the_driver_starts_goes_out_when_it_does(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    host = host_socket(uds)
    host.sendall(b"CONNECT 22\n")
    guest = Guest(driver, memory)
    request = guest.expect(Op.REQUEST)
    guest.send(Op.RESPONSE, 22, request.src_port)
    assert read_line(host) == b"OK %d\n" % request.src_port


# --- guest-initiated ------------------------------------------------------------------


def test_a_guest_connection_reaches_the_unix_socket_for_its_port(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    with listen(f"{uds}_5000") as listener:
        host, response = open_from_guest(guest, listener, 5000, 40000)
    assert response.buf_alloc == BUF_ALLOC and response.fwd_cnt == 0
    guest.send(Op.RW, 40000, 5000, b"from the guest")
    assert read_exactly(host, 14) == b"from the guest"
    host.sendall(b"from the host")
    data = guest.expect(Op.RW)
    assert (data.src_port, data.dst_port, data.payload) == (5000, 40000, b"from the host")
    assert device.counters()["guest_initiated"] == 1


@pytest.mark.parametrize("stale", [False, True])
def test_a_guest_connection_to_a_port_nobody_serves_gets_rst(
    rig: Rig, memory: GuestMemory, uds: Path, stale: bool
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    if stale:  # a socket file without a listener
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(f"{uds}_6000")
        dead.close()
    guest.send(Op.REQUEST, 41000, 6000)
    reset = guest.expect(Op.RST)
    assert (reset.src_cid, reset.dst_cid, reset.src_port, reset.dst_port) == (2, 3, 6000, 41000)
    assert device.counters()["connections"] == 0


def test_a_second_request_for_a_live_connection_resets_it(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    with listen(f"{uds}_5000") as listener:
        host, _ = open_from_guest(guest, listener, 5000, 40000)
    guest.send(Op.REQUEST, 40000, 5000)
    reset = guest.expect(Op.RST)
    assert (reset.src_port, reset.dst_port) == (5000, 40000)
    assert closed(host)
    assert device.counters()["connections"] == 0


def test_a_packet_for_no_connection_gets_rst(rig: Rig, memory: GuestMemory) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    guest.send(Op.RW, 41000, 6000, b"hello?")
    reset = guest.expect(Op.RST)
    assert (reset.src_port, reset.dst_port) == (6000, 41000)
    guest.send(Op.RST, 41000, 6000)  # an RST for nothing is not answered
    assert_gone(guest, 6000, 41001)
    assert guest.poll() == []


# --- flow control ---------------------------------------------------------------------


def test_kasou_sends_no_more_than_the_guests_credit(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    window = 8192
    host, port = open_from_host(guest, uds, 99, buf_alloc=window)
    sent = os.urandom(4 * window + 100)
    host.sendall(sent)
    received = b""
    while len(received) < len(sent):
        chunk = b""
        while True:
            packet = guest.recv()
            if packet.op == Op.CREDIT_REQUEST:  # kasou ran out of credit and says so
                break
            assert packet.op == Op.RW
            chunk += packet.payload
            if len(received) + len(chunk) == len(sent):
                break
        assert len(chunk) == min(window, len(sent) - len(received))
        received += chunk
        if len(received) < len(sent):
            # Still no more until fwd_cnt moves: a round trip through the device shows none.
            guest.send(
                Op.CREDIT_REQUEST, 99, port, buf_alloc=window, fwd_cnt=len(received) - len(chunk)
            )
            assert guest.expect(Op.CREDIT_UPDATE).dst_port == 99
            guest.send(Op.CREDIT_UPDATE, 99, port, buf_alloc=window, fwd_cnt=len(received))
    assert received == sent


def _fill_kasou(guest: Guest, local: int, peer: int, credit_from: Packet) -> tuple[int, int]:
    """Send from the guest, within kasou's credit, until kasou grants no more; return the
    bytes sent and kasou's fwd_cnt at the end."""
    buf_alloc, fwd_cnt, sent = credit_from.buf_alloc, credit_from.fwd_cnt, 0
    while True:
        credit = buf_alloc - (sent - fwd_cnt)
        if credit == 0:
            guest.send(Op.CREDIT_REQUEST, peer, local)
            update = guest.expect(Op.CREDIT_UPDATE)
            buf_alloc, fwd_cnt = update.buf_alloc, update.fwd_cnt
            if buf_alloc - (sent - fwd_cnt) == 0:
                return sent, fwd_cnt
            continue
        size = min(credit, MAX_PAYLOAD)
        guest.send(Op.RW, peer, local, stream(sent, size))
        sent += size
        for packet in guest.poll():
            assert packet.op == Op.CREDIT_UPDATE
            buf_alloc, fwd_cnt = packet.buf_alloc, packet.fwd_cnt
        assert sent < 64 << 20, "kasou kept granting credit to a peer that does not read"


def test_a_host_peer_that_stops_reading_bounds_what_kasou_buffers(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    with listen(f"{uds}_7000") as listener:
        host, response = open_from_guest(guest, listener, 7000, 42000)
    sent, fwd_cnt = _fill_kasou(guest, 7000, 42000, response)
    assert device.counters()["buffered"] == sent - fwd_cnt == BUF_ALLOC
    # The peer reads again: kasou gives it everything and the guest gets credit back.
    total = sent + 3 * BUF_ALLOC
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_exactly(host, total)))
    reader.start()
    while sent < total:
        update = guest.expect(Op.CREDIT_UPDATE)
        credit = update.buf_alloc - (sent - update.fwd_cnt)
        while credit > 0 and sent < total:
            size = min(credit, MAX_PAYLOAD, total - sent)
            guest.send(Op.RW, 42000, 7000, stream(sent, size))
            sent += size
            credit -= size
    reader.join(WAIT)
    assert len(got) == 1 and len(got[0]) == total
    for at in range(0, total, MAX_PAYLOAD):
        assert got[0][at : at + MAX_PAYLOAD] == stream(at, min(MAX_PAYLOAD, total - at))


def test_a_guest_that_sends_beyond_its_credit_is_reset(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    with listen(f"{uds}_7000") as listener:
        host, response = open_from_guest(guest, listener, 7000, 42000)
    _fill_kasou(guest, 7000, 42000, response)
    guest.send(Op.RW, 42000, 7000, b"x")
    reset = guest.expect(Op.RST)
    assert (reset.src_port, reset.dst_port) == (7000, 42000)
    read_to_eof(host)  # what the socket took, then the close
    counters = device.counters()
    assert counters["connections"] == 0 and counters["buffered"] == 0
    assert driver.status & Status.DRIVER_OK and not driver.status & Status.NEEDS_RESET


def test_kasou_answers_a_credit_request(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    _, port = open_from_host(guest, uds, 99)
    guest.send(Op.RW, 99, port, b"12345")
    guest.send(Op.CREDIT_REQUEST, 99, port)
    update = guest.expect(Op.CREDIT_UPDATE)
    assert (update.buf_alloc, update.fwd_cnt) == (BUF_ALLOC, 5)


# --- shutdown -------------------------------------------------------------------------


def test_guest_shutdown_of_sending_then_the_host_closes(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    with listen(f"{uds}_8000") as listener:
        host, _ = open_from_guest(guest, listener, 8000, 43000)
    guest.send(Op.RW, 43000, 8000, b"last words")
    guest.send(Op.SHUTDOWN, 43000, 8000, flags=SHUTDOWN_SEND)
    assert read_to_eof(host) == b"last words"  # then EOF
    host.sendall(b"the other way still works")
    assert guest.expect(Op.RW).payload == b"the other way still works"
    host.close()
    shutdown = guest.expect(Op.SHUTDOWN)
    assert shutdown.flags == SHUTDOWN_RCV | SHUTDOWN_SEND
    guest.send(Op.RST, 43000, 8000)  # the guest ends it, as §5.10.6.5 has it
    assert_gone(guest, 8000, 43000)
    assert device.counters()["connections"] == 0


def test_host_shutdown_of_sending_then_the_guest_closes(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    host, port = open_from_host(guest, uds, 8001)
    host.sendall(b"bye")
    host.shutdown(socket.SHUT_WR)
    assert guest.expect(Op.RW).payload == b"bye"
    shutdown = guest.expect(Op.SHUTDOWN)
    assert shutdown.flags == SHUTDOWN_SEND
    guest.send(Op.RW, 8001, port, b"still listening?")
    assert read_exactly(host, 16) == b"still listening?"
    guest.send(Op.SHUTDOWN, 8001, port, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    reset = guest.expect(Op.RST)  # kasou answers a full shutdown with RST
    assert (reset.src_port, reset.dst_port) == (port, 8001)
    assert host.recv(16) == b""
    assert device.counters()["connections"] == 0


def test_guest_shutdown_of_receiving_is_seen_by_the_host_as_a_broken_pipe(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    host, port = open_from_host(guest, uds, 8002)
    guest.send(Op.SHUTDOWN, 8002, port, flags=SHUTDOWN_RCV)
    guest.send(Op.CREDIT_REQUEST, 8002, port)  # a round trip: the shutdown is done
    guest.expect(Op.CREDIT_UPDATE)
    with pytest.raises(BrokenPipeError):
        host.sendall(b"x")


def test_a_host_that_closes_gets_the_guest_told_and_reset_after_the_linger(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig(linger=0.2)
    guest = Guest(driver, memory)
    host, port = open_from_host(guest, uds, 8003)
    host.close()
    assert guest.expect(Op.SHUTDOWN).flags == SHUTDOWN_RCV | SHUTDOWN_SEND
    reset = guest.expect(Op.RST)  # the guest never answered: kasou ends it
    assert (reset.src_port, reset.dst_port) == (port, 8003)
    assert device.counters()["connections"] == 0


# --- malformed input ------------------------------------------------------------------


MALFORMED = {
    "len larger than the payload": dict(length=10, payload=b"abcde"),
    "len smaller than the payload": dict(length=2, payload=b"abcde"),
    "foreign src_cid": dict(src_cid=4, payload=b"x"),
    "not for the host": dict(dst_cid=7, payload=b"x"),
    "seqpacket": dict(kind=2, payload=b"x"),
    "unknown operation": dict(op=9),
    "operation 0": dict(op=0),
    "payload over 64 KiB": dict(payload=b"y" * (MAX_PAYLOAD + 1)),
    "control packet with payload": dict(op=Op.CREDIT_UPDATE, payload=b"zz"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_packet_is_dropped_and_resets_its_connection(
    rig: Rig, memory: GuestMemory, uds: Path, case: str
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    host, port = open_from_host(guest, uds, 300)
    fields: dict[str, Any] = {"op": Op.RW, **MALFORMED[case]}
    guest.send(fields.pop("op"), 300, port, fields.pop("payload", b""), **fields)
    reset = guest.expect(Op.RST)
    assert (reset.src_port, reset.dst_port) == (port, 300)
    assert host.recv(16) == b""  # nothing of it reached the host
    assert device.counters()["dropped_packets"] == 1
    assert not driver.status & Status.NEEDS_RESET
    open_from_host(guest, uds, 301)  # the device goes on


def test_packets_shorter_than_a_header_are_dropped(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    host, port = open_from_host(guest, uds, 300)
    guest.send_raw(HEADER.pack(GUEST_CID, 2, 300, port, 0, 1, Op.RST, 0, 0, 0)[:20])
    guest.send_raw(b"")
    guest.send(Op.RW, 300, port, b"alive")
    assert read_exactly(host, 5) == b"alive"
    assert device.counters()["dropped_packets"] == 2


def test_rx_buffers_too_small_for_a_header_are_returned_unused(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    Guest(driver, memory, rx_buffers=0)
    head, _ = driver.submit(RXQ, writable=[HEADER.size])
    assert driver.wait_used(RXQ) == [(head, 0)]
    assert not driver.status & Status.NEEDS_RESET


# --- many, and no buffers -------------------------------------------------------------


def test_many_connections_at_once(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    hosts = {}
    for i in range(32):
        host, port = open_from_host(guest, uds, 2000 + i)
        hosts[(port, 2000 + i)] = host
    with listen(f"{uds}_9000") as listener:
        for i in range(32):
            host, _ = open_from_guest(guest, listener, 9000, 50000 + i)
            hosts[(9000, 50000 + i)] = host
    assert device.counters()["connections"] == 64
    for (local, peer), host in hosts.items():
        host.sendall(b"%d>%d" % (local, peer))
    seen = {}
    while len(seen) < len(hosts):
        packet = guest.expect(Op.RW)
        seen[(packet.src_port, packet.dst_port)] = packet.payload
    assert seen == {key: b"%d>%d" % key for key in hosts}
    for local, peer in hosts:
        guest.send(Op.RW, peer, local, b"%d<%d" % (local, peer))
    for (local, peer), host in hosts.items():
        expected = b"%d<%d" % (local, peer)
        assert read_exactly(host, len(expected)) == expected


def test_the_connection_table_is_bounded(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    device, driver = rig(max_connections=4)
    guest = Guest(driver, memory)
    with listen(f"{uds}_9000") as listener:
        opened = [open_from_guest(guest, listener, 9000, 50000 + i) for i in range(4)]
        guest.send(Op.REQUEST, 50004, 9000)
        reset = guest.expect(Op.RST)
        assert (reset.src_port, reset.dst_port) == (9000, 50004)
        refused = host_socket(uds)
        assert refused.recv(16) == b""
    assert device.counters()["refused"] == 2
    assert len(opened) == device.counters()["connections"] == 4


def test_a_flood_of_requests_to_unknown_ports_gets_rsts(rig: Rig, memory: GuestMemory) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    for i in range(300):
        guest.send(Op.REQUEST, 60000 + i, 100 + i)
    for i in range(300):
        reset = guest.expect(Op.RST)
        assert (reset.src_port, reset.dst_port) == (100 + i, 60000 + i)
    counters = device.counters()
    assert counters["connections"] == 0 and counters["resets_sent"] == 300


def test_data_waits_for_rx_buffers_and_nothing_is_lost(
    rig: Rig, memory: GuestMemory, uds: Path
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory, rx_buffers=2, repost=False)
    host, _ = open_from_host(guest, uds, 400)  # the REQUEST took one buffer
    sent = os.urandom(40 * 4096)
    host.sendall(sent)
    received = b""
    while len(received) < len(sent):
        packet = guest.expect(Op.RW)
        received += packet.payload
        guest.post_rx()  # one buffer at a time: kasou waits for each
    assert received == sent


def test_control_packets_wait_for_rx_buffers(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    _, driver = rig()
    guest = Guest(driver, memory, rx_buffers=0)
    hosts = [host_socket(uds) for _ in range(10)]
    for i, host in enumerate(hosts):
        host.sendall(b"CONNECT %d\n" % (500 + i))
    for i in range(20):  # RSTs for REQUESTs to nobody, too
        guest.send(Op.REQUEST, 61000 + i, 700 + i)
    for _ in range(30):
        guest.post_rx()
    packets = [guest.recv() for _ in range(30)]
    assert sorted(p.dst_port for p in packets if p.op == Op.REQUEST) == list(range(500, 510))
    assert sorted(p.src_port for p in packets if p.op == Op.RST) == list(range(700, 720))


# --- reset ----------------------------------------------------------------------------


def test_a_device_reset_closes_every_connection(rig: Rig, memory: GuestMemory, uds: Path) -> None:
    device, driver = rig()
    guest = Guest(driver, memory)
    from_host, _ = open_from_host(guest, uds, 1)
    with listen(f"{uds}_2") as listener:
        from_guest, _ = open_from_guest(guest, listener, 2, 3000)
    waiting = host_socket(uds)  # has not sent its line yet
    driver.write(Reg.STATUS, 0)
    for host in (from_host, from_guest, waiting):
        assert host.recv(16) == b""
    guest = Guest(driver, memory)  # the driver starts again: the device works as new
    open_from_host(guest, uds, 1)
    assert device.counters()["connections"] == 1


# --- throughput (printed, not asserted) -----------------------------------------------


def test_throughput_host_to_guest(
    rig: Rig, memory: GuestMemory, uds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory, rx_buffers=64, rx_size=MAX_PAYLOAD)
    window = 4 << 20
    host, port = open_from_host(guest, uds, 1, buf_alloc=window)
    total = 64 << 20
    block = os.urandom(1 << 20)
    sender = threading.Thread(target=lambda: [host.sendall(block) for _ in range(total >> 20)])
    digest = hashlib.sha256()
    start = time.perf_counter()
    sender.start()
    received = told = 0
    while received < total:
        packet = guest.recv()
        if packet.op != Op.RW:
            assert packet.op == Op.CREDIT_REQUEST
            continue
        digest.update(packet.payload)
        received += packet.len
        if received - told >= window // 4:
            guest.send(Op.CREDIT_UPDATE, 1, port, buf_alloc=window, fwd_cnt=received)
            told = received
    elapsed = time.perf_counter() - start
    sender.join(WAIT)
    assert digest.digest() == hashlib.sha256(block * (total >> 20)).digest()
    with capsys.disabled():
        print(
            f"\nvsock host->guest: {total >> 20} MiB in {elapsed:.2f} s, "
            f"{total / elapsed / (1 << 20):.0f} MiB/s (64 KiB rx buffers, Python driver)"
        )


def test_throughput_guest_to_host(
    rig: Rig, memory: GuestMemory, uds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, driver = rig()
    guest = Guest(driver, memory)
    with listen(f"{uds}_1") as listener:
        host, response = open_from_guest(guest, listener, 1, 1000)
    total = 64 << 20
    digest = hashlib.sha256()
    reader = threading.Thread(target=_read_into, args=(host, total, digest))
    payload = os.urandom(MAX_PAYLOAD)
    start = time.perf_counter()
    reader.start()
    buf_alloc, fwd_cnt, sent = response.buf_alloc, response.fwd_cnt, 0
    while sent < total:
        for packet in guest.poll():
            buf_alloc, fwd_cnt = packet.buf_alloc, packet.fwd_cnt
        if buf_alloc - (sent - fwd_cnt) < MAX_PAYLOAD:
            update = guest.expect(Op.CREDIT_UPDATE)
            buf_alloc, fwd_cnt = update.buf_alloc, update.fwd_cnt
            continue
        guest.send(Op.RW, 1000, 1, payload)
        sent += MAX_PAYLOAD
    reader.join(WAIT)
    elapsed = time.perf_counter() - start
    assert digest.digest() == hashlib.sha256(payload * (total // MAX_PAYLOAD)).digest()
    with capsys.disabled():
        print(
            f"\nvsock guest->host: {total >> 20} MiB in {elapsed:.2f} s, "
            f"{total / elapsed / (1 << 20):.0f} MiB/s (64 KiB packets, Python driver)"
        )


def _read_into(sock: socket.socket, total: int, digest: hashlib._Hash) -> None:
    got = 0
    while got < total:
        chunk = sock.recv(min(1 << 20, total - got))
        assert chunk
        digest.update(chunk)
        got += len(chunk)
