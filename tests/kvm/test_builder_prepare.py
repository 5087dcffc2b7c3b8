"""``kasou.vmm.builder.prepare`` and ``rehearse``: a VM built after its KVM VM, guest RAM and
kernel were got ready ahead (as the warm template's spare does) boots as any other, with the
RAM its config asks for even where the guess was wrong."""

from __future__ import annotations

from pathlib import Path

from kasou.guestkit import DONE_LINE
from kasou.vmm import ExitKind
from kasou.vmm.builder import prepare, rehearse

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
