"""``kasou.vmm.builder.prepare`` and ``rehearse``: a VM built after its KVM VM, guest RAM and
kernel were got ready ahead (as the warm template's spare does) boots as any other, with the
RAM its config asks for even where the guess was wrong, and the ACPI tables made once serve
every VM alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kasou.arch.x86_64 import acpi, layout
from kasou.devices.legacy.power import GPE0_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT
from kasou.guestkit import DONE_LINE
from kasou.vmm import ExitKind
from kasou.vmm.builder import COM1, prepare, rehearse

from .conftest import BootFactory

MiB = 1 << 20


def test_a_vm_built_on_a_prepared_one_boots(boot: BootFactory, guest_elf: Path) -> None:
    rehearse()
    prepare(memory=64 * MiB, kernel=str(guest_elf))
    vm = boot("hello", memory=64 * MiB)
    assert vm.vm.memory.size == 64 * MiB
    assert "hello from ring 3" in vm.console.wait_for(DONE_LINE)
    assert vm.wait().kind is ExitKind.REBOOT


def test_a_wrong_guess_of_the_guest_ram_is_not_what_the_vm_gets(
    boot: BootFactory, guest_elf: Path
) -> None:
    prepare(memory=32 * MiB, kernel=str(guest_elf))
    vm = boot("hello", memory=48 * MiB)
    assert vm.vm.memory.size == 48 * MiB
    assert "hello from ring 3" in vm.console.wait_for(DONE_LINE)
    assert vm.wait().kind is ExitKind.REBOOT


@pytest.mark.parametrize("vcpus", [2, 1, 3])
def test_a_vm_built_on_vcpus_made_ahead_boots_with_its_own_number(
    boot: BootFactory, guest_elf: Path, vcpus: int
) -> None:
    # Two made ahead: the guess is right, or the VM gets a KVM VM of its own.
    prepare(memory=64 * MiB, kernel=str(guest_elf), vcpus=2)
    vm = boot("smp", vcpus=vcpus)
    assert [vcpu.index for vcpu in vm.vm.vcpus] == list(range(vcpus))
    text = vm.console.wait_for(DONE_LINE)
    assert f"mp_cpus={vcpus}" in text
    assert sorted(int(n) for n in re.findall(r"cpu (\d+) up", text)) == list(range(1, vcpus))
    assert vm.wait().kind is ExitKind.REBOOT


def test_vms_alike_get_the_acpi_tables_of_their_machine(boot: BootFactory) -> None:
    # The tables of a machine are made once a process (the template makes the usual ones
    # in ``rehearse``): the second VM's come from there, and must still describe it.
    rehearse()
    expected = acpi.build_acpi_tables(
        acpi.AcpiConfig(
            vcpus=2,
            serial=[COM1],
            virtio=[],
            pm1a_event=PM1A_EVT_PORT,
            pm1a_control=PM1A_CNT_PORT,
            pm_timer=PM_TMR_PORT,
            gpe0_block=GPE0_PORT,
        )
    )
    seen: list[bytes] = []
    for _ in range(2):
        boot(
            "hello",
            vcpus=2,
            before_start=lambda vm: seen.append(vm.memory.read(layout.ACPI_START, len(expected))),
        )
    assert seen == [expected, expected]
