"""ACPI in the default guest, as a user sees it: the kernel finds kasou's tables, CPUs and
IOAPIC through them, `kasou shutdown` presses the power button and the guest shuts down
cleanly, and `--no-acpi` still boots (from the MP table) with `kasou shutdown` refused."""

from __future__ import annotations

import re
import subprocess

from .conftest import KASOU, Launcher, RunningGuest

SHUTDOWN_TIMEOUT = 120  # seconds; the nested host runs under TCG


def kasou_shutdown(guest: RunningGuest) -> subprocess.CompletedProcess[str]:
    """``kasou shutdown`` as a user runs it."""
    return subprocess.run(
        [KASOU, "shutdown", "--sock", str(guest.sock), "--timeout", str(SHUTDOWN_TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=SHUTDOWN_TIMEOUT + 30,
        check=False,
    )


def test_the_kernel_finds_cpus_ioapic_and_pm_timer_through_kasous_tables(
    launch: Launcher,
) -> None:
    guest = launch(vcpus=2)
    assert guest.output("nproc") == "2"
    dmesg = guest.output("dmesg")
    # The table list the kernel prints at boot (drivers/acpi/tables.c): kasou's OEM id.
    for table in ("RSDP", "XSDT", "FACP", "APIC", "DSDT"):
        assert re.search(rf"ACPI: {table} 0x[0-9A-F]+ [0-9A-F]+ \(v\d\d KASOU", dmesg), table
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in dmesg
    assert re.search(r"IOAPIC\[0\]: apic_id \d+, version \d+, address 0xfec00000", dmesg)
    assert "ACPI: PM-Timer IO Port: 0x608" in dmesg
    # The kernel registers the PM timer as a clock only if it ran at 3.579545 MHz (within
    # 5 % of the PIT) and never went backwards (drivers/clocksource/acpi_pm.c).
    clocks = guest.output(
        "cat", "/sys/devices/system/clocksource/clocksource0/available_clocksource"
    )
    assert "acpi_pm" in clocks.split()
    # The SCI: ISA IRQ 9, level-triggered through the IOAPIC (the MADT's override).
    interrupts = guest.output("cat", "/proc/interrupts")
    assert re.search(r"^\s*9:.*IO-APIC\s+9-fasteoi\s+acpi$", interrupts, re.MULTILINE), interrupts


def test_kasou_shutdown_powers_the_guest_off_cleanly(launch: Launcher) -> None:
    guest = launch()
    guest.output("true")  # booted to user space
    done = kasou_shutdown(guest)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the guest powered off after ")
    assert guest.wait() == 0
    console = guest.console_text()
    # The default guest's shutdown script ran (busybox init got the kernel's signal).
    assert "The system is going down: stopping processes, unmounting file systems" in console
    assert "Powering off" in console


def test_the_kernels_own_acpi_power_off_ends_kasou_with_status_0(launch: Launcher) -> None:
    # busybox's poweroff -f skips init and asks the kernel, which powers off through the
    # FADT's PM1a control block with the DSDT's \_S5 sleep type.
    guest = launch()
    guest.output("true")
    guest.trigger("/bin/busybox", "poweroff", "-f")
    assert guest.wait() == 0
    assert "reboot: Power down" in guest.console_text()


def test_without_acpi_the_guest_boots_and_shutdown_points_at_stop(launch: Launcher) -> None:
    guest = launch("--no-acpi", vcpus=2)
    assert guest.output("nproc") == "2"  # CPUs from the MP table
    assert "ACPI: RSDP" not in guest.output("dmesg")
    refused = kasou_shutdown(guest)
    assert refused.returncode == 2
    assert "no ACPI (--no-acpi)" in refused.stderr
    assert "kasou stop" in refused.stderr
    assert guest.output("echo", "still here") == "still here"  # the press changed nothing
