"""Every guest-kit workload boots under QEMU and prints what kasou's tests will look for.

QEMU boots the kit's ELF as a Multiboot kernel (its 32-bit entry), so these tests prove the
guest's code from long mode on: the same code kasou reaches through the 64-bit boot
protocol. TCG runs everywhere QEMU is installed; the ``kvm`` ones run under ``-enable-kvm``
(on this project's hosts that is PVM, where ring 0 is emulated and ring 3 native).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from kasou.guestkit import COUNTER_GPA, DONE_LINE, FAIL_PREFIX, GuestKitError, build_guest
from qemu_peer import QEMU, QemuGuest, kvm_usable, run_guest

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")

T = TypeVar("T")

needs_kvm = pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is missing or not accessible")


@pytest.fixture(scope="module")
def elf() -> Iterator[Path]:
    try:
        yield build_guest()
    except GuestKitError as exc:
        if shutil.which("gcc") is None:
            pytest.skip(str(exc))
        raise


def test_hello_prints_from_ring_3_and_resets(elf: Path) -> None:
    run = run_guest(elf, "kasou.test=hello")
    assert run.texts == [
        "kasou-guest: boot=multiboot test=hello",
        "hello from ring 3",
        DONE_LINE,
    ]
    assert run.returncode == 0


def test_dispatch_prints_each_access_as_key_hex(elf: Path) -> None:
    run = run_guest(elf, "kasou.test=dispatch")
    # Nothing answers at the test device's addresses under QEMU: unassigned MMIO reads
    # as zero, unassigned ports as all ones.
    assert run.value("mmio32") == "0x00000000"
    assert run.value("mmio8") == "0x00"
    assert run.value("mmio16") == "0x0000"
    assert run.value("mmio64") == "0x0000000000000000"
    assert run.value("pio8") == "0xff"
    assert run.value("pio16") == "0xffff"
    assert run.value("pio32") == "0xffffffff"
    assert run.texts[-1] == DONE_LINE


@pytest.mark.parametrize(
    "cmdline",
    [
        "kasou.test=pio count=1000",
        "kasou.test=pio count=10 port=0x80",
        "kasou.test=mmio count=1000",
        "kasou.test=mmio count=1000 ring=3 addr=0xd0000100",
    ],
)
def test_exit_loops_report_their_count(elf: Path, cmdline: str) -> None:
    run = run_guest(elf, cmdline)
    count = re.search(r"count=(\d+)", cmdline)
    assert count is not None
    assert run.texts[-2:] == [f"count={count.group(1)}", DONE_LINE]


def test_irq_takes_timer_ticks_in_ring_3_and_a_uart_interrupt(elf: Path) -> None:
    run = run_guest(elf, "kasou.test=irq")
    assert run.value("uart_irq_pin") == "4"
    assert int(run.value("ticks")) >= 10
    assert int(run.value("ticks_ring3")) >= 1
    assert run.value("uart_irq") == "1"
    assert run.texts[-1] == DONE_LINE


def test_smp_starts_every_processor_in_the_mp_table(elf: Path) -> None:
    run = run_guest(elf, "kasou.test=smp", cpus=4)
    assert run.value("mp_cpus") == "4"
    assert sorted(t for t in run.texts if t.startswith("cpu ")) == [
        "cpu 1 up",
        "cpu 2 up",
        "cpu 3 up",
    ]
    assert run.texts[-2:] == ["cpus=4", DONE_LINE]


def test_echo_writes_back_what_com1_receives(elf: Path) -> None:
    with QemuGuest(elf, "kasou.test=echo n=6") as guest:
        guest.wait_for("echo: ready n=6")
        guest.send(b"kasou\n")
        run = guest.wait_exit()
    assert run.texts[-2:] == ["kasou", DONE_LINE]


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0) -> T:
    """Reads until ``done`` holds or ``timeout`` passes; returns the last value read.

    The monitor can answer before the vCPU has moved on, so a single read can race it.
    """
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        value = read()
    return value


def test_counter_keeps_counting_at_its_fixed_address(elf: Path) -> None:
    with QemuGuest(elf, "kasou.test=counter", qmp=True) as guest:
        guest.wait_for(f"counter_addr={COUNTER_GPA:#x}")
        first = guest.read_u64(COUNTER_GPA)
        later = poll(lambda: guest.read_u64(COUNTER_GPA), lambda value: value != first)
        assert guest.process.poll() is None
    assert later > first


def test_wait_halts_with_interrupts_off(elf: Path) -> None:
    with QemuGuest(elf, "kasou.test=wait", qmp=True) as guest:
        guest.wait_for("ready")
        registers = poll(lambda: guest.monitor("info registers"), lambda text: "HLT=1" in text)
        assert guest.process.poll() is None
    assert "HLT=1" in registers
    rflags = re.search(r"RFL=([0-9a-f]+)", registers)
    assert rflags is not None
    assert not int(rflags.group(1), 16) & 0x200  # IF


@pytest.mark.parametrize(
    ("test", "last"), [("triple", "triple fault next"), ("reset", "resetting")]
)
def test_guest_ends_the_machine(elf: Path, test: str, last: str) -> None:
    run = run_guest(elf, f"kasou.test={test}")
    assert run.texts[-1] == last
    assert run.returncode == 0  # -no-reboot: QEMU exits on the reset


@pytest.mark.parametrize(
    ("cmdline", "reason"),
    [
        ("quiet", "no kasou.test=NAME"),
        ("kasou.test=nosuch", "unknown test nosuch"),
        ("kasou.test=pio count=12x", "bad value count=12x"),
        ("kasou.test=mmio addr=0x3", "addr=0x3"),
    ],
)
def test_bad_command_lines_fail_with_a_reason(elf: Path, cmdline: str, reason: str) -> None:
    run = run_guest(elf, cmdline)
    assert run.texts[-1].startswith(FAIL_PREFIX)
    assert reason in run.texts[-1]
    assert run.returncode == 0


@pytest.mark.parametrize(
    "cmdline",
    [
        "kasou.test=hello",
        "kasou.test=pio count=10000",
        "kasou.test=mmio count=10000",
        "kasou.test=mmio count=1000 ring=3",
        "kasou.test=irq",
    ],
)
@pytest.mark.kvm
@needs_kvm
def test_workloads_under_kvm(elf: Path, cmdline: str) -> None:
    run = run_guest(elf, cmdline, kvm=True)
    assert run.texts[0].startswith("kasou-guest: boot=multiboot")
    assert run.texts[-1] == DONE_LINE


@pytest.mark.kvm
@needs_kvm
def test_smp_under_kvm(elf: Path) -> None:
    run = run_guest(elf, "kasou.test=smp", kvm=True, cpus=2)
    assert run.texts[-3:] == ["cpu 1 up", "cpus=2", DONE_LINE]
