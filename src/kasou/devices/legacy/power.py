"""The ACPI power-management registers: power button, power-off, PM timer, GPE 0.

Scope: the PM1a event and control blocks and the PM timer of ACPI 6.5 §4.8.3 (Fixed Hardware
Registers), just enough for a guest to power the machine off, to be told that the power
button was pressed, and to read a clock; and a GPE0 block (§4.8.4.1, General-Purpose Event
Register Blocks) whose one wired event, GPE 0, tells the guest that the VM generation ID
changed. They sit where QEMU's PC machines keep the PM1 and timer registers, so the FADT
(``arch/x86_64/acpi.py``) describes these very ports, and guests without ACPI (kasou's
default guest with ``acpi=off``, its agent's ``poweroff``) find the power-off register at
0x604 all the same. The device is inserted once on the PIO bus at ``PM_BASE`` (0x600), length
``PM_SIZE`` (14)::

    0x600  PM1_STS  16 bit  status: PWRBTN_STS (bit 8), WAK_STS (bit 15); write 1 to clear
    0x602  PM1_EN   16 bit  enables: TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN, PCIEXP_WAKE_DIS
    0x604  PM1_CNT  16 bit  control: SCI_EN (bit 0) reads 1, SLP_TYP (bits 10-12), SLP_EN (13)
    0x606           2 bytes, no register: reads 0, writes are dropped
    0x608  PM_TMR   32 bit  3.579545 MHz counter, read-only
    0x60c  GPE0_STS  8 bit  status of GPEs 0-7: GPE 0 (bit 0), the VM generation ID; write 1
                            to clear
    0x60d  GPE0_EN   8 bit  enables of GPEs 0-7

Behaviour, register by register (ACPI 6.5 §4.8.3.1, PM1 Event Grouping; §4.8.3.2, PM1 Control
Grouping; §4.8.3.3, Power Management Timer):

- PM1_STS: ``press_power_button`` sets PWRBTN_STS; the guest clears a status bit by writing 1
  to it. WAK_STS is kept for the guest to clear but nothing sets it: the machine has no
  sleeping state to wake from (S5 is off). Every other bit reads 0.
- PM1_EN: the enable bits ACPI defines (TMR_EN 0, GBL_EN 5, PWRBTN_EN 8, SLPBTN_EN 9, RTC_EN
  10, PCIEXP_WAKE_DIS 14) are stored and read back; the reserved ones read 0. Only the power
  button ever sets its status, but ACPICA reads every enable bit back after setting it and
  logs an error for one that does not stick (``acpi_enable_event``), as it does at boot for
  the global lock and, through rtc-cmos, for the RTC alarm.
- PM1_CNT: SCI_EN always reads 1 (there is no SMI_CMD: the machine is in ACPI mode from
  reset); BM_RLD and SLP_TYP are stored and read back; GBL_RLS and SLP_EN are write-only and
  read 0. A write with SLP_EN set and SLP_TYP 0 enters S5: ``on_poweroff`` is called. SLP_EN
  with any other SLP_TYP asks for a sleeping state the DSDT does not offer and is ignored.
- PM_TMR: a free-running 32-bit count of 3.579545 MHz ticks (the FADT's TMR_VAL_EXT),
  computed from the injected ``clock`` (nanoseconds, ``time.monotonic_ns``) on each read.
  Writes are ignored. The timer carry status and its interrupt are not modelled.
- GPE0_STS: ``notify_generation_change`` sets bit 0; the guest clears it by writing 1. The
  other seven GPEs have no source and read 0. The DSDT's ``\\_GPE._E00`` makes GPE 0
  edge-triggered: ACPICA, on the SCI, masks GPE 0, clears its status, runs _E00 (which
  notifies the VM generation ID device) and unmasks it again (``acpi_ev_gpe_dispatch``).
- GPE0_EN: all eight enable bits are stored and read back, as on an eight-input block of
  which only input 0 is wired (ACPICA writes the whole register, read-modify-write). Linux
  enables GPE 0 when it loads the DSDT, because _E00 exists
  (``acpi_ev_initialize_gpe_block``).

The SCI (ISA IRQ 9, level-triggered, active high) is a level line: the device holds it high
exactly while some bit is set in both PM1_STS and PM1_EN, or in both GPE0_STS and GPE0_EN,
and drives it through the ``SciLine`` it is given. Reading or writing at any offset and width
inside the block is safe: each byte goes to the register it belongs to, so a guest may read
PM1_STS and PM1_EN in one 32-bit access, write a single byte of PM1_CNT, or write GPE0_STS
and GPE0_EN in one 16-bit access.

Threads: ``read``/``write`` come from vCPU threads (serialised by the bus's per-device lock)
and ``press_power_button``/``notify_generation_change`` from the control socket's or the
restore path's thread; one lock covers the registers.
``SciLine.set_level`` is called with that lock held, so the line's last level is always the
one the registers ask for (two threads could otherwise set it in the wrong order and leave it
high with no status bit set: an interrupt storm). ``on_poweroff`` is called after the lock is
released, on the vCPU thread, in the middle of the I/O exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kasou.devices import DeviceStateError

__all__ = [
    "GPE0_PORT",
    "GPE_VMGENID",
    "PM1A_CNT_PORT",
    "PM1A_EVT_PORT",
    "PM_BASE",
    "PM_SIZE",
    "PM_TIMER_HZ",
    "PM_TMR_PORT",
    "POWER_PORT",
    "PWRBTN",
    "SCI_EN",
    "SLP_EN",
    "AcpiPm",
    "AcpiPmState",
    "SciLine",
]

PM_BASE = 0x600
PM_SIZE = 14
PM1A_EVT_PORT = PM_BASE  # PM1_STS, then PM1_EN at +2 (FADT PM1_EVT_LEN 4)
PM1A_CNT_PORT = PM_BASE + 4  # PM1_CNT (FADT PM1_CNT_LEN 2)
PM_TMR_PORT = PM_BASE + 8  # PM_TMR (FADT PM_TMR_LEN 4)
GPE0_PORT = PM_BASE + 12  # GPE0_STS, then GPE0_EN at +1 (FADT GPE0_BLK_LEN 2)
POWER_PORT = PM1A_CNT_PORT
"""The power-off register (PM1a_CNT), where guests without ACPI write SLP_EN."""
PM_TIMER_HZ = 3_579_545  # ACPI 6.5 §4.8.3.3: the PM timer runs at 3.579545 MHz

# Offsets from PM_BASE and the width of each register, in bytes.
_STS = 0
_EN = 2
_CNT = 4
_TMR = 8
_GPE0_STS = 12
_GPE0_EN = 13
_REGISTER_SIZE = 2
_GPE_REGISTER_SIZE = 1  # §4.8.4.1: GPE0_BLK_LEN / 2 bytes each

# PM1_STS and PM1_EN (ACPI 6.5 Tables 4.16 and 4.17): a status bit and its enable share a
# bit number; the power button's is 8.
PWRBTN = 1 << 8
_WAK_STS = 1 << 15
_STATUS_BITS = PWRBTN | _WAK_STS
_TMR_EN = 1 << 0
_GBL_EN = 1 << 5
_SLPBTN_EN = 1 << 9
_RTC_EN = 1 << 10
_PCIEXP_WAKE_DIS = 1 << 14
_ENABLE_BITS = _TMR_EN | _GBL_EN | PWRBTN | _SLPBTN_EN | _RTC_EN | _PCIEXP_WAKE_DIS

# PM1_CNT (ACPI 6.5 Table 4.18).
SCI_EN = 1 << 0
_BM_RLD = 1 << 1
SLP_EN = 1 << 13
_SLP_TYP_SHIFT = 10
_SLP_TYP_MASK = 0b111 << _SLP_TYP_SHIFT
_CONTROL_STORED = _BM_RLD | _SLP_TYP_MASK
_SLP_TYP_S5 = 0  # the \_S5 package of kasou's DSDT (arch/x86_64/acpi.py)

# GPE0_STS and GPE0_EN: bit n is GPE n. GPE 0 is the VM generation ID's (the DSDT's _E00).
GPE_VMGENID = 1 << 0
_GPE_STATUS_BITS = GPE_VMGENID
_GPE_ENABLE_BITS = 0xFF

_TIMER_MASK = 0xFFFF_FFFF
_NS_PER_SECOND = 1_000_000_000


class SciLine(Protocol):
    """The SCI as the device drives it: a level-triggered interrupt line."""

    def set_level(self, high: bool) -> None:
        """Hold the line high or low until the next call (for KVM: KVM_IRQ_LINE)."""


@dataclass(frozen=True)
class AcpiPmState:
    """An ``AcpiPm``'s registers. Field names are a snapshot format contract.

    ``status`` is PM1_STS, ``enable`` PM1_EN, ``control`` the stored bits of PM1_CNT (BM_RLD
    and SLP_TYP; SCI_EN is always on and SLP_EN never stored), ``gpe0_status`` GPE0_STS and
    ``gpe0_enable`` GPE0_EN. The PM timer is the host's clock and is not saved. The GPE
    fields came later: their defaults let states saved before them decode as a machine
    whose GPEs are all clear and disabled, which is what it was.
    """

    status: int
    enable: int
    control: int
    gpe0_status: int = 0
    gpe0_enable: int = 0


class AcpiPm:
    """The PM1a event and control blocks and the PM timer, at ``PM_BASE``."""

    def __init__(
        self,
        sci: SciLine,
        on_poweroff: Callable[[], None],
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._sci = sci
        self._on_poweroff = on_poweroff
        self._clock = clock
        self._lock = threading.Lock()
        self._status = 0
        self._enable = 0
        self._control = 0
        self._gpe_status = 0
        self._gpe_enable = 0
        self._sci_high = False

    @property
    def sci_high(self) -> bool:
        """Whether the device holds the SCI high now."""
        return self._sci_high

    @property
    def power_button_enabled(self) -> bool:
        """Whether the guest listens for the power button (PM1_EN.PWRBTN_EN)."""
        return bool(self._enable & PWRBTN)

    def press_power_button(self) -> bool:
        """Press the fixed-feature power button: set PWRBTN_STS and raise the SCI.

        Returns False, and changes nothing, while the guest has not enabled the event
        (PWRBTN_EN clear: no ACPI in the guest, or it is still booting). A real button would
        still latch PWRBTN_STS; dropping the press instead keeps a refused request from
        powering the guest off later, when it enables the event.
        """
        with self._lock:
            if not self._enable & PWRBTN:
                return False
            self._status |= PWRBTN
            self._update_sci()
        return True

    @property
    def generation_change_enabled(self) -> bool:
        """Whether the guest listens for GPE 0 (GPE0_EN bit 0), the VM generation ID's."""
        return bool(self._gpe_enable & GPE_VMGENID)

    def notify_generation_change(self) -> bool:
        """Tell the guest that the VM generation ID changed: set GPE 0's status, raising the
        SCI if the guest enabled GPE 0. Call it after the new ID is in guest memory
        (``arch.x86_64.acpi.write_generation_id``).

        Returns whether GPE 0 was enabled, that is whether the guest hears of it now. Unlike a
        refused power-button press, the status latches even then, as a GPE's does: ACPICA
        masks GPE 0 while _E00 runs, and a change that lands in that window is delivered
        when it unmasks. A late notification is harmless (the driver re-reads the ID and
        acts only if it differs), and a guest that never enables GPE 0 (no ACPI) never sees
        it; at boot ACPICA clears every GPE status before enabling any.
        """
        with self._lock:
            self._gpe_status |= GPE_VMGENID
            self._update_sci()
            return bool(self._gpe_enable & GPE_VMGENID)

    def read(self, offset: int, data: memoryview) -> None:
        """Read ``len(data)`` bytes of the block from ``offset``."""
        with self._lock:
            image = self._image(with_timer=offset + len(data) > _TMR)
        for i in range(len(data)):
            position = offset + i
            data[i] = image[position] if 0 <= position < PM_SIZE else 0

    def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``: each byte to the register it falls in."""
        power_off = False
        with self._lock:
            status = _bytes_of(data, offset, _STS)
            if status is not None:
                value, _ = status
                self._status &= ~(value & _STATUS_BITS)  # write 1 to clear
            enable = _bytes_of(data, offset, _EN)
            if enable is not None:
                value, mask = enable
                self._enable = (self._enable & ~mask | value & mask) & _ENABLE_BITS
            control = _bytes_of(data, offset, _CNT)
            if control is not None:
                value, mask = control
                merged = self._read_control() & ~mask | value & mask
                self._control = merged & _CONTROL_STORED
                slp_typ = (merged & _SLP_TYP_MASK) >> _SLP_TYP_SHIFT
                power_off = bool(merged & SLP_EN) and slp_typ == _SLP_TYP_S5
            gpe_status = _bytes_of(data, offset, _GPE0_STS, _GPE_REGISTER_SIZE)
            if gpe_status is not None:
                value, _ = gpe_status
                self._gpe_status &= ~(value & _GPE_STATUS_BITS)  # write 1 to clear
            gpe_enable = _bytes_of(data, offset, _GPE0_EN, _GPE_REGISTER_SIZE)
            if gpe_enable is not None:
                value, _ = gpe_enable
                self._gpe_enable = value & _GPE_ENABLE_BITS
            self._update_sci()
        if power_off:
            self._on_poweroff()

    def save(self) -> AcpiPmState:
        """The registers as plain data."""
        with self._lock:
            return AcpiPmState(
                status=self._status,
                enable=self._enable,
                control=self._control,
                gpe0_status=self._gpe_status,
                gpe0_enable=self._gpe_enable,
            )

    @classmethod
    def restore(
        cls,
        sci: SciLine,
        on_poweroff: Callable[[], None],
        state: AcpiPmState,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> AcpiPm:
        """A device in ``state``, validated as untrusted input (``DeviceStateError``); the SCI
        is raised at once if the state has an enabled event pending."""
        for name, value, allowed in (
            ("status", state.status, _STATUS_BITS),
            ("enable", state.enable, _ENABLE_BITS),
            ("control", state.control, _CONTROL_STORED),
            ("gpe0_status", state.gpe0_status, _GPE_STATUS_BITS),
            ("gpe0_enable", state.gpe0_enable, _GPE_ENABLE_BITS),
        ):
            if type(value) is not int or value & ~allowed or value < 0:
                raise DeviceStateError(
                    f"ACPI PM state is invalid: {name} is {value!r}, not a combination of "
                    f"bits {allowed:#06x}; the snapshot is corrupt or was not written by kasou: "
                    "take a new one"
                )
        device = cls(sci, on_poweroff, clock)
        with device._lock:
            device._status = state.status
            device._enable = state.enable
            device._control = state.control
            device._gpe_status = state.gpe0_status
            device._gpe_enable = state.gpe0_enable
            device._update_sci()
        return device

    # -- registers ----------------------------------------------------------------------------

    def _read_control(self) -> int:
        return self._control | SCI_EN

    def _image(self, with_timer: bool) -> bytes:
        """The block's 14 bytes as the guest reads them now (the timer only when asked)."""
        timer = self._timer() if with_timer else 0
        return b"".join(
            (
                self._status.to_bytes(2, "little"),
                self._enable.to_bytes(2, "little"),
                self._read_control().to_bytes(2, "little"),
                bytes(2),
                timer.to_bytes(4, "little"),
                bytes([self._gpe_status, self._gpe_enable]),
            )
        )

    def _timer(self) -> int:
        return self._clock() * PM_TIMER_HZ // _NS_PER_SECOND & _TIMER_MASK

    def _update_sci(self) -> None:
        """Drive the SCI to what the registers say (called with the lock held)."""
        high = bool(self._status & self._enable) or bool(self._gpe_status & self._gpe_enable)
        if high != self._sci_high:
            self._sci_high = high
            self._sci.set_level(high)


def _bytes_of(
    data: memoryview, offset: int, register: int, size: int = _REGISTER_SIZE
) -> tuple[int, int] | None:
    """The part of an access of ``data`` at ``offset`` that falls in the ``size``-byte register
    at ``register``: ``(value, mask)`` with the written bytes in place, or None if it misses."""
    value = mask = 0
    for i, byte in enumerate(data):
        position = offset + i - register
        if 0 <= position < size:
            value |= byte << 8 * position
            mask |= 0xFF << 8 * position
    return (value, mask) if mask else None
