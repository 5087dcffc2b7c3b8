"""virtio-console: the multiport control handshake, hvc0 output and input, and port 1's bytes
both ways through its Unix socket, driven by the Python driver (``virtio_driver``) on a real
event loop with a real socket client."""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtio_driver import WAIT, Driver, settle

from kasou.devices.virtio.console import (
    F_EMERG_WRITE,
    F_MULTIPORT,
    INPUT_LIMIT,
    PORT1_NAME,
    Console,
)
from kasou.devices.virtio.spec import F_VERSION_1, Reg
from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.memory import GuestMemory

PORT0_RX, PORT0_TX, CONTROL_RX, CONTROL_TX, PORT1_RX, PORT1_TX = range(6)
DEVICE_READY, DEVICE_ADD, PORT_READY, CONSOLE_PORT, PORT_OPEN, PORT_NAME = 0, 1, 3, 4, 6, 7
BAD_ID = 0xFFFFFFFF  # VIRTIO_CONSOLE_BAD_ID: the id Linux puts in DEVICE_READY


class Sink:
    """Where port 0's output goes: collects it and lets a test wait for it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._changed = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self._changed:
            self.data += data
            self._changed.notify_all()

    def wait_for(self, size: int) -> bytes:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.data) >= size, WAIT), bytes(self.data)
            return bytes(self.data)


class Guest:
    """The driver's side of the console, as Linux's virtio_console drives it."""

    def __init__(self, driver: Driver, memory: GuestMemory) -> None:
        self.driver = driver
        self.memory = memory
        self.buffers: dict[tuple[int, int], int] = {}  # (queue, head) -> buffer address

    def give(self, queue: int, count: int = 1, size: int = 4096) -> None:
        """Make ``count`` device-writable buffers available on a receive queue."""
        for _ in range(count):
            head, parts = self.driver.submit(queue, writable=[size])
            self.buffers[queue, head] = parts[0][0]

    def received(self, queue: int, count: int = 1) -> list[bytes]:
        """What the device put in the next ``count`` used buffers of ``queue``."""
        return [
            self.memory.read(self.buffers[queue, head], length)
            for head, length in self.driver.wait_used(queue, count)
        ]

    def control(self, port: int, event: int, value: int = 1) -> None:
        self.driver.submit(CONTROL_TX, readable=[struct.pack("<IHH", port, event, value)])
        assert self.driver.wait_used(CONTROL_TX) is not None

    def messages(self, count: int) -> list[tuple[int, int, int, bytes]]:
        out = []
        for data in self.received(CONTROL_RX, count):
            port, event, value = struct.unpack_from("<IHH", data)
            out.append((port, event, value, data[8:]))
        return out

    def handshake(self, *, client: bool = False) -> None:
        """Bring both ports up as Linux does; check the device's every answer."""
        self.give(CONTROL_RX, 8)
        self.control(BAD_ID, DEVICE_READY)
        assert self.messages(2) == [(0, DEVICE_ADD, 0, b""), (1, DEVICE_ADD, 0, b"")]
        self.give(PORT0_RX, 2)
        self.control(0, PORT_READY)
        assert self.messages(2) == [(0, CONSOLE_PORT, 1, b""), (0, PORT_OPEN, 1, b"")]
        self.control(0, PORT_OPEN)  # hvc0 set up (init_port_console)
        self.control(1, PORT_READY)
        expected = [(1, PORT_NAME, 0, PORT1_NAME.encode())]
        if client:
            expected.append((1, PORT_OPEN, 1, b""))
        assert self.messages(len(expected)) == expected


@pytest.fixture
def path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # AF_UNIX paths are short
        yield Path(folder) / "port1.sock"


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def console(
    loop: EventLoop, memory: GuestMemory, sink: Sink, path: Path
) -> Iterator[tuple[Guest, Console]]:
    device = Console(loop, sink, socket=path)
    driver = Driver.attach(device, memory)
    yield Guest(driver, memory), device
    driver.close()


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(WAIT)
    client.connect(str(path))
    return client


def receive(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        assert chunk, f"the socket closed after {len(data)} bytes"
        data += chunk
    return data


def test_identity_features_and_config(console: tuple[Guest, Console]) -> None:
    guest, _ = console
    assert guest.driver.read(Reg.DEVICE_ID) == 3
    offered = guest.driver.device_features()
    assert offered & F_MULTIPORT and offered & F_EMERG_WRITE
    assert struct.unpack("<HHII", guest.driver.config(0, 12))[2] == 2  # max_nr_ports


def test_the_control_handshake_brings_up_both_ports(console: tuple[Guest, Console]) -> None:
    guest, device = console
    guest.driver.start()
    guest.handshake()
    assert device.counters()["ignored_control"] == 0


def test_port0_output_reaches_the_console(console: tuple[Guest, Console], sink: Sink) -> None:
    guest, device = console
    guest.driver.start()
    guest.handshake()
    guest.driver.submit(PORT0_TX, readable=[b"hello, ", b"hvc0\n"])
    head, _ = guest.driver.submit(PORT0_TX, readable=[b"again\n"], indirect=True)
    assert guest.driver.wait_used(PORT0_TX, 2)[1] == (head, 0)
    assert sink.wait_for(18) == b"hello, hvc0\nagain\n"
    assert device.counters()["output_bytes"] == 18


def test_port0_works_without_multiport(console: tuple[Guest, Console], sink: Sink) -> None:
    guest, _ = console
    guest.driver.start(F_VERSION_1, queues=[PORT0_RX, PORT0_TX])
    guest.driver.submit(PORT0_TX, readable=[b"single port\n"])
    assert sink.wait_for(12) == b"single port\n"


def test_emergency_writes_reach_the_console(console: tuple[Guest, Console], sink: Sink) -> None:
    guest, _ = console
    guest.driver.write(Reg.STATUS, 1)
    guest.driver.write(Reg.STATUS, 3)  # DRIVER: config writes are taken from here on
    for byte in b"early":
        guest.driver.write(Reg.CONFIG + 8, byte)
    assert sink.wait_for(5) == b"early"


def test_console_input_waits_until_hvc0_is_open(
    console: tuple[Guest, Console], loop: EventLoop
) -> None:
    guest, device = console
    assert device.enqueue_input(b"ls\r") == 3  # typed before the guest is up
    guest.driver.start()
    guest.give(CONTROL_RX, 8)
    guest.control(BAD_ID, DEVICE_READY)
    guest.messages(2)
    guest.give(PORT0_RX, 2, size=2)
    guest.control(0, PORT_READY)
    guest.messages(2)
    settle(loop)
    assert guest.driver.used_idx(PORT0_RX) == 0  # the guest would drop it: not open yet
    guest.control(0, PORT_OPEN)
    assert guest.received(PORT0_RX, 2) == [b"ls", b"\r"]
    assert device.counters()["input_bytes"] == 3


def test_console_input_is_bounded(console: tuple[Guest, Console]) -> None:
    _, device = console
    assert device.enqueue_input(bytes(INPUT_LIMIT - 10)) == INPUT_LIMIT - 10
    assert device.input_space() == 10
    assert device.enqueue_input(b"x" * 50) == 10
    assert device.enqueue_input(b"more") == 0


def test_port1_carries_bytes_both_ways(console: tuple[Guest, Console], path: Path) -> None:
    guest, device = console
    guest.driver.start()
    guest.handshake()
    client = connect(path)
    assert guest.messages(1) == [(1, PORT_OPEN, 1, b"")]  # the host end is open
    guest.give(PORT1_RX, 2)
    guest.control(1, PORT_OPEN)  # a guest program opened /dev/vport0p1
    client.sendall(b"ping from the host")
    assert b"".join(guest.received(PORT1_RX)) == b"ping from the host"
    guest.driver.submit(PORT1_TX, readable=[b"pong ", b"from the guest"])
    assert guest.driver.wait_used(PORT1_TX)[0][1] == 0
    assert receive(client, 19) == b"pong from the guest"
    counters = device.counters()
    assert counters["port1_to_guest_bytes"] == 18
    assert counters["port1_to_host_bytes"] == 19
    assert counters["port1_connected"]
    # The client leaves: the guest is told the host end closed.
    client.close()
    assert guest.messages(1) == [(1, PORT_OPEN, 0, b"")]
    assert not device.connected


def test_a_client_there_before_the_guest_is_announced_in_the_handshake(
    console: tuple[Guest, Console], path: Path, loop: EventLoop
) -> None:
    guest, device = console
    client = connect(path)
    settle(loop)
    assert device.connected
    guest.driver.start()
    guest.handshake(client=True)
    client.close()


def test_one_client_at_a_time(console: tuple[Guest, Console], path: Path) -> None:
    guest, _ = console
    guest.driver.start()
    guest.handshake()
    first = connect(path)
    guest.messages(1)
    second = connect(path)
    assert second.recv(1) == b""  # hung up on
    second.close()
    guest.give(PORT1_RX)
    guest.control(1, PORT_OPEN)
    first.sendall(b"still here")
    assert guest.received(PORT1_RX) == [b"still here"]
    first.close()


def test_the_socket_is_read_only_while_the_guest_can_take_it(
    console: tuple[Guest, Console], path: Path, loop: EventLoop
) -> None:
    guest, device = console
    guest.driver.start()
    guest.handshake()
    client = connect(path)
    guest.messages(1)
    client.sendall(b"early bytes")
    guest.give(PORT1_RX)  # a buffer, but the guest has not opened the port
    settle(loop)
    assert guest.driver.used_idx(PORT1_RX) == 0
    assert device.counters()["port1_to_guest_bytes"] == 0
    guest.control(1, PORT_OPEN)
    assert guest.received(PORT1_RX) == [b"early bytes"]
    client.sendall(b"later")  # open, but no buffer: the bytes stay in the socket
    settle(loop)
    assert device.counters()["port1_to_guest_bytes"] == 11
    guest.give(PORT1_RX)
    assert guest.received(PORT1_RX) == [b"later"]
    client.close()


def test_guest_output_waits_for_a_slow_client(
    console: tuple[Guest, Console], path: Path, loop: EventLoop
) -> None:
    guest, _ = console
    guest.driver.start()
    guest.handshake()
    client = connect(path)
    guest.messages(1)
    chunks = [bytes([n]) * (512 << 10) for n in range(1, 5)]  # 2 MiB: more than a socket holds
    for chunk in chunks:
        guest.driver.submit(PORT1_TX, readable=[chunk])
    settle(loop)
    assert guest.driver.used_idx(PORT1_TX) < 4  # chains are held until their bytes are sent
    assert receive(client, 2 << 20) == b"".join(chunks)
    assert len(guest.driver.wait_used(PORT1_TX, 4)) == 4
    client.close()


def test_guest_output_with_no_client_is_dropped(console: tuple[Guest, Console]) -> None:
    guest, device = console
    guest.driver.start()
    guest.handshake()
    guest.driver.submit(PORT1_TX, readable=[b"nobody listens"])
    assert guest.driver.wait_used(PORT1_TX)[0][1] == 0
    assert device.counters()["port1_dropped_bytes"] == 14


def test_malformed_control_messages_are_ignored(console: tuple[Guest, Console]) -> None:
    guest, device = console
    guest.driver.start()
    guest.give(CONTROL_RX, 8)
    guest.driver.submit(CONTROL_TX, readable=[b"\x01\x00"])  # shorter than a header
    guest.control(7, PORT_READY)  # no such port
    guest.control(0, DEVICE_ADD)  # the device's message, not the driver's
    guest.control(0, 42)  # no such event
    guest.driver.wait_used(CONTROL_TX)  # the short one (the others were waited for)
    assert device.counters()["ignored_control"] == 4
    assert guest.driver.used_idx(CONTROL_RX) == 0  # nothing answered
    guest.control(0, PORT_READY)  # before DEVICE_READY: no port was added yet ...
    assert device.counters()["ignored_control"] == 5
    guest.control(BAD_ID, DEVICE_READY)
    assert guest.messages(2) == [(0, DEVICE_ADD, 0, b""), (1, DEVICE_ADD, 0, b"")]
    guest.control(BAD_ID, DEVICE_READY)  # ... and a repeated DEVICE_READY adds nothing
    guest.control(1, PORT_READY)
    assert guest.messages(1) == [(1, PORT_NAME, 0, PORT1_NAME.encode())]


def test_a_control_buffer_too_short_is_returned_empty(console: tuple[Guest, Console]) -> None:
    guest, _ = console
    guest.driver.start()
    guest.give(CONTROL_RX, 1, size=4)
    guest.give(CONTROL_RX, 2)
    guest.control(BAD_ID, DEVICE_READY)
    used = guest.driver.wait_used(CONTROL_RX, 3)
    assert used[0][1] == 0
    assert [length for _, length in used[1:]] == [8, 8]


def test_the_socket_file_goes_with_the_device(
    loop: EventLoop, memory: GuestMemory, sink: Sink, path: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file nobody listens on: left by a killed VM
    stale.close()
    device = Console(loop, sink, socket=path)
    assert path.is_socket()
    connect(path).close()
    with pytest.raises(ConfigError, match="in use"):
        Console(loop, sink, socket=path)
    device.close()
    assert not path.exists()


def test_a_path_that_is_not_a_socket_is_refused(loop: EventLoop, sink: Sink, path: Path) -> None:
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        Console(loop, sink, socket=path)
    assert path.read_text() == "keep me"
