"""Saving and restoring virtio devices, dirty marking of what devices write, and parking the
event loop they run on.

A Python driver (``virtio_driver``) plays the guest. A snapshot here is what a VM snapshot
takes of a device: its loop parked, the transport's state saved (and put through
``kasou.persist``, as a snapshot file does) and guest RAM copied; the restore builds a fresh
device on a loop of its own over the copy, and a driver that carries on where the first one
was (its rings, indexes and free descriptors)."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import PAGE, WAIT, CountingTrigger, Driver, settle

from kasou.devices.virtio import VirtioDevice, VirtioMmio, VirtioMmioState
from kasou.devices.virtio.balloon import Balloon, BalloonState
from kasou.devices.virtio.console import Console
from kasou.devices.virtio.queue import VirtqueueState
from kasou.devices.virtio.rng import Rng
from kasou.devices.virtio.spec import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, Reg, Status
from kasou.devices.virtio.vsock import Op, Vsock, VsockState
from kasou.errors import HostError, SnapshotError
from kasou.event import EventLoop
from kasou.memory import GuestMemory
from kasou.persist import decode_state, encode_state

RUNNING = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
VSOCK_HEADER = struct.Struct("<QQIIIHHIII")
GUEST_CID = 3


def copy_of(memory: GuestMemory) -> GuestMemory:
    """A second guest RAM with the same layout and content (as a restore maps a snapshot's
    memory file)."""
    twin = GuestMemory.create([(region.gpa, region.size) for region in memory.regions])
    for region in memory.regions:
        twin.write(region.gpa, memory.view(region.gpa, region.size))
    return twin


def through_file(state: VirtioMmioState) -> VirtioMmioState:
    """``state`` as a snapshot file gives it back."""
    return decode_state(encode_state(state), VirtioMmioState, what="test")


def fresh(device: VirtioDevice, memory: GuestMemory) -> VirtioMmio:
    return VirtioMmio(device, memory, CountingTrigger())


def is_fresh(transport: VirtioMmio) -> bool:
    """Whether the transport is as built: nothing of a refused state reached it."""
    return (
        transport.status == 0
        and transport.driver_features == 0
        and not transport.device.active
        and not any(queue.ready or queue.live for queue in transport.queues)
        and all(queue.last_avail == 0 and queue.used_idx == 0 for queue in transport.queues)
    )


class Twin:
    """The restoring side: a copy of guest RAM, an event loop of its own, and drivers that
    carry on from the snapshot. ``close`` stops the loop, closes the devices, then the RAM."""

    def __init__(self) -> None:
        self.loop = EventLoop("test-restored")
        self.loop.start()
        self.memory: GuestMemory | None = None
        self.drivers: list[Driver] = []

    def snapshot(self, loop: EventLoop, driver: Driver) -> VirtioMmioState:
        """Park the device's loop, save its transport and copy guest RAM; unpark."""
        loop.park()
        try:
            state = driver.transport.save()
            self.memory = copy_of(driver.memory)
        finally:
            loop.unpark()
        return through_file(state)

    def restore(
        self, state: VirtioMmioState, make: Callable[[EventLoop], VirtioDevice], old: Driver
    ) -> Driver:
        """A fresh device restored from ``state``, and a driver that goes on as ``old``."""
        assert self.memory is not None
        trigger = CountingTrigger()
        transport = VirtioMmio(make(self.loop), self.memory, trigger)
        driver = Driver(transport, self.memory, trigger, heap=old._next)
        driver.features = old.features
        for index, queue in old.queues.items():
            driver.queues[index] = copy.copy(queue)
            driver.queues[index].free = list(queue.free)
        self.drivers.append(driver)
        transport.restore(state)
        return driver

    def close(self) -> None:
        self.loop.stop()
        for driver in self.drivers:
            driver.close()
        if self.memory is not None:
            self.memory.close()


@pytest.fixture
def twin() -> Iterator[Twin]:
    made = Twin()
    yield made
    made.close()


@pytest.fixture
def attach(loop: EventLoop, memory: GuestMemory) -> Iterator[Callable[[VirtioDevice], Driver]]:
    """Drivers for devices on the test's loop, closed after the test (before the loop)."""
    made: list[Driver] = []

    def make(device: VirtioDevice) -> Driver:
        made.append(Driver.attach(device, memory))
        return made[-1]

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    # Short: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="vstate", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the transport: a driver carries on across a restore ------------------------------------


@pytest.mark.parametrize(
    "features",
    [None, F_VERSION_1, F_VERSION_1 | F_INDIRECT_DESC],
    ids=["event-idx", "flags", "indirect"],
)
def test_a_restored_device_carries_on_where_the_driver_was(
    loop: EventLoop,
    attach: Callable[[VirtioDevice], Driver],
    twin: Twin,
    features: int | None,
) -> None:
    driver = attach(Rng(loop))
    driver.start(features)
    indirect = bool(driver.features & F_INDIRECT_DESC)
    done = [driver.submit(0, writable=[32], indirect=indirect)[0] for _ in range(3)]
    assert [head for head, _ in driver.wait_used(0, 3)] == done
    settle(loop)  # the device is done looking at the ring
    # Made available just before the snapshot, with no notification the device saw.
    pending = [driver.submit(0, writable=[48], indirect=indirect, notify=False) for _ in range(2)]
    settle(loop)

    state = twin.snapshot(loop, driver)
    assert state.status == RUNNING
    assert state.device is None  # virtio-rng keeps nothing beyond its transport
    assert (state.queues[0].last_avail_idx, state.queues[0].used_idx) == (3, 3)

    restored = twin.restore(state, Rng, driver)
    assert restored.status == RUNNING
    assert restored.read(Reg.DEVICE_ID) == 4
    # The restore serves the queue once: the two pending requests, each once, in order.
    assert restored.wait_used(0, 2) == [(head, 48) for head, _ in pending]
    for _, parts in pending:
        (address, size, _), *_ = parts
        assert twin.memory is not None and twin.memory.read(address, size) != b"\xee" * size
    # And the driver goes on: the next request completes at the next index.
    head, _ = restored.submit(0, writable=[16], indirect=indirect)
    assert restored.wait_used(0) == [(head, 16)]
    assert restored.used_idx(0) == 6
    assert restored.take_used(0) == []  # nothing done twice
    assert restored.transport.device.counters()["requests"] == 3


def test_a_device_the_driver_had_not_started_restores_unstarted(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], twin: Twin
) -> None:
    driver = attach(Rng(loop))
    driver.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
    driver.write(Reg.QUEUE_SEL, 0)
    driver.write(Reg.QUEUE_NUM, 16)
    state = twin.snapshot(loop, driver)
    restored = twin.restore(state, Rng, driver)
    assert restored.status == Status.ACKNOWLEDGE | Status.DRIVER
    assert not restored.transport.device.active
    # The driver finishes bringing it up, and it serves.
    restored.start()
    head, _ = restored.submit(0, writable=[8])
    assert restored.wait_used(0) == [(head, 8)]


def test_a_device_that_needed_a_reset_still_needs_it(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], twin: Twin
) -> None:
    driver = attach(Rng(loop))
    driver.start()
    queue = driver.queues[0]
    driver.memory.write_int(queue.avail + 2, 2, queue.size + 1)  # a broken available index
    driver.notify(0)
    driver.wait_status(Status.NEEDS_RESET)
    state = twin.snapshot(loop, driver)
    assert state.broken is not None

    restored = twin.restore(state, Rng, driver)
    assert restored.status & Status.NEEDS_RESET
    assert restored.transport.device.broken == state.broken
    assert not restored.transport.device.active
    restored.start()  # a reset and a new start bring it back
    head, _ = restored.submit(0, writable=[8])
    assert restored.wait_used(0) == [(head, 8)]


def test_a_pending_interrupt_is_raised_again(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], twin: Twin
) -> None:
    driver = attach(Rng(loop))
    driver.start(F_VERSION_1)
    driver.submit(0, writable=[8])
    driver.trigger.wait_beyond(0)
    assert driver.read(Reg.INTERRUPT_STATUS) == 1  # not acknowledged at the snapshot
    state = twin.snapshot(loop, driver)

    restored = twin.restore(state, Rng, driver)
    assert restored.trigger.wait_beyond(0), "no interrupt after the restore"
    assert restored.read(Reg.INTERRUPT_STATUS) == 1


def test_only_a_fresh_transport_takes_a_state(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver]
) -> None:
    driver = attach(Rng(loop))
    driver.start()
    with pytest.raises(SnapshotError, match="freshly built"):
        driver.transport.restore(driver.transport.save())


# --- refusing damaged states ------------------------------------------------------------


@pytest.fixture
def saved(loop: EventLoop, attach: Callable[[VirtioDevice], Driver]) -> VirtioMmioState:
    """A running virtio-rng's state, some requests done."""
    driver = attach(Rng(loop))
    driver.start()
    driver.submit(0, writable=[8])
    driver.wait_used(0)
    loop.park()
    try:
        return through_file(driver.transport.save())
    finally:
        loop.unpark()


def _queue(state: VirtioMmioState, **changes: Any) -> VirtioMmioState:
    queues = (dataclasses.replace(state.queues[0], **changes),)
    return dataclasses.replace(state, queues=queues)


DAMAGE: list[tuple[str, Callable[[VirtioMmioState, GuestMemory], VirtioMmioState], str]] = [
    ("another device", lambda s, m: dataclasses.replace(s, device_type=2), "device_type"),
    (
        "features not offered",
        lambda s, m: dataclasses.replace(s, driver_features=s.driver_features | 1 << 40),
        "driver_features",
    ),
    (
        "FEATURES_OK without VERSION_1",
        lambda s, m: dataclasses.replace(s, driver_features=F_EVENT_IDX),
        "VERSION_1",
    ),
    (
        "DRIVER_OK without FEATURES_OK",
        lambda s, m: dataclasses.replace(s, status=Status.DRIVER | Status.DRIVER_OK),
        "status",
    ),
    ("status beyond 32 bits", lambda s, m: dataclasses.replace(s, status=1 << 32), "status"),
    (
        "a failure without NEEDS_RESET",
        lambda s, m: dataclasses.replace(s, broken="it broke"),
        "NEEDS_RESET",
    ),
    ("an unknown interrupt", lambda s, m: dataclasses.replace(s, interrupt_status=4), "interrupt"),
    ("a queue missing", lambda s, m: dataclasses.replace(s, queues=()), "queues"),
    ("state for a stateless device", lambda s, m: dataclasses.replace(s, device=b"\x80"), "rng"),
    ("a size not a power of two", lambda s, m: _queue(s, size=48), "queues[0]: queue 0: size"),
    ("a size beyond the maximum", lambda s, m: _queue(s, size=128), "queues[0]: queue 0: size"),
    ("a misaligned ring", lambda s, m: _queue(s, desc_addr=s.queues[0].desc_addr + 8), "aligned"),
    ("a ring outside RAM", lambda s, m: _queue(s, used_addr=m.size - 4), "outside guest RAM"),
    ("an index beyond 16 bits", lambda s, m: _queue(s, used_idx=0x10000), "used_idx"),
    ("a negative index", lambda s, m: _queue(s, last_avail_idx=-1), "last_avail_idx"),
    ("an address beyond 64 bits", lambda s, m: _queue(s, avail_addr=1 << 64), "avail_addr"),
]


@pytest.mark.parametrize(
    ("damage", "field"), [(d[1], d[2]) for d in DAMAGE], ids=[d[0] for d in DAMAGE]
)
def test_a_damaged_state_is_refused_naming_the_field_and_nothing_is_applied(
    loop: EventLoop,
    memory: GuestMemory,
    saved: VirtioMmioState,
    damage: Callable[[VirtioMmioState, GuestMemory], VirtioMmioState],
    field: str,
) -> None:
    device = Rng(loop)
    device.name = "rng7"
    transport = fresh(device, memory)
    try:
        with pytest.raises(SnapshotError, match="rng7") as refused:
            transport.restore(damage(saved, memory))
        assert field in str(refused.value)
        assert is_fresh(transport)
        transport.restore(saved)  # the same transport still takes a sound state
        assert transport.device.active
    finally:
        device.close()
        transport.close()
        settle(loop)


_VALUES = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=0, max_value=0x1_0000),
    st.sampled_from([0, 1, 0xFFFF, 0xFFFF_FFFF, 1 << 32, 1 << 63, (1 << 64) - 1]),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.binary(max_size=4),
)
_TRANSPORT_FIELDS = [f.name for f in dataclasses.fields(VirtioMmioState)]
_QUEUE_FIELDS = [f.name for f in dataclasses.fields(VirtqueueState)]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_change_to_a_state_restores_or_is_refused_whole(
    loop: EventLoop, memory: GuestMemory, saved: VirtioMmioState, data: st.DataObject
) -> None:
    if data.draw(st.booleans(), label="in the queue"):
        name = data.draw(st.sampled_from(_QUEUE_FIELDS), label="field")
        state = _queue(saved, **{name: data.draw(_VALUES, label="value")})
    else:
        name = data.draw(st.sampled_from(_TRANSPORT_FIELDS), label="field")
        state = dataclasses.replace(saved, **{name: data.draw(_VALUES, label="value")})
    transport = fresh(Rng(loop), memory)
    try:
        transport.restore(state)
    except SnapshotError:
        assert is_fresh(transport)
    finally:
        transport.device.close()
        transport.close()
        settle(loop)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), min_size=1, max_size=3)
)
def test_bit_flips_in_a_saved_state_never_get_past_the_checks_unnoticed(
    loop: EventLoop, memory: GuestMemory, saved: VirtioMmioState, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(encode_state(saved))
    for at, bit in flips:
        data[at % len(data)] ^= 1 << bit
    transport = fresh(Rng(loop), memory)
    try:
        transport.restore(decode_state(bytes(data), VirtioMmioState, what="rng"))
    except SnapshotError:
        assert is_fresh(transport)
    finally:
        transport.device.close()
        transport.close()
        settle(loop)


# --- device states -------------------------------------------------------------------------


def test_the_balloon_keeps_its_target_actual_size_and_statistics(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], twin: Twin
) -> None:
    device = Balloon(loop)
    driver = attach(device)
    driver.start()
    device.set_target(8 << 20)
    driver.transport.write(Reg.CONFIG + 4, memoryview(bytearray((1500).to_bytes(4, "little"))))
    device.set_stats_interval(3600)
    stats = struct.pack("<HQ", 4, 123 << 20) + struct.pack("<HQ", 5, 456 << 20)
    stats_head, _ = driver.submit(2, readable=[stats])
    settle(loop)
    assert device.stats() == {"free_memory": 123 << 20, "total_memory": 456 << 20}

    state = twin.snapshot(loop, driver)
    assert state.device is not None
    saved = decode_state(state.device, BalloonState, what="balloon")
    assert (saved.target_pages, saved.actual_pages, saved.stats_head) == (2048, 1500, stats_head)

    restored = twin.restore(state, Balloon, driver)
    balloon = restored.transport.device
    assert isinstance(balloon, Balloon)
    assert struct.unpack("<II", restored.config(0, 8)) == (2048, 1500)
    assert (balloon.target, balloon.actual) == (8 << 20, 1500 << 12)
    assert balloon.stats() == {"free_memory": 123 << 20, "total_memory": 456 << 20}
    assert balloon.stats_interval == 3600
    # The statistics buffer is held again: asking for fresh figures returns it.
    balloon.set_stats_interval(0.001)
    assert restored.wait_used(2) == [(stats_head, 0)]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stats_head": 4096}, "stats_head"),
        ({"target_pages": 1 << 32}, "target_pages"),
        ({"stats": ((99, 1),)}, "stats"),
        ({"stats": ((4, 1), (4, 2))}, "stats"),
        ({"stats_interval_ms": -1}, "stats_interval_ms"),
    ],
)
def test_a_damaged_balloon_state_is_refused(
    loop: EventLoop, change: dict[str, Any], field: str
) -> None:
    good = BalloonState(
        target_pages=1, actual_pages=0, stats=(), stats_head=None, stats_interval_ms=2000
    )
    device = Balloon(loop)
    try:
        with pytest.raises(SnapshotError, match=f"balloon.*{field}"):
            device.load_state(encode_state(dataclasses.replace(good, **change)))
        with pytest.raises(SnapshotError, match="balloon"):
            device.load_state(b"\x93not a state")
        assert device.target == 0  # nothing applied
        device.load_state(encode_state(good))
        assert device.target == 4096
    finally:
        device.close()


def test_console_input_waiting_for_the_guest_survives(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], twin: Twin
) -> None:
    output: list[bytes] = []
    device = Console(loop, output.append)
    driver = attach(device)
    driver.start(F_VERSION_1 | F_EVENT_IDX)  # no MULTIPORT: port 0 only, no handshake
    assert device.enqueue_input(b"typed before the snapshot") == 25
    settle(loop)
    state = twin.snapshot(loop, driver)

    restored = twin.restore(state, lambda reactor: Console(reactor, output.append), driver)
    head, parts = restored.submit(0, writable=[64])
    assert restored.wait_used(0) == [(head, 25)]
    assert twin.memory is not None
    assert twin.memory.read(parts[0][0], 25) == b"typed before the snapshot"


def test_vsock_tells_the_guest_its_connections_were_reset(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], twin: Twin, folder: Path
) -> None:
    driver = attach(Vsock(loop, GUEST_CID, folder / "a.sock"))
    driver.start()
    rx = [driver.submit(0, writable=[4096], notify=False) for _ in range(4)]
    driver.notify(0)
    events = [driver.submit(2, writable=[4]) for _ in range(2)]
    settle(loop)
    state = twin.snapshot(loop, driver)
    assert state.device is not None
    held = decode_state(state.device, VsockState, what="vsock")
    assert held == VsockState(
        rx_heads=tuple(head for head, _ in rx), event_heads=tuple(head for head, _ in events)
    )

    restored = twin.restore(
        state, lambda reactor: Vsock(reactor, GUEST_CID, folder / "b.sock"), driver
    )
    # §5.10.6.6: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0) in the first event buffer.
    head, parts = events[0]
    assert restored.wait_used(2) == [(head, 4)]
    assert twin.memory is not None
    assert twin.memory.read(parts[0][0], 4) == bytes(4)  # was 0xee before
    assert restored.take_used(2) == []  # one event, not one per buffer

    # The rx buffers the device held at the snapshot carry the next packet.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.settimeout(WAIT)
        host.connect(str(folder / "b.sock"))
        host.sendall(b"CONNECT 1234\n")
        [(head, length)] = restored.wait_used(0)
    assert head == rx[0][0] and length == VSOCK_HEADER.size
    packet = VSOCK_HEADER.unpack(twin.memory.read(rx[0][1][0][0], VSOCK_HEADER.size))
    assert (packet[6], packet[3]) == (Op.REQUEST, 1234)


# --- dirty marking --------------------------------------------------------------------------


def _marked_while(memory: GuestMemory, work: Callable[[], None]) -> set[int]:
    """The pages of guest RAM marked written while ``work`` runs."""
    memory.start_write_log()
    try:
        work()
        log = memory.take_write_log()
    finally:
        memory.stop_write_log()
    return {page for first, count in log[0].runs() for page in range(first, first + count)}


def _ring_pages(queue: Any) -> set[int]:
    return {queue.used >> 12, (queue.used + 6 + 8 * queue.size - 1) >> 12}


def test_what_a_device_writes_is_marked_in_the_write_log(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], memory: GuestMemory
) -> None:
    driver = attach(Rng(loop))
    driver.start(F_VERSION_1)  # without event idx the driver writes nothing while it waits
    driver.alloc(PAGE, PAGE)  # the buffer starts on a page of its own, apart from the rings
    # Written by the driver before the log starts: only what the device writes counts.
    head, parts = driver.submit(0, writable=[PAGE + 16], notify=False)

    def serve() -> None:
        driver.notify(0)
        assert driver.wait_used(0) == [(head, PAGE + 16)]

    (address, _, _), *_ = parts
    buffer = {address >> 12, (address >> 12) + 1}
    assert _marked_while(memory, serve) == _ring_pages(driver.queues[0]) | buffer


def test_the_used_elements_are_marked_apart_from_the_index(
    loop: EventLoop, memory: GuestMemory
) -> None:
    # Rings laid out so that the used ring's flags and index end one page and its elements
    # from the second on start the next: rng's queue of 64 is a 1024-byte table, a 134-byte
    # available ring and the used ring after it.
    boundary = 0x20000
    driver = Driver.attach(Rng(loop), memory, heap=boundary - 1168)
    try:
        driver.start(F_VERSION_1)
        queue = driver.queues[0]
        assert queue.used == boundary - 8  # flags, index, then element 0 across the boundary
        driver.alloc(PAGE, PAGE)  # 0x21000: the buffers come after it, at 0x22000
        heads = [driver.submit(0, writable=[8], notify=False)[0] for _ in range(2)]

        def serve() -> None:
            driver.notify(0)
            assert [head for head, _ in driver.wait_used(0, 2)] == heads

        # The index's page, the second element's, and the buffers'.
        assert _marked_while(memory, serve) == {0x1F, 0x20, 0x22}
    finally:
        driver.close()


def test_a_device_that_only_reads_marks_only_the_used_ring(
    loop: EventLoop, attach: Callable[[VirtioDevice], Driver], memory: GuestMemory
) -> None:
    output: list[bytes] = []
    driver = attach(Console(loop, output.append))
    driver.start(F_VERSION_1)
    driver.alloc(PAGE, PAGE)
    head, _ = driver.submit(1, readable=[b"x" * (PAGE + 16)], notify=False)

    def serve() -> None:
        driver.notify(1)
        assert driver.wait_used(1) == [(head, 0)]

    assert _marked_while(memory, serve) == _ring_pages(driver.queues[1])
    assert output == [b"x" * (PAGE + 16)]


# --- parking the event loop -----------------------------------------------------------------


def _loop_thread_frames(loop: EventLoop) -> list[str]:
    """The functions on the loop thread's stack now."""
    thread = loop._thread
    assert thread is not None and thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def test_park_holds_handlers_back_until_unpark(loop: EventLoop) -> None:
    read_end, write_end = os.pipe()
    phase = ["running"]
    seen: list[str] = []
    ran = threading.Event()

    def readable(events: int) -> None:
        os.read(read_end, 16)
        seen.append(phase[0])
        ran.set()

    try:
        loop.add_reader(read_end, readable)
        loop.park()
        phase[0] = "parked"
        os.write(write_end, b"x")
        loop.call_soon(lambda: seen.append(phase[0]))
        assert "_sit" in _loop_thread_frames(loop)  # waiting inside a call, no handler
        phase[0] = "unparked"
        loop.unpark()
        assert ran.wait(WAIT)
        settle(loop)
        assert seen == ["unparked", "unparked"]
    finally:
        loop.remove(read_end)
        os.close(read_end)
        os.close(write_end)


def test_park_waits_for_a_running_handler(loop: EventLoop) -> None:
    inside, release = threading.Event(), threading.Event()

    def busy() -> None:
        inside.set()
        release.wait(WAIT)

    loop.call_soon(busy)
    assert inside.wait(WAIT)
    with pytest.raises(HostError, match="did not pause"):
        loop.park(timeout=0.05)  # the handler never lets it
    release.set()
    loop.park()  # the failed park was undone: this one stands alone
    loop.unpark()
    settle(loop)


def test_parks_nest(loop: EventLoop) -> None:
    done = threading.Event()
    loop.park()
    loop.park()
    loop.unpark()
    loop.call_soon(done.set)
    assert "_sit" in _loop_thread_frames(loop)
    assert not done.is_set()
    loop.unpark()
    assert done.wait(WAIT)
    loop.unpark()  # one too many: nothing to undo


def test_park_is_refused_on_the_loop_thread(loop: EventLoop) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def inside() -> None:
        try:
            loop.park()
        except RuntimeError as error:
            errors.append(error)
        done.set()

    loop.call_soon(inside)
    assert done.wait(WAIT)
    assert len(errors) == 1


def test_a_loop_that_does_not_run_parks_at_once_and_stops_while_parked() -> None:
    idle = EventLoop("test-idle")
    idle.park()  # never started
    idle.unpark()
    idle.start()
    idle.park()
    idle.stop()  # gets up, ends
    idle.park()  # stopped
    idle.unpark()
