"""virtio-rng and, through it, the virtio-mmio transport and virtqueues end to end: a
Python driver (``virtio_driver``) programs the registers and rings; the device runs on a real
event loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from virtio_driver import Driver

from kasou.devices.virtio import Virtqueue
from kasou.devices.virtio.rng import MAX_REQUEST, Rng
from kasou.devices.virtio.spec import F_EVENT_IDX, F_VERSION_1, Reg, Status
from kasou.event import EventLoop
from kasou.memory import GuestMemory


@pytest.fixture
def rng(loop: EventLoop, memory: GuestMemory) -> Iterator[tuple[Driver, Rng]]:
    device = Rng(loop)
    driver = Driver.attach(device, memory)
    yield driver, device
    driver.close()


def test_identity_registers(rng: tuple[Driver, Rng]) -> None:
    driver, _ = rng
    assert driver.read(Reg.MAGIC) == 0x74726976
    assert driver.read(Reg.VERSION) == 2
    assert driver.read(Reg.DEVICE_ID) == 4
    assert driver.device_features() & F_VERSION_1


@pytest.mark.parametrize("features", [None, F_VERSION_1])  # with and without event idx
def test_buffers_are_filled_with_random_bytes(
    rng: tuple[Driver, Rng], features: int | None
) -> None:
    driver, device = rng
    driver.start(features)
    heads = [driver.submit(0, writable=[64])[0] for _ in range(3)]
    entries = driver.wait_used(0, 3)
    assert [head for head, _ in entries] == heads
    assert all(length == 64 for _, length in entries)
    assert device.counters() == {"requests": 3, "bytes": 192}


def test_indirect_chains_are_served(rng: tuple[Driver, Rng], memory: GuestMemory) -> None:
    driver, _ = rng
    driver.start()
    head, parts = driver.submit(0, writable=[16, 48], indirect=True)
    assert driver.wait_used(0) == [(head, 64)]
    data = b"".join(memory.read(address, size) for address, size, _ in parts)
    assert data != b"\xee" * 64


def test_requests_are_capped(rng: tuple[Driver, Rng]) -> None:
    driver, _ = rng
    driver.start()
    driver.submit(0, writable=[MAX_REQUEST + 4096])
    assert driver.wait_used(0)[0][1] == MAX_REQUEST


def test_features_the_device_does_not_offer_are_refused(rng: tuple[Driver, Rng]) -> None:
    driver, _ = rng
    driver.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
    driver.write(Reg.DRIVER_FEATURES_SEL, 0)
    driver.write(Reg.DRIVER_FEATURES, 1 << 7)  # not offered
    driver.write(Reg.DRIVER_FEATURES_SEL, 1)
    driver.write(Reg.DRIVER_FEATURES, 1)  # VERSION_1
    driver.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert not driver.status & Status.FEATURES_OK


def test_a_reset_stops_the_device_and_it_starts_again(rng: tuple[Driver, Rng]) -> None:
    driver, _ = rng
    driver.start(F_VERSION_1 | F_EVENT_IDX)
    driver.submit(0, writable=[8])
    driver.wait_used(0)
    driver.write(Reg.STATUS, 0)
    assert driver.status == 0
    assert driver.read(Reg.INTERRUPT_STATUS) == 0
    driver.start()
    driver.submit(0, writable=[8])
    assert driver.wait_used(0)[0][1] == 8


class _BrokenRng(Rng):
    """An rng whose request handling has a bug: the base class must contain it."""

    def process(self, queue: Virtqueue) -> None:
        raise ZeroDivisionError("a bug in a device model")


def test_a_device_bug_stops_that_device_with_needs_reset(
    loop: EventLoop, memory: GuestMemory, rng: tuple[Driver, Rng]
) -> None:
    broken = _BrokenRng(loop)
    driver = Driver.attach(broken, memory, heap=0x800000)
    try:
        driver.start()
        driver.submit(0, writable=[8])
        driver.wait_status(Status.NEEDS_RESET)
        assert "ZeroDivisionError" in (broken.broken or "")
        healthy, _ = rng  # the loop, and another device on it, go on
        healthy.start()
        healthy.submit(0, writable=[8])
        assert healthy.wait_used(0)[0][1] == 8
    finally:
        driver.close()
