"""Rate limits: the token bucket's arithmetic on a clock the test moves, the option words,
and virtio-blk and virtio-net under a limit, driven by the Python virtio driver: throttled
requests complete later, in order, with their data intact, and no sooner than the limit
allows."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from virtio_driver import Driver, settle

from kasou.devices.ratelimit import RateLimit, TokenBucket, parse_rate
from kasou.devices.virtio.block import S_OK, T_FLUSH, T_IN, T_OUT, Block
from kasou.devices.virtio.net import F_MAC, Net
from kasou.devices.virtio.spec import F_VERSION_1
from kasou.disk import open_disk
from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.memory import GuestMemory
from kasou.vmm.config import DiskConfig, parse_disk, parse_net
from kasou.vmm.requests import RequestKind, parse_request


class Clock:
    """A clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedLoop:
    """A real event loop whose ``call_later`` waits for the test's clock, not the wall's:
    ``advance`` moves the clock and runs the timers that came due, on the loop."""

    def __init__(self, loop: EventLoop, clock: Clock) -> None:
        self.loop = loop
        self.clock = clock
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def add_reader(self, fd: int, handler: Callable[[int], None], events: int = 1) -> None:
        self.loop.add_reader(fd, handler, events)

    def remove(self, fd: int) -> None:
        self.loop.remove(fd)

    def call_soon(self, function: Callable[[], None]) -> None:
        self.loop.call_soon(function)

    def call_later(self, delay: float, function: Callable[[], None]) -> None:
        self.timers.append((self.clock.now + delay, function))

    @property
    def next_due(self) -> float:
        return min(when for when, _ in self.timers)

    def advance(self, seconds: float) -> None:
        settle(self.loop)
        self.clock.now += seconds
        due = [timer for timer in self.timers if timer[0] <= self.clock.now + 1e-9]
        self.timers = [timer for timer in self.timers if timer[0] > self.clock.now + 1e-9]
        for _, function in due:
            self.loop.call_soon(function)
        settle(self.loop)


# --- the bucket ---------------------------------------------------------------------------


def test_a_bucket_starts_full_spends_its_burst_first_and_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(capacity=100, rate=50, burst=30, clock=clock)
    bucket.consume(40)  # 30 from the burst, 10 from the bucket
    assert (bucket.burst, bucket.tokens) == (0, 90)
    bucket.consume(90)
    assert bucket.wait() == 0  # empty, not in debt
    bucket.consume(25)
    assert bucket.wait() == pytest.approx(0.5)  # 25 of debt at 50 a second
    clock.now += 0.5
    assert bucket.wait() == 0
    clock.now += 1.0
    assert bucket.tokens == pytest.approx(50)


def test_the_burst_is_never_refilled_and_a_long_idle_stops_at_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(capacity=10, rate=10, burst=5, clock=clock)
    bucket.consume(15)
    clock.now += 3600
    assert (bucket.tokens, bucket.burst) == (10, 0)


def test_a_request_larger_than_the_bucket_is_served_and_pays_for_it_afterwards() -> None:
    clock = Clock()
    bucket = TokenBucket(capacity=100, rate=100, clock=clock)
    assert bucket.wait() == 0
    bucket.consume(350)  # 3.5 buckets: no bucket could ever hold it, so it goes now
    assert bucket.wait() == pytest.approx(2.5)  # the 250 beyond the bucket, at 100 a second
    clock.now += 2.4
    assert bucket.wait() == pytest.approx(0.1)
    clock.now += 0.1
    assert bucket.wait() == 0


# --- the option words ---------------------------------------------------------------------


def test_disk_and_net_words_give_rate_limits() -> None:
    disk = parse_disk("a.img,bw=50M,iops=1000,bw-burst=1G")
    assert disk.rate == RateLimit(bandwidth=50 << 20, ops=1000, bandwidth_burst=1 << 30)
    assert parse_disk("a.img").rate is None
    net = parse_net("tap=t0,rx-bw=1M,tx-pps=200,tx-pps-burst=50")
    assert net.rx_rate == RateLimit(bandwidth=1 << 20)
    assert net.tx_rate == RateLimit(ops=200, ops_burst=50)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.img,bw=-5M", "cannot be negative"),
        ("a.img,iops=0", "must be above 0"),
        ("a.img,bw=0,bw-burst=1M", "must be above 0"),
        ("a.img,iops-burst=10", "a burst is on top of a rate"),
        ("a.img,bw=2T", "beyond any device"),
        ("a.img,iops=200000000", "beyond any device"),
        ("a.img,iops=fast", "whole number"),
        ("a.img,bw=lots", "with a unit"),
    ],
)
def test_bad_rates_are_one_line_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_disk(text)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("disk: ")


def test_a_change_applies_over_the_limit_in_force() -> None:
    base = RateLimit(bandwidth=1 << 20, ops=100, ops_burst=10)
    changed = parse_rate("rate-limit", {"bw": "2M", "iops": None}, base=base)
    assert changed == RateLimit(bandwidth=2 << 20)
    assert parse_rate("rate-limit", {"bw": None}, base=changed) is None


def test_the_rate_limit_request_is_parsed_and_checked() -> None:
    request = parse_request({"request": "rate-limit", "device": "block0", "bw": "10M"})
    assert (request.kind, request.device, request.rates) == (
        RequestKind.RATE_LIMIT,
        "block0",
        {"bw": "10M"},
    )
    with pytest.raises(ConfigError, match="device"):
        parse_request({"request": "rate-limit", "bw": 5})
    with pytest.raises(ConfigError):
        parse_request({"request": "rate-limit", "device": "block0", "bw": [1]})


def test_a_snapshot_keeps_the_limits_in_its_config(tmp_path: Path) -> None:
    from kasou.vmm.config import VmConfig
    from kasou.vmm.snapshot import decode_config, encode_config

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0" * 4096)
    image = tmp_path / "a.img"
    image.write_bytes(bytes(4096))
    config = VmConfig(
        kernel=kernel,
        disks=(parse_disk(f"{image},bw=4M,iops=50,iops-burst=7"),),
        nets=(parse_net("tap=t0,rx-pps=10,tx-bw=1M"),),
    )
    restored = decode_config(encode_config(config))
    assert restored.disks == config.disks and restored.nets == config.nets


# --- virtio-blk ---------------------------------------------------------------------------

DISK_SIZE = 1 << 20


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


class Disk:
    def __init__(self, loop: EventLoop, memory: GuestMemory, path: Path, rate: RateLimit):
        self.clock = Clock()
        self.timed = TimedLoop(loop, self.clock)
        config = DiskConfig(path, rate=rate)
        self.device = Block(self.timed, open_disk(path), config, clock=self.clock)
        self.driver = Driver.attach(self.device, memory, heap=0x100000)
        self.driver.start()
        self.memory = memory

    def read(self, sector: int, size: int) -> tuple[int, list[tuple[int, int, bool]]]:
        return self.driver.submit(0, [header(T_IN, sector)], [size, 1])

    def done(self) -> list[int]:
        return [head for head, _ in self.driver.take_used(0)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
def make_disk(
    loop: EventLoop, memory: GuestMemory, image: Path
) -> Iterator[Callable[[RateLimit], Disk]]:
    made: list[Disk] = []

    def make(rate: RateLimit) -> Disk:
        made.append(Disk(loop, memory, image, rate))
        return made[-1]

    yield make
    for disk in made:
        disk.driver.close()


def test_a_disk_over_its_bandwidth_serves_the_rest_later_in_order_and_intact(
    make_disk: Callable[[RateLimit], Disk], image: Path
) -> None:
    disk = make_disk(RateLimit(bandwidth=40960))  # a bucket of 4096 bytes
    requests = [disk.read(8 * n, 4096) for n in range(4)]
    settle(disk.timed.loop)
    heads = [head for head, _ in requests]
    assert disk.done() == heads[:2]  # the full bucket, then one request into debt
    assert disk.timed.next_due == pytest.approx(disk.clock.now + 0.1)  # 4096 bytes of debt
    disk.timed.advance(0.099)
    assert disk.done() == []
    disk.timed.advance(0.001)
    assert disk.done() == heads[2:3]
    disk.timed.advance(0.1)
    assert disk.done() == heads[3:]
    content = image.read_bytes()
    for n, (_, parts) in enumerate(requests):
        assert disk.memory.read(parts[1][0], 4096) == content[n * 4096 : (n + 1) * 4096]
        assert disk.memory.read(parts[2][0], 1)[0] == S_OK
    limits = disk.device.counters()["rate_limit"]
    assert limits["bandwidth"] == 40960 and limits["delayed"] == 2
    assert limits["throttled_seconds"] == pytest.approx(0.2)


def test_a_disk_over_its_iops_counts_writes_and_flushes_as_one_each(
    make_disk: Callable[[RateLimit], Disk], image: Path
) -> None:
    disk = make_disk(RateLimit(ops=20))  # two operations a bucket
    payload = os.urandom(512)
    heads = [disk.driver.submit(0, [header(T_OUT, 3), payload], [1])[0]]
    heads += [disk.driver.submit(0, [header(T_FLUSH)], [1])[0] for _ in range(3)]
    settle(disk.timed.loop)
    assert disk.done() == heads[:3]
    disk.timed.advance(0.05)
    assert disk.done() == heads[3:]
    assert image.read_bytes()[3 * 512 : 4 * 512] == payload


def test_a_live_change_frees_a_waiting_disk_at_once(
    make_disk: Callable[[RateLimit], Disk],
) -> None:
    disk = make_disk(RateLimit(ops=10))  # one operation a bucket
    heads = [disk.read(n, 512)[0] for n in range(3)]
    settle(disk.timed.loop)
    assert disk.done() == heads[:2]
    disk.device.set_rate_limit(None)
    settle(disk.timed.loop)
    assert disk.done() == heads[2:]  # no clock moved: the limit is gone
    assert disk.device.counters()["rate_limit"]["ops"] is None
    disk.timed.advance(1.0)  # the old limit's timer comes due and does nothing
    assert disk.done() == []
    assert disk.read(9, 512)[0] in [head for head, _ in disk.driver.wait_used(0)]


# --- virtio-net ---------------------------------------------------------------------------

VNET_HEADER = bytes(12)


class PairTap:
    """A TAP stand-in: a datagram socket pair; the test's end plays the host."""

    name = "pair0"
    mtu = 1500
    vnet_header_size = 12

    def __init__(self) -> None:
        self.device_end, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.device_end.setblocking(False)
        self.host.setblocking(False)
        self.fd = self.device_end.fileno()

    def set_offload(self, **offloads: bool) -> None:
        pass

    def close(self) -> None:
        self.device_end.close()
        self.host.close()

    def frames(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.host.recv(4096)[12:])
            except BlockingIOError:
                return got


def frame(n: int, size: int = 1000) -> bytes:
    return b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x88\xb5" + bytes([n]) * (size - 14)


@pytest.fixture
def net(loop: EventLoop, memory: GuestMemory) -> Iterator[tuple[Net, Driver, PairTap, TimedLoop]]:
    clock = Clock()
    timed = TimedLoop(loop, clock)
    tap = PairTap()
    device = Net(
        timed,
        tap,
        rx_rate=RateLimit(ops=20),  # two frames a bucket
        tx_rate=RateLimit(bandwidth=20000),  # 2000 bytes a bucket
        clock=clock,
    )
    driver = Driver.attach(device, memory)
    driver.start(F_VERSION_1 | F_MAC)
    yield device, driver, tap, timed
    driver.close()


def test_transmit_over_its_bandwidth_reaches_the_tap_later_in_order(
    net: tuple[Net, Driver, PairTap, TimedLoop],
) -> None:
    device, driver, tap, timed = net
    sent = [frame(n) for n in range(5)]
    for each in sent:
        driver.submit(1, [VNET_HEADER + each])
    settle(timed.loop)
    assert tap.frames() == sent[:3]  # 2000 bytes of bucket: two frames, a third into debt
    timed.advance(0.0499)  # 1000 bytes of debt at 20000 a second
    assert tap.frames() == []
    timed.advance(0.0001)
    assert tap.frames() == sent[3:4]
    timed.advance(0.05)
    assert tap.frames() == sent[4:]
    assert device.counters()["tx_packets"] == 5


def test_receive_over_its_rate_leaves_frames_in_the_tap_and_delivers_each(
    net: tuple[Net, Driver, PairTap, TimedLoop], memory: GuestMemory
) -> None:
    device, driver, tap, timed = net
    buffers = {}
    for _ in range(8):
        head, parts = driver.submit(0, [], [1526])
        buffers[head] = parts[0][0]
    sent = [frame(n, 200) for n in range(5)]
    for each in sent:
        tap.host.send(VNET_HEADER + each)
    settle(timed.loop)

    def delivered() -> list[bytes]:
        return [
            memory.read(buffers[head] + 12, length - 12) for head, length in driver.take_used(0)
        ]

    assert delivered() == sent[:3]  # two frames a bucket, a third into debt
    timed.advance(0.05)
    assert delivered() == sent[3:4]
    timed.advance(0.05)
    assert delivered() == sent[4:]
    counters = device.counters()
    assert counters["rx_packets"] == 5 and counters["rx_dropped"] == 0
    assert counters["rx_rate_limit"]["ops"] == 20
