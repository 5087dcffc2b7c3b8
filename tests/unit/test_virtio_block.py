"""virtio-blk against a real raw disk file, driven by the Python virtio driver: what a guest
reads and writes is what the host file holds, and every malformed request fails alone."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import Driver

from kasou.devices.virtio.block import (
    F_DISCARD,
    F_FLUSH,
    F_RO,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    Block,
)
from kasou.devices.virtio.spec import Status
from kasou.disk import open_disk
from kasou.event import EventLoop
from kasou.memory import GuestMemory
from kasou.vmm.config import DiskConfig

DISK_SIZE = 4 << 20


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


class Attached:
    def __init__(self, loop: EventLoop, memory: GuestMemory, config: DiskConfig, heap: int):
        self.device = Block(loop, open_disk(config.path, read_only=config.read_only), config)
        self.driver = Driver.attach(self.device, memory, heap=heap)
        self.memory = memory

    def request(
        self, readable: list[bytes], data_in: int = 0, *, indirect: bool = False
    ) -> tuple[int, bytes, int]:
        """Submit and wait: returns (status, data read, used length)."""
        head, parts = self.driver.submit(
            0, readable, [data_in, 1] if data_in else [1], indirect=indirect
        )
        ((done, length),) = self.driver.wait_used(0)
        assert done == head
        status_address = parts[-1][0]
        data = self.memory.read(parts[-2][0], data_in) if data_in else b""
        return self.memory.read(status_address, 1)[0], data, length

    def close(self) -> None:
        self.driver.close()


@pytest.fixture
def disk(loop: EventLoop, memory: GuestMemory, image: Path) -> Iterator[Attached]:
    attached = Attached(loop, memory, DiskConfig(image, serial="kasou-test"), 0x100000)
    attached.driver.start()
    yield attached
    attached.close()


def test_config_space_tells_capacity_and_features(disk: Attached) -> None:
    assert struct.unpack("<Q", disk.driver.config(0, 8))[0] == DISK_SIZE // 512
    assert struct.unpack("<I", disk.driver.config(20, 4))[0] == 512
    assert disk.driver.features & F_FLUSH and disk.driver.features & F_DISCARD


@pytest.mark.parametrize("indirect", [False, True])
def test_reads_return_what_the_file_holds(disk: Attached, image: Path, indirect: bool) -> None:
    status, data, length = disk.request([header(T_IN, 8)], 8192, indirect=indirect)
    assert status == S_OK and length == 8193
    assert data == image.read_bytes()[4096 : 4096 + 8192]


def test_writes_land_in_the_file_and_flush_succeeds(disk: Attached, image: Path) -> None:
    payload = os.urandom(4096)
    status, _, length = disk.request([header(T_OUT, 16), payload])
    assert (status, length) == (S_OK, 1)
    assert disk.request([header(T_FLUSH)])[0] == S_OK
    assert image.read_bytes()[16 * 512 : 16 * 512 + 4096] == payload
    counters = disk.device.counters()
    assert counters["writes"] == 1 and counters["flushes"] == 1 and counters["write_bytes"] == 4096


def test_header_and_data_split_across_descriptors(disk: Attached, image: Path) -> None:
    whole = header(T_OUT, 2) + b"\x5a" * 1024
    status, _, _ = disk.request([whole[:5], whole[5:600], whole[600:]])
    assert status == S_OK
    assert image.read_bytes()[1024:2048] == b"\x5a" * 1024


def test_get_id_returns_the_serial(disk: Attached) -> None:
    status, data, _ = disk.request([header(T_GET_ID)], 20)
    assert status == S_OK and data == b"kasou-test" + bytes(10)


def test_discard_and_write_zeroes_read_back_as_zeroes(disk: Attached, image: Path) -> None:
    segment = struct.pack("<QII", 64, 16, 0)
    assert disk.request([header(T_WRITE_ZEROES) + segment])[0] == S_OK
    assert image.read_bytes()[64 * 512 : 80 * 512] == bytes(16 * 512)
    unmap = struct.pack("<QII", 128, 8, 1)
    assert disk.request([header(T_WRITE_ZEROES) + unmap])[0] == S_OK
    assert disk.request([header(T_DISCARD) + struct.pack("<QII", 256, 8, 0)])[0] == S_OK
    assert image.stat().st_size == DISK_SIZE


@pytest.mark.parametrize(
    ("readable", "data_in", "status"),
    [
        ([header(T_IN, DISK_SIZE // 512)], 512, S_IOERR),  # past the end
        ([header(T_OUT, DISK_SIZE // 512 - 1), b"x" * 1024], 0, S_IOERR),  # runs past the end
        ([b"short"], 0, S_IOERR),  # header of 5 bytes
        ([header(99)], 0, S_UNSUPP),
        ([header(T_DISCARD) + b"odd"], 0, S_IOERR),
        ([header(T_WRITE_ZEROES) + struct.pack("<QII", 0, 1, 2)], 0, S_UNSUPP),  # bad flags
    ],
)
def test_bad_requests_fail_alone(
    disk: Attached, readable: list[bytes], data_in: int, status: int
) -> None:
    assert disk.request(readable, data_in)[0] == status
    assert disk.request([header(T_IN, 0)], 512)[0] == S_OK  # the device goes on
    assert not disk.driver.status & Status.NEEDS_RESET


def test_a_request_without_a_status_byte_is_returned_unused(disk: Attached) -> None:
    head, _ = disk.driver.submit(0, [header(T_FLUSH)], [])
    assert disk.driver.wait_used(0) == [(head, 0)]
    assert disk.request([header(T_IN, 0)], 512)[0] == S_OK


def test_a_read_only_disk_refuses_writes(loop: EventLoop, memory: GuestMemory, image: Path) -> None:
    before = image.read_bytes()
    attached = Attached(loop, memory, DiskConfig(image, read_only=True), 0x100000)
    try:
        attached.driver.start()
        assert attached.driver.features & F_RO
        assert attached.request([header(T_OUT, 0), b"w" * 512])[0] == S_IOERR
        assert attached.request([header(T_IN, 0)], 512)[1] == before[:512]
    finally:
        attached.close()
    assert image.read_bytes() == before


def test_a_full_host_disk_is_an_io_error_to_the_guest(
    loop: EventLoop, memory: GuestMemory, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        image = mount / "sparse.raw"
        with open(image, "wb") as file:
            file.truncate(DISK_SIZE)  # 4 MiB of holes on 256 KiB of space
        attached = Attached(loop, memory, DiskConfig(image), 0x100000)
        try:
            attached.driver.start()
            statuses = [
                attached.request([header(T_OUT, 128 * i), os.urandom(65536)])[0] for i in range(8)
            ]
            assert statuses[0] == S_OK and S_IOERR in statuses
            assert attached.request([header(T_IN, 0)], 4096)[0] == S_OK
            assert attached.device.counters()["errors"] >= 1
        finally:
            attached.close()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- malformed chains: a guest writing anything into its descriptor table ----------------

descriptors = st.tuples(
    st.one_of(st.integers(0, (32 << 20) - 1), st.integers(0, 2**64 - 1)),  # addr
    st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)),  # len
    st.integers(0, 7),  # flags: NEXT, WRITE, INDIRECT in any mix
    st.integers(0, 2**16 - 1),  # next
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(table=st.lists(descriptors, min_size=1, max_size=8), head=st.integers(0, 300))
def test_malformed_chains_never_break_the_device_or_its_neighbour(
    loop: EventLoop, memory: GuestMemory, image: Path, tmp_path: Path, table: list, head: int
) -> None:
    second_image = tmp_path / "second.raw"
    second_image.write_bytes(b"\x42" * 65536)
    bad = Attached(loop, memory, DiskConfig(image), 0x100000)
    good = Attached(loop, memory, DiskConfig(second_image), 0x800000)
    try:
        bad.driver.start()
        good.driver.start()
        queue = bad.driver.queues[0]
        for index, (address, length, flags, following) in enumerate(table):
            bad.driver.write_desc(queue, index, address, length, flags, following)
        bad.driver.publish(0, head)
        # Either the chain comes back (used) or the device asks for a reset: never silence.
        if head < queue.size:
            try:
                bad.driver.wait_used(0, timeout=5)
            except AssertionError:
                assert bad.driver.status & Status.NEEDS_RESET
        else:
            bad.driver.wait_status(Status.NEEDS_RESET, timeout=5)
        assert good.request([header(T_IN, 0)], 512) == (S_OK, b"\x42" * 512, 513)
    finally:
        bad.close()
        good.close()
