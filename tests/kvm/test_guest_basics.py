"""Serial output, PIO/MMIO dispatch, interrupts, vCPUs, reset and triple fault on /dev/kvm."""

from __future__ import annotations

import re
import threading

import pytest

from kasou.guestkit import DONE_LINE, TEST_MMIO_BASE, TEST_PIO_BASE
from kasou.vmm import ExitKind, ExtraDevice

from .conftest import BootFactory


def test_ring3_output_reaches_the_serial_console(boot: BootFactory) -> None:
    vm = boot("hello")
    text = vm.console.wait_for(DONE_LINE)
    assert "hello from ring 3" in text
    assert vm.wait().kind is ExitKind.REBOOT  # the guest kit ends with an i8042 reset


class RecordingDevice:
    """A register file: remembers every write, answers reads with a fixed pattern."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def read(self, offset: int, data: memoryview) -> None:
        with self.lock:
            self.reads.append((offset, len(data)))
        pattern = bytes((0xA0 + offset + index) & 0xFF for index in range(len(data)))
        data[:] = pattern

    def write(self, offset: int, data: memoryview) -> None:
        with self.lock:
            self.writes.append((offset, bytes(data)))


def _value(offset: int, size: int) -> int:
    return int.from_bytes(bytes((0xA0 + offset + index) & 0xFF for index in range(size)), "little")


def test_pio_and_mmio_accesses_reach_the_right_device_with_size_and_offset(
    boot: BootFactory,
) -> None:
    mmio, pio = RecordingDevice(), RecordingDevice()
    vm = boot(
        "dispatch",
        extra=[
            ExtraDevice(mmio, TEST_MMIO_BASE, 0x1000, "mmio"),
            ExtraDevice(pio, TEST_PIO_BASE, 8, "pio"),
        ],
    )
    text = vm.console.wait_for(DONE_LINE)
    assert mmio.writes == [
        (0x00, (0x11223344).to_bytes(4, "little")),
        (0x08, b"\xa5"),
        (0x10, (0xBEEF).to_bytes(2, "little")),
        (0x18, (0x0102030405060708).to_bytes(8, "little")),
    ]
    assert mmio.reads == [(0x04, 4), (0x0C, 1), (0x14, 2), (0x20, 8)]
    assert pio.writes == [
        (0, b"\x5a"),
        (2, (0xBEEF).to_bytes(2, "little")),
        (4, (0xCAFEF00D).to_bytes(4, "little")),
    ]
    printed = dict(re.findall(r"^(\w+)=(0x[0-9a-f]+)", text, re.MULTILINE))
    assert int(printed["mmio32"], 16) == _value(0x04, 4)
    assert int(printed["mmio8"], 16) == _value(0x0C, 1)
    assert int(printed["mmio16"], 16) == _value(0x14, 2)
    assert int(printed["mmio64"], 16) == _value(0x20, 8)
    assert int(printed["pio8"], 16) == _value(0, 1)
    assert int(printed["pio16"], 16) == _value(2, 2)
    assert int(printed["pio32"], 16) == _value(4, 4)


def test_unclaimed_reads_see_all_ones(boot: BootFactory) -> None:
    vm = boot("dispatch")  # no test devices: every access falls in a hole
    text = vm.console.wait_for(DONE_LINE)
    assert "mmio32=0xffffffff" in text
    assert "pio8=0xff" in text


def test_timer_and_uart_interrupts_are_delivered(boot: BootFactory) -> None:
    vm = boot("irq")
    text = vm.console.wait_for(DONE_LINE)
    ticks = int(re.search(r"ticks=(\d+)", text).group(1))  # type: ignore[union-attr]
    assert ticks >= 10
    assert "uart_irq=1" in text


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_every_vcpu_comes_up(boot: BootFactory, vcpus: int) -> None:
    vm = boot("smp", vcpus=vcpus)
    text = vm.console.wait_for(DONE_LINE)
    assert f"mp_cpus={vcpus}" in text
    assert f"cpus={vcpus}" in text
    assert sorted(int(n) for n in re.findall(r"cpu (\d+) up", text)) == list(range(1, vcpus))


def test_guest_reset_ends_the_vm_as_a_reboot(boot: BootFactory) -> None:
    vm = boot("reset")
    ending = vm.wait()
    assert ending.kind is ExitKind.REBOOT
    assert ending.kind.status == 0


def test_triple_fault_is_reported_with_the_vcpu_and_its_registers(boot: BootFactory) -> None:
    vm = boot("triple")
    ending = vm.wait()
    assert ending.kind is ExitKind.CRASH
    assert ending.reason == "triple fault"
    assert ending.vcpu == 0
    assert ending.report is not None and "rip=" in ending.report and "cr3=" in ending.report
    assert ending.kind.status != 0
