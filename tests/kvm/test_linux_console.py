"""A Linux kernel boots under kasou far enough to print on the serial console.

On PVM (this project's CI machines) that is as far as Linux goes; the e2e tier boots it to
user space on a real KVM. Both of the default guest's kernel images are tried: the vmlinux,
and the bzImage (on PVM kasou boots the vmlinux inside it: its decompressor cannot run).
"""

from __future__ import annotations

import pytest

from kasou.vmm import VmConfig, build_vm
from kasou.vmm.config import ConsoleConfig

from .conftest import ConsoleCapture


@pytest.fixture(scope="module")
def default_guest():  # type: ignore[no-untyped-def]
    from kasou.image import ImageBuildError, default_guest

    try:
        return default_guest(build=False)
    except ImageBuildError as error:
        pytest.skip(f"{error} (make test builds it before this tier)")


@pytest.mark.parametrize(
    ("image", "acpi"), [("kernel", True), ("bzimage", True), ("kernel", False)]
)
def test_linux_prints_its_boot_log_on_com1(default_guest, image: str, acpi: bool) -> None:  # type: ignore[no-untyped-def]
    console = ConsoleCapture()
    config = VmConfig(
        kernel=getattr(default_guest, image),
        initrd=default_guest.initrd,
        cmdline="console=ttyS0 reboot=k panic=-1 nopv",
        memory=256 << 20,
        console=ConsoleConfig("none"),
        acpi=acpi,
    )
    vm = build_vm(config, console_output=console.write)
    try:
        vm.start()
        text = console.wait_for("Command line: console=ttyS0", timeout=120)
        assert "Linux version 6.1" in text
        console.wait_for("BIOS-provided physical RAM map", timeout=120)
        if acpi:  # the kernel prefers ACPI's MADT to the MP table when both are there
            text = console.wait_for("ACPI: Using ACPI (MADT) for SMP configuration", timeout=120)
            assert "ACPI: RSDP 0x00000000000E0000 000024 (v02 KASOU )" in text
        else:
            assert "MPTABLE: OEM ID: KASOU" in console.wait_for("Processors: 1", timeout=120)
    finally:
        vm.close()


def test_a_large_guest_gets_ram_above_4g_around_the_mmio_hole(default_guest) -> None:  # type: ignore[no-untyped-def]
    console = ConsoleCapture()
    config = VmConfig(
        kernel=default_guest.kernel,
        # earlyprintk: on PVM, setting up 5 GiB of page structures takes minutes of emulated
        # ring 0 before the console proper registers; the early console prints the map first.
        cmdline="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 nopv",
        memory=5 << 30,
        console=ConsoleConfig("none"),
    )
    vm = build_vm(config, console_output=console.write)
    try:
        vm.start()
        # 3 GiB below the hole at 0xc0000000, the other 2 GiB from 4 GiB up.
        text = console.wait_for("BIOS-e820: [mem 0x0000000100000000-0x000000017fffffff] usable")
        assert "BIOS-e820: [mem 0x0000000000100000-0x00000000bfffffff] usable" in text
    finally:
        vm.close()
