"""A power-off register that lets the guest turn the machine off without ACPI.

kasou's guests have no ACPI yet, and without it Linux's ``poweroff`` only halts the CPUs.
The default guest's init therefore writes this register as its last step. It is shaped like
the ACPI PM1a control register (ACPI 6.5 §4.8.3.2.1, PM1 Control Registers): a 16-bit write
with SLP_EN (bit 13) set and SLP_TYP 0 means "enter S5", i.e. power off, so a future ACPI
table can describe the very same register. It sits at port 0x604, where QEMU's PC machines
keep PM1a_CNT, so guests written for those find it too.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["POWER_PORT", "SLP_EN", "PowerOff"]

POWER_PORT = 0x604
SLP_EN = 1 << 13
_SLP_TYP_MASK = 0b111 << 10


class PowerOff:
    """PM1a_CNT-like register: writing SLP_EN with SLP_TYP 0 calls ``on_poweroff``."""

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))  # SLP_EN reads back as 0 (ACPI: write-only bit)

    def write(self, offset: int, data: memoryview) -> None:
        if offset != 0 or len(data) != 2:
            return
        value = int.from_bytes(data, "little")
        if value & SLP_EN and value & _SLP_TYP_MASK == 0:
            self._on_poweroff()
