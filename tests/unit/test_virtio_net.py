"""virtio-net over real TAPs: a Python driver plays the guest (``virtio_driver``), the device
runs on a real event loop, and the host side is a fresh network namespace with the TAP in it
(packet sockets to see and inject frames, a TCP socket for offloads end to end)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from netns_harness import Netns, receive_incoming, skip_reason
from virtio_driver import Driver

from kasou.devices.virtio.net import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_MAC,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    HEADER,
    MAX_FRAME,
    Net,
    NetBackend,
    mac_for,
)
from kasou.devices.virtio.spec import (
    F_EVENT_IDX,
    F_VERSION_1,
    Interrupt,
    Reg,
    Status,
)
from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.memory import GuestMemory
from kasou.tap import open_tap

RX, TX = 0, 1
MAC = bytes.fromhex("020000aabbcc")
HOST_MAC_UNUSED = bytes.fromhex("02000000beef")
ETHERTYPE = 0x88B5  # IEEE 802 local experimental: no host stack acts on these frames
BASIC = F_VERSION_1 | F_EVENT_IDX
HDR_F_NEEDS_CSUM, HDR_F_DATA_VALID = 1, 2
GSO_TCPV4 = 1

needs_netns = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def header(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    return HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def ether(payload: bytes, dst: bytes = MAC, src: bytes = HOST_MAC_UNUSED) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + payload


def is_test_frame(data: bytes) -> bool:
    return data[12:14] == struct.pack("!H", ETHERTYPE)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[Netns]:
    if skip_reason() is not None:
        pytest.skip(str(skip_reason()))
    namespace = Netns()
    yield namespace
    namespace.close()


class Rig(NamedTuple):
    driver: Driver
    device: Net
    memory: GuestMemory
    tap: str  # the TAP's name inside ``netns``


@pytest.fixture
def make_rig(loop: EventLoop, memory: GuestMemory, netns: Netns) -> Iterator[Callable[..., Rig]]:
    made: list[Driver] = []

    def make(name: str = "kt0", mac: str | None = "02:00:00:aa:bb:cc") -> Rig:
        tap = netns.run(lambda: open_tap(name))
        device = Net(loop, tap, mac=mac, name="net0")
        made.append(Driver.attach(device, memory))
        return Rig(made[-1], device, memory, tap.name)

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


def post_rx(driver: Driver, count: int, size: int) -> dict[int, int]:
    """Post ``count`` receive buffers; returns head -> buffer address."""
    buffers = {}
    for _ in range(count):
        head, parts = driver.submit(RX, writable=[size])
        buffers[head] = parts[0][0]
    return buffers


def receive_frame(
    driver: Driver, memory: GuestMemory, buffers: dict[int, int]
) -> tuple[tuple[int, ...], bytes, int]:
    """The next received frame as the guest sees it: header fields, frame, buffers used."""
    ((head, length),) = driver.wait_used(RX, 1)
    data = memory.read(buffers[head], length)
    fields = HEADER.unpack(data[: HEADER.size])
    count = fields[6]
    for head, length in driver.wait_used(RX, count - 1):
        data += memory.read(buffers[head], length)
    return fields, data[HEADER.size :], count


def barrier(loop: EventLoop) -> None:
    """Return once the loop has handled every fd that was ready before this call: the
    timer set from the call runs in the loop's next turn, after the handlers of this one."""
    done = threading.Event()
    loop.call_soon(lambda: loop.call_later(0, done.set))
    assert done.wait(10)


# --- identity ---------------------------------------------------------------------------


@needs_netns
def test_features_and_config_space(rig: Rig) -> None:
    driver = rig.driver
    offered = driver.device_features()
    wanted = (F_CSUM | F_GUEST_CSUM | F_MTU | F_MAC | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN) | (
        F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_MRG_RXBUF | F_STATUS | F_VERSION_1
    )
    assert offered & wanted == wanted
    assert not offered & (1 << 17 | 1 << 10 | 1 << 14)  # no control queue, no UFO
    assert driver.read(Reg.DEVICE_ID) == 1
    mac, status, pairs, mtu = struct.unpack("<6sHHH", driver.config(0, 12))
    assert (mac, status, pairs, mtu) == (MAC, 1, 1, 1500)


@needs_netns
def test_a_generated_mac_is_local_unicast_and_stable_per_tap(
    make_rig: Callable[..., Rig],
) -> None:
    first = make_rig("kt-mac", mac=None)
    mac = first.driver.config(0, 6)
    assert mac == mac_for("kt-mac") != mac_for("kt-other")
    assert mac[0] & 0x01 == 0 and mac[0] & 0x02  # unicast, locally administered
    first.device.close()  # the TAP goes away; the same name comes back with the same MAC
    again = make_rig("kt-mac", mac=None)
    assert again.driver.config(0, 6) == mac


@needs_netns
def test_a_bad_mac_is_refused_and_the_tap_released(loop: EventLoop, netns: Netns) -> None:
    tap = netns.run(lambda: open_tap("kt-bad"))
    with pytest.raises(ConfigError, match="multicast"):
        Net(loop, tap, mac="01:00:5e:00:00:01")
    assert tap.fd == -1
    assert not netns.exists("kt-bad")


# --- transmit ---------------------------------------------------------------------------


@needs_netns
@pytest.mark.parametrize("layout", ["separate", "together", "indirect"])
def test_a_frame_the_guest_sends_appears_on_the_tap(rig: Rig, netns: Netns, layout: str) -> None:
    rig.driver.start()
    sock = netns.packet_socket(rig.tap)
    frame = ether(b"from the guest " + bytes(range(64)), dst=b"\xff" * 6, src=MAC)
    if layout == "together":
        head, _ = rig.driver.submit(TX, readable=[header() + frame])
    else:
        head, _ = rig.driver.submit(
            TX, readable=[header(), frame[:20], frame[20:]], indirect=layout == "indirect"
        )
    assert rig.driver.wait_used(TX) == [(head, 0)]
    assert receive_incoming(sock, is_test_frame) == frame
    counters = rig.device.counters()
    assert (counters["tx_packets"], counters["tx_bytes"]) == (1, len(frame))
    assert (counters["tap"], counters["mac"], counters["link"]) == ("kt0", MAC.hex(":"), "up")


@needs_netns
def test_malformed_transmit_chains_are_dropped_and_the_device_goes_on(
    rig: Rig, netns: Netns
) -> None:
    driver = rig.driver
    driver.start(BASIC | F_CSUM)  # no HOST_TSO4: a GSO header is not allowed
    sock = netns.packet_socket(rig.tap)
    frame = ether(b"fine" * 20, src=MAC)
    gso = header(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1000, 34, 16)
    malformed: list[dict[str, Any]] = [
        {"readable": [header()]},  # a header and no frame
        {"readable": [b"\0" * 5]},  # not even a header
        {"readable": [header(), frame], "writable": [64]},  # device-writable buffers on tx
        {"readable": [header(), bytes(MAX_FRAME + 1)]},  # longer than any frame
        {"readable": [gso, frame]},  # an offload the driver did not negotiate
    ]
    for chain in malformed:
        driver.submit(TX, **chain)
    # A descriptor pointing outside guest RAM: the queue refuses the chain itself.
    queue = driver.queues[TX]
    slot = queue.free.pop(0)
    driver.write_desc(queue, slot, 1 << 40, 64, 0, 0)
    driver.publish(TX, slot)
    driver.submit(TX, readable=[header(), b"\x01" * 5])  # a runt the TAP refuses (EINVAL)
    head, _ = driver.submit(TX, readable=[header(), frame])
    used = driver.wait_used(TX, 8)
    assert [length for _, length in used] == [0] * 8
    assert used[-1][0] == head
    assert receive_incoming(sock, is_test_frame) == frame
    counters = rig.device.counters()
    assert (counters["tx_dropped"], counters["tx_errors"], counters["tx_packets"]) == (6, 1, 1)
    assert not driver.status & Status.NEEDS_RESET


@needs_netns
def test_ten_thousand_small_frames_to_the_tap(rig: Rig, netns: Netns) -> None:
    driver, memory = rig.driver, rig.memory
    driver.start(BASIC)
    queue = driver.queues[TX]
    total, window = 10_000, queue.size
    frame = header() + ether(bytes(46), dst=b"\xff" * 6, src=MAC)  # 60 bytes on the wire
    for slot in range(window):  # one fixed single-buffer chain per descriptor, reused
        address = driver.alloc(len(frame))
        memory.write(address, frame)
        driver.write_desc(queue, slot, address, len(frame), 0, 0)
    queue.free.clear()
    start = time.perf_counter()
    for slot in range(window):
        driver.publish(TX, slot, notify=False)
    driver.notify(TX)
    published, done = window, 0
    while done < total:
        used = driver.wait_used(TX, min(64, total - done))
        done += len(used)
        for head, _ in used:
            if published < total:
                driver.publish(TX, head, notify=False)
                published += 1
        driver.notify(TX)
    elapsed = time.perf_counter() - start
    print(f"\nvirtio-net tx: {total / elapsed:,.0f} frames/s ({total} frames of 60 bytes)")
    assert rig.device.counters()["tx_packets"] == total
    assert netns.link(rig.tap)["stats64"]["rx"]["packets"] == total


class SocketTap:
    """A TAP stand-in for backpressure: a datagram socket pair with a tiny send buffer, so
    the device's writes hit EAGAIN until the test reads from the other end."""

    name = "fake0"
    mtu = 1500
    vnet_header_size = 12

    def __init__(self) -> None:
        self.device_end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.device_end.setblocking(False)
        self.device_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum
        self.peer.settimeout(10)
        self.fd = self.device_end.fileno()
        self.offloads: dict[str, bool] = {}

    def set_offload(self, **offloads: bool) -> None:
        self.offloads = offloads

    def close(self) -> None:
        self.device_end.close()
        self.peer.close()


@pytest.fixture
def fake(loop: EventLoop, memory: GuestMemory) -> Iterator[tuple[Driver, Net, SocketTap]]:
    tap = SocketTap()
    backend: NetBackend = tap
    device = Net(loop, backend, mac="02:00:00:aa:bb:cc")
    driver = Driver.attach(device, memory)
    yield driver, device, tap
    driver.close()


def test_a_tap_that_pushes_back_delays_frames_and_loses_none(
    fake: tuple[Driver, Net, SocketTap],
) -> None:
    driver, device, tap = fake
    driver.start(BASIC)
    frames = [ether(bytes([n]) * 1000, src=MAC) for n in range(64)]
    for frame in frames:
        driver.submit(TX, readable=[header(), frame])
    received = [tap.peer.recv(4096) for _ in frames]
    assert received == [header() + frame for frame in frames]
    assert len(driver.wait_used(TX, 64)) == 64
    counters = device.counters()
    assert counters["tx_waits"] >= 1
    assert (counters["tx_packets"], counters["tx_dropped"], counters["tx_errors"]) == (64, 0, 0)


# --- receive ----------------------------------------------------------------------------


@needs_netns
def test_a_frame_from_the_host_reaches_the_guest(rig: Rig, netns: Netns) -> None:
    rig.driver.start(BASIC)  # no checksum offload, no mergeable buffers
    buffers = post_rx(rig.driver, 4, 1526)  # §5.1.6.3.1's minimum for this feature set
    sock = netns.packet_socket(rig.tap)
    frame = ether(b"to the guest" * 10)
    sock.send(frame)
    fields, data, _ = receive_frame(rig.driver, rig.memory, buffers)
    assert data == frame
    assert fields == (0, 0, 0, 0, 0, 0, 1)  # no offload fields, num_buffers 1
    counters = rig.device.counters()
    assert (counters["rx_packets"], counters["rx_bytes"]) == (1, len(frame))


@needs_netns
def test_a_big_frame_spans_small_mergeable_buffers(
    make_rig: Callable[..., Rig], netns: Netns
) -> None:
    netns.ip("tuntap", "add", "dev", "kt-jumbo", "mode", "tap")
    netns.ip("link", "set", "dev", "kt-jumbo", "mtu", "9000", "up")
    rig = make_rig("kt-jumbo")
    assert rig.driver.config(10, 2) == struct.pack("<H", 9000)  # the MTU the guest is told
    rig.driver.start(BASIC | F_MRG_RXBUF)
    buffers = post_rx(rig.driver, 16, 1024)
    sock = netns.packet_socket(rig.tap)
    frame = ether(bytes(range(256)) * 23)  # 5902 bytes
    sock.send(frame)
    fields, data, count = receive_frame(rig.driver, rig.memory, buffers)
    assert data == frame
    assert count == fields[6] == -(-(12 + len(frame)) // 1024) == 6


@needs_netns
def test_without_mergeable_buffers_a_frame_too_big_for_the_buffer_is_dropped(
    rig: Rig, netns: Netns
) -> None:
    rig.driver.start(BASIC)
    buffers = post_rx(rig.driver, 1, 1024)  # smaller than the driver should post
    sock = netns.packet_socket(rig.tap)
    sock.send(ether(bytes(1400)))
    small = ether(b"fits")
    sock.send(small)
    _, data, _ = receive_frame(rig.driver, rig.memory, buffers)
    assert data == small  # it landed in the buffer the big frame could not use
    assert rig.device.counters()["rx_dropped"] == 1


@needs_netns
def test_frames_wait_for_buffers_and_flow_once_the_guest_posts_some(
    rig: Rig, netns: Netns, loop: EventLoop
) -> None:
    rig.driver.start(BASIC | F_MRG_RXBUF)
    sock = netns.packet_socket(rig.tap)
    frames = [ether(bytes([n]) * 100) for n in range(3)]
    for frame in frames:
        sock.send(frame)
    barrier(loop)
    waits = rig.device.counters()["rx_waits"]
    assert waits >= 1
    barrier(loop)  # a device still watching the readable TAP would have woken again
    assert rig.device.counters()["rx_waits"] == waits
    assert rig.device.counters()["rx_packets"] == 0
    buffers = post_rx(rig.driver, 8, 2048)
    got = [receive_frame(rig.driver, rig.memory, buffers)[1] for _ in frames]
    assert got == frames


def test_the_header_from_the_tap_is_completed_for_the_guest(
    fake: tuple[Driver, Net, SocketTap],
) -> None:
    driver, _, tap = fake
    driver.start(BASIC | F_MRG_RXBUF)  # no GUEST_CSUM: checksum flags must not reach it
    buffers = post_rx(driver, 4, 2048)
    frame = ether(b"x" * 80)
    tap.peer.send(header(flags=HDR_F_DATA_VALID, num_buffers=0xFFFF) + frame)
    fields, data, _ = receive_frame(driver, driver.memory, buffers)
    assert (fields[0], fields[6], data) == (0, 1, frame)
    assert tap.offloads == {"csum": False, "tso4": False, "tso6": False, "ecn": False}
    driver.start()  # everything: the flags pass, and the TAP is told what the guest takes
    buffers = post_rx(driver, 4, 2048)
    tap.peer.send(header(flags=HDR_F_DATA_VALID) + frame)
    fields, data, _ = receive_frame(driver, driver.memory, buffers)
    assert (fields[0], fields[6], data) == (HDR_F_DATA_VALID, 1, frame)
    assert tap.offloads == {"csum": True, "tso4": True, "tso6": True, "ecn": True}


@needs_netns
def test_a_tap_that_is_down_drops_frames_as_errors(
    make_rig: Callable[..., Rig], netns: Netns
) -> None:
    netns.ip("tuntap", "add", "dev", "kt-down", "mode", "tap")  # the owner left it down
    rig = make_rig("kt-down")
    rig.driver.start()
    rig.driver.submit(TX, readable=[header(), ether(b"nobody listens", src=MAC)])
    assert rig.driver.wait_used(TX)[0][1] == 0
    counters = rig.device.counters()
    assert (counters["tx_errors"], counters["tx_packets"]) == (1, 0)


# --- lifecycle --------------------------------------------------------------------------


@needs_netns
def test_after_a_reset_frames_flow_again(rig: Rig, netns: Netns) -> None:
    driver = rig.driver
    sock = netns.packet_socket(rig.tap)
    for turn in range(2):
        driver.start()
        buffers = post_rx(driver, 2, 2048)
        sent = ether(f"tx {turn}".encode(), src=MAC)
        driver.submit(TX, readable=[header(), sent])
        assert receive_incoming(sock, sent.__eq__) == sent
        back = ether(f"rx {turn}".encode())
        sock.send(back)
        assert receive_frame(driver, rig.memory, buffers)[1] == back
        driver.write(Reg.STATUS, 0)
    assert rig.device.counters()["tx_packets"] == 2


@needs_netns
def test_a_deleted_tap_takes_the_link_down_without_stalling_the_guest(
    rig: Rig, netns: Netns
) -> None:
    driver = rig.driver
    driver.start()
    post_rx(driver, 4, 2048)  # the device keeps watching the TAP
    seen = driver.trigger.count
    netns.ip("link", "del", "dev", rig.tap)
    assert driver.trigger.wait_beyond(seen)
    assert driver.read(Reg.INTERRUPT_STATUS) & Interrupt.CONFIG_CHANGE
    assert struct.unpack("<H", driver.config(6, 2)) == (0,)  # status: link down
    driver.submit(TX, readable=[header(), ether(b"into the void", src=MAC)])
    assert driver.wait_used(TX)[0][1] == 0  # consumed, not left hanging
    counters = rig.device.counters()
    assert (counters["link"], counters["tx_errors"]) == ("down", 1)


# --- TCP through the TAP: offloads both ways ---------------------------------------------

HOST_IP, GUEST_IP = bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2])
HOST_PORT, GUEST_PORT = 5000, 40000
TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08


def checksum(data: bytes) -> int:
    """The Internet checksum's folded one's complement sum (RFC 1071), not inverted."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_frame(
    host_mac: bytes,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    options: bytes = b"",
    partial: bool = False,
) -> bytes:
    """An Ethernet/IPv4/TCP frame from the guest; with ``partial`` the TCP checksum field
    holds only the pseudo-header sum, for the host to finish (VIRTIO_NET_HDR_F_NEEDS_CSUM)."""
    tcp_len = 20 + len(options) + len(payload)
    tcp = (
        struct.pack(
            "!HHIIBBHHH",
            GUEST_PORT,
            HOST_PORT,
            seq,
            ack,
            (20 + len(options)) // 4 << 4,
            flags,
            65535,
            0,
            0,
        )
        + options
    )
    pseudo = GUEST_IP + HOST_IP + struct.pack("!BBH", 0, 6, tcp_len)
    # The field holds the pseudo-header's sum for the host to finish, or the full checksum.
    check = checksum(pseudo) if partial else 0xFFFF ^ checksum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, GUEST_IP, HOST_IP)
    ip = ip[:10] + struct.pack("!H", 0xFFFF ^ checksum(ip)) + ip[12:]
    return host_mac + MAC + b"\x08\x00" + ip + tcp + payload


def parse_tcp(frame: bytes) -> tuple[int, int, int, bytes] | None:
    """(seq, ack, flags, payload) of a TCP segment from the host to the guest, else None."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 6 or frame[30:34] != GUEST_IP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack("!H", frame[16:18])[0]
    tcp = frame[14 + ihl : 14 + total]
    seq, ack, offset, flags = struct.unpack("!IIBB", tcp[4:14])
    return seq, ack, flags, tcp[(offset >> 4) * 4 :]


@needs_netns
def test_tcp_with_segmentation_offloads_both_ways(rig: Rig, netns: Netns) -> None:
    driver, memory = rig.driver, rig.memory
    driver.start()  # every feature: CSUM/HOST_TSO4 out, GUEST_CSUM/GUEST_TSO4 and MRG_RXBUF in
    netns.ip("addr", "add", "10.99.0.1/24", "dev", rig.tap)
    netns.ip("neigh", "add", "10.99.0.2", "lladdr", MAC.hex(":"), "dev", rig.tap)

    def listen() -> socket.socket:
        server = socket.socket()
        server.bind(("10.99.0.1", HOST_PORT))
        server.listen()
        server.settimeout(10)
        return server

    server = netns.run(listen)
    host_mac = bytes.fromhex(netns.link(rig.tap)["address"].replace(":", ""))
    buffers = post_rx(driver, 128, 1024)  # small buffers: big frames must span several

    def next_segment() -> tuple[tuple[int, ...], int, tuple[int, int, int, bytes]]:
        while True:
            fields, frame, count = receive_frame(driver, memory, buffers)
            segment = parse_tcp(frame)
            if segment is not None:
                return fields, count, segment

    # Handshake: SYN (MSS 1460), SYN-ACK, ACK.
    mss = struct.pack("!BBH", 2, 4, 1460)
    driver.submit(TX, readable=[header(), tcp_frame(host_mac, 1000, 0, TCP_SYN, options=mss)])
    _, _, (host_seq, ack, flags, _) = next_segment()
    assert flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK and ack == 1001
    driver.submit(TX, readable=[header(), tcp_frame(host_mac, 1001, host_seq + 1, TCP_ACK)])
    connection, _ = server.accept()
    connection.settimeout(10)

    # Guest to host: one 30000-byte TSO frame with a partial checksum; the host kernel
    # segments or takes it whole, and the application reads every byte.
    sent = bytes(n * 7 % 251 for n in range(30000))
    gso = header(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1460, 34, 16)
    frame = tcp_frame(host_mac, 1001, host_seq + 1, TCP_ACK | TCP_PSH, sent, partial=True)
    driver.submit(TX, readable=[gso, frame])
    received = b""
    while len(received) < len(sent):
        chunk = connection.recv(65536)
        assert chunk, "the host closed the connection"
        received += chunk
    assert received == sent
    assert [length for _, length in driver.wait_used(TX, 3)] == [0, 0, 0]
    assert rig.device.counters()["tx_packets"] == 3  # SYN, ACK, one 30000-byte frame

    # Host to guest: 12000 bytes (inside the initial congestion window) come as GSO frames
    # spread over the guest's 1 KiB buffers.
    reply = bytes(n * 13 % 253 for n in range(12000))
    connection.sendall(reply)
    data = bytearray(len(reply))
    covered: set[int] = set()
    spans: list[tuple[int, int, int]] = []  # (frame length, gso_type, buffers used)
    while len(covered) < len(reply):
        fields, count, (seq, _, _, payload) = next_segment()
        offset = (seq - host_seq - 1) & 0xFFFFFFFF
        if not payload or offset >= len(reply):
            continue  # an ACK for the guest's data
        data[offset : offset + len(payload)] = payload
        covered.update(range(offset, offset + len(payload)))
        spans.append((14 + 20 + 20 + len(payload), fields[1], count))
    assert bytes(data) == reply
    assert any(length > 1514 and gso == GSO_TCPV4 and count > 1 for length, gso, count in spans)
    connection.close()
    server.close()
