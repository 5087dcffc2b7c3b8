"""virtio-balloon: inflate, deflate, the balloon size in config space, statistics and free
page reporting, driven by the Python driver (``virtio_driver``) on a real event loop. Whether
a page went back to the host is read from the kernel (mincore(2)), not from the device."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
from virtio_driver import PAGE, Driver, resident_pages, settle

from kasou.devices.virtio.balloon import (
    F_DEFLATE_ON_OOM,
    F_PAGE_REPORTING,
    F_STATS_VQ,
    MAX_STATS,
    Balloon,
)
from kasou.devices.virtio.spec import F_VERSION_1, Interrupt, Reg
from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.memory import GuestMemory

MIB = 1 << 20
RAM = 16 * MIB
INFLATE, DEFLATE, STATS, REPORTING = 0, 1, 2, 3
F_FREE_PAGE_HINT = 1 << 3
PATTERN = 0x5A


@pytest.fixture(params=["anonymous", "memfd"])
def memory(request: pytest.FixtureRequest) -> Iterator[GuestMemory]:
    memory = GuestMemory.create([(0, RAM)], backing=request.param)
    yield memory
    memory.close()


@pytest.fixture
def balloon(loop: EventLoop, memory: GuestMemory) -> Iterator[tuple[Driver, Balloon]]:
    device = Balloon(loop)
    driver = Driver.attach(device, memory)
    yield driver, device
    driver.close()


def pfn_array(pages: list[int]) -> bytes:
    return struct.pack(f"<{len(pages)}I", *pages)


def stats_buffer(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in pairs)


def test_identity_and_features(balloon: tuple[Driver, Balloon]) -> None:
    driver, _ = balloon
    assert driver.read(Reg.DEVICE_ID) == 5
    offered = driver.device_features()
    assert offered & F_STATS_VQ and offered & F_DEFLATE_ON_OOM and offered & F_PAGE_REPORTING
    assert not offered & F_FREE_PAGE_HINT  # so reporting follows stats directly


def test_inflate_gives_the_pages_back_to_the_host(
    balloon: tuple[Driver, Balloon], memory: GuestMemory
) -> None:
    driver, device = balloon
    driver.start()
    base = 4 * MIB
    memory.fill(base, 64 * PAGE, PATTERN)
    assert resident_pages(memory, base, 64 * PAGE) == 64
    # Pages 8..39 and 50, in the scattered order a guest hands them over, one twice.
    pages = [(base >> 12) + n for n in [*range(8, 40), 50]]
    random.Random(5).shuffle(pages)
    head, _ = driver.submit(INFLATE, readable=[pfn_array([*pages, pages[0]])])
    assert driver.wait_used(INFLATE) == [(head, 0)]
    assert resident_pages(memory, base + 8 * PAGE, 32 * PAGE) == 0
    assert resident_pages(memory, base + 50 * PAGE, PAGE) == 0
    assert resident_pages(memory, base, 64 * PAGE) == 64 - 33
    assert memory.read(base + 8 * PAGE, 32 * PAGE) == bytes(32 * PAGE)
    # The pages around them are the guest's still.
    assert memory.read(base, 8 * PAGE) == bytes([PATTERN]) * 8 * PAGE
    assert memory.read(base + 40 * PAGE, 10 * PAGE) == bytes([PATTERN]) * 10 * PAGE
    assert memory.read(base + 51 * PAGE, 13 * PAGE) == bytes([PATTERN]) * 13 * PAGE
    assert device.counters()["inflated_pages"] == 33


def test_deflate_only_counts(balloon: tuple[Driver, Balloon], memory: GuestMemory) -> None:
    driver, device = balloon
    driver.start()
    base = 6 * MIB
    memory.fill(base, 4 * PAGE, PATTERN)
    driver.submit(DEFLATE, readable=[pfn_array([base >> 12, (base >> 12) + 1])])
    assert driver.wait_used(DEFLATE)[0][1] == 0
    assert memory.read(base, 4 * PAGE) == bytes([PATTERN]) * 4 * PAGE
    assert device.counters()["deflated_pages"] == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        pfn_array([0x400, RAM >> 12]),  # the second page is past the end of RAM
        pfn_array([0x400, 0xFFFFFFFF]),
        pfn_array([0x400, 0x401]) + b"\x02\x04",  # not whole u32s
        pfn_array([0x400] * 20000),  # more than one request may carry
    ],
)
def test_a_bad_inflate_request_fails_whole_and_the_device_goes_on(
    balloon: tuple[Driver, Balloon], memory: GuestMemory, request_bytes: bytes
) -> None:
    driver, device = balloon
    driver.start()
    memory.fill(0x400 * PAGE, 2 * PAGE, PATTERN)
    head, _ = driver.submit(INFLATE, readable=[request_bytes])
    assert driver.wait_used(INFLATE) == [(head, 0)]
    assert memory.read(0x400 * PAGE, 2 * PAGE) == bytes([PATTERN]) * 2 * PAGE
    assert device.counters()["inflated_pages"] == 0
    driver.submit(INFLATE, readable=[pfn_array([0x401])])
    driver.wait_used(INFLATE)
    assert memory.read(0x400 * PAGE, 2 * PAGE) == bytes([PATTERN]) * PAGE + bytes(PAGE)
    assert device.counters()["inflated_pages"] == 1


def test_the_target_is_in_config_space_with_a_config_interrupt(
    balloon: tuple[Driver, Balloon],
) -> None:
    driver, device = balloon
    device.set_target(3 * MIB + 100)  # before the driver: no interrupt, but it reads it
    driver.start()
    assert struct.unpack("<II", driver.config(0, 8)) == (768, 0)
    generation = driver.read(Reg.CONFIG_GENERATION)
    seen = driver.trigger.count
    device.set_target(8 * MIB)
    assert driver.trigger.count > seen
    assert driver.read(Reg.INTERRUPT_STATUS) & Interrupt.CONFIG_CHANGE
    assert driver.read(Reg.CONFIG_GENERATION) != generation
    assert struct.unpack("<I", driver.config(0, 4)) == (2048,)
    assert device.target == 8 * MIB
    # The driver reports the balloon it reached by writing ``actual``.
    driver.write(Reg.CONFIG + 4, 2048)
    assert device.actual == 8 * MIB
    assert struct.unpack("<IIII", driver.config(0, 16)) == (2048, 2048, 0, 0)
    assert device.counters()["target_pages"] == 2048
    assert device.counters()["actual_pages"] == 2048
    # The driver cannot change the target.
    driver.write(Reg.CONFIG, 5)
    assert device.target == 8 * MIB


def test_targets_that_cannot_be_are_refused(balloon: tuple[Driver, Balloon]) -> None:
    driver, device = balloon
    driver.start()
    device.set_target(MIB)
    for size in (-PAGE, RAM + PAGE):
        with pytest.raises(ConfigError, match="balloon"):
            device.set_target(size)
    assert device.target == MIB


def test_stats_are_parsed_and_asked_for_again(
    balloon: tuple[Driver, Balloon], loop: EventLoop
) -> None:
    driver, device = balloon
    device.set_stats_interval(0)  # hold the buffer until asked
    driver.start()
    assert device.stats() == {}
    first = stats_buffer((4, 100 * MIB), (5, 1024 * MIB), (2, 7), (0x7777, 1), (9, 3))
    head, _ = driver.submit(STATS, readable=[first])
    settle(loop)
    # The device keeps the buffer: nothing used yet, but the figures are there.
    assert driver.used_idx(STATS) == 0
    assert device.stats() == {
        "free_memory": 100 * MIB,
        "total_memory": 1024 * MIB,
        "major_faults": 7,
        "hugetlb_failures": 3,
    }
    assert device.stats_age is not None
    # Returning the buffer is the request for fresh figures, which come in the next one.
    device.set_stats_interval(0.01)
    assert driver.wait_used(STATS) == [(head, 0)]
    driver.submit(STATS, readable=[stats_buffer((4, 50 * MIB), (6, 60 * MIB), (0, 4096))])
    driver.wait_used(STATS)
    assert device.stats() == {
        "free_memory": 50 * MIB,
        "available_memory": 60 * MIB,
        "swap_in": 4096,
    }
    assert device.counters()["stats_updates"] == 2


@pytest.mark.parametrize(
    "buffer",
    [
        stats_buffer((4, 1)) + b"\x00",  # not whole entries
        stats_buffer(*[(4, 1)] * (MAX_STATS + 1)),  # too many
    ],
)
def test_a_bad_stats_buffer_is_returned_and_the_figures_kept(
    balloon: tuple[Driver, Balloon], loop: EventLoop, buffer: bytes
) -> None:
    driver, device = balloon
    device.set_stats_interval(0)
    driver.start()
    driver.submit(STATS, readable=[stats_buffer((4, 123))])
    settle(loop)
    head, _ = driver.submit(STATS, readable=[buffer])
    assert driver.wait_used(STATS) == [(head, 0)]
    assert device.stats() == {"free_memory": 123}


def test_reported_free_pages_go_back_to_the_host(
    balloon: tuple[Driver, Balloon], memory: GuestMemory
) -> None:
    driver, device = balloon
    driver.start()
    blocks = [8 * MIB, 12 * MIB]  # two 2 MiB free blocks (order 9), as Linux reports them
    for block in blocks:
        memory.fill(block, 2 * MIB, PATTERN)
    memory.fill(10 * MIB, 2 * MIB, PATTERN)  # not reported
    head = driver.submit_at(REPORTING, [(block, 2 * MIB, True) for block in blocks])
    assert driver.wait_used(REPORTING) == [(head, 0)]
    for block in blocks:
        assert resident_pages(memory, block, 2 * MIB) == 0
        assert memory.read(block, 2 * MIB) == bytes(2 * MIB)
    assert resident_pages(memory, 10 * MIB, 2 * MIB) == 512
    assert device.counters()["reported_pages"] == 1024


def test_a_report_with_readable_buffers_is_refused(
    balloon: tuple[Driver, Balloon], memory: GuestMemory
) -> None:
    driver, device = balloon
    driver.start()
    memory.fill(8 * MIB, 2 * MIB, PATTERN)
    head = driver.submit_at(REPORTING, [(8 * MIB, MIB, False), (9 * MIB, MIB, True)])
    assert driver.wait_used(REPORTING) == [(head, 0)]
    assert resident_pages(memory, 8 * MIB, 2 * MIB) == 512
    assert device.counters()["reported_pages"] == 0


def test_without_stats_the_reporting_queue_is_the_third(
    balloon: tuple[Driver, Balloon], memory: GuestMemory
) -> None:
    # Linux numbers only the queues it uses (virtio_mmio.c vm_find_vqs).
    driver, device = balloon
    driver.start(F_VERSION_1 | F_PAGE_REPORTING, queues=[0, 1, 2])
    memory.fill(8 * MIB, 2 * MIB, PATTERN)
    driver.submit_at(2, [(8 * MIB, 2 * MIB, True)])
    driver.wait_used(2)
    assert resident_pages(memory, 8 * MIB, 2 * MIB) == 0
    assert device.counters()["reported_pages"] == 512


def test_a_reset_forgets_the_held_stats_buffer(
    balloon: tuple[Driver, Balloon], loop: EventLoop
) -> None:
    driver, device = balloon
    device.set_stats_interval(0)
    driver.start()
    driver.submit(STATS, readable=[stats_buffer((4, 1))])
    settle(loop)
    driver.write(Reg.STATUS, 0)
    driver.start()
    driver.queues[STATS].free.remove(0)  # a head the old activation did not use
    head, _ = driver.submit(STATS, readable=[stats_buffer((4, 2))])
    device.set_stats_interval(0.01)
    # Only the buffer of this activation comes back; the old head is not pushed into the new
    # ring.
    assert driver.wait_used(STATS) == [(head, 0)]
    assert device.stats() == {"free_memory": 2}
