"""ACPI on /dev/kvm: the tables in guest memory and boot_params, and the power button's SCI
reaching KVM's in-kernel IOAPIC as a level on GSI 9. The guest kit halts ("wait"); the
PM registers are driven through the PIO bus, the path a guest's in/out takes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kasou.arch.x86_64 import layout
from kasou.errors import GuestError
from kasou.kvm import bindings as b
from kasou.vmm import ExitKind, Vm

from .conftest import BootFactory

PM1_STS, PM1_EN, PM1_CNT = 0x600, 0x602, 0x604
PWRBTN = 1 << 8
SLP_EN = 1 << 13
ACPI_RSDP_ADDR = 0x070  # in boot_params (zero-page.rst)


def pio_write(vm: Vm, port: int, value: int, size: int = 2) -> None:
    assert vm.pio.write(port, memoryview(bytearray(value.to_bytes(size, "little"))))


def ioapic_irr(vm: Vm) -> int:
    """The IOAPIC's interrupt request register: the pins whose line is high (struct
    kvm_irqchip, linux/kvm.h: chip_id u32, pad u32, then struct kvm_ioapic_state, asm/kvm.h:
    base_address u64, ioregsel u32, id u32, irr u32)."""
    chip = vm.vm_fd.get_irqchip(b.KVM_IRQCHIP_IOAPIC)
    (irr,) = struct.unpack_from("<I", bytes(chip), 8 + 16)
    return int(irr)


def test_the_tables_and_their_address_are_where_a_kernel_looks(boot: BootFactory) -> None:
    booted = boot("wait", vcpus=2)
    booted.console.wait_for("ready")
    memory = booted.vm.memory
    assert memory.read(layout.ACPI_START, 8) == b"RSD PTR "
    assert memory.read_int(layout.ZERO_PAGE + ACPI_RSDP_ADDR, 8) == layout.ACPI_START


def test_without_acpi_there_are_no_tables(boot: BootFactory) -> None:
    booted = boot("wait", settings={"acpi": False})
    booted.console.wait_for("ready")
    memory = booted.vm.memory
    assert memory.read(layout.ACPI_START, 8) != b"RSD PTR "
    assert memory.read_int(layout.ZERO_PAGE + ACPI_RSDP_ADDR, 8) == 0
    with pytest.raises(GuestError, match=r"no ACPI \(--no-acpi\).*kasou stop"):
        booted.vm.shutdown()


def test_the_power_button_holds_gsi_9_high_until_the_guest_clears_it(
    boot: BootFactory,
) -> None:
    booted = boot("wait")
    booted.console.wait_for("ready")
    vm = booted.vm
    sci = 1 << layout.IRQ_SCI
    with pytest.raises(GuestError, match=r"has not enabled the ACPI power button.*kasou stop"):
        vm.shutdown()  # the guest has not enabled the event
    assert ioapic_irr(vm) & sci == 0

    pio_write(vm, PM1_EN, PWRBTN)  # what an ACPI OS does when it installs its handler
    assert vm.shutdown() == {"state": "running", "power_button": "pressed"}
    assert ioapic_irr(vm) & sci
    pio_write(vm, PM1_STS, PWRBTN)  # the OS acknowledges: write 1 to clear
    assert ioapic_irr(vm) & sci == 0

    pio_write(vm, PM1_CNT, SLP_EN)  # S5 (SLP_TYP 0): the OS powers off
    assert booted.wait().kind is ExitKind.POWEROFF


def _command_line(vm: Vm) -> str:
    raw = vm.memory.read(layout.CMDLINE, 4096)
    return raw.split(b"\0", 1)[0].decode()


def test_virtio_devices_are_announced_on_the_command_line_only_where_asked(
    boot: BootFactory, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    from kasou.vmm.config import DiskConfig

    disks = (DiskConfig(disk),)
    # a kernel kasou knows nothing about: the words, and the DSDT
    booted = boot("wait", settings={"disks": disks})
    assert "virtio_mmio.device=4K@0xd0000000:5" in _command_line(booted.vm)
    booted.vm.stop()
    # a kernel known to use ACPI (the default guest's, an image's): the DSDT alone, so no
    # device is probed twice
    booted = boot("wait", settings={"disks": disks, "virtio_cmdline": False})
    assert "virtio_mmio.device" not in _command_line(booted.vm)
    booted.vm.stop()
    # without ACPI the command line is the only way: the words whatever was asked
    booted = boot("wait", settings={"disks": disks, "virtio_cmdline": False, "acpi": False})
    assert "virtio_mmio.device=4K@0xd0000000:5" in _command_line(booted.vm)
