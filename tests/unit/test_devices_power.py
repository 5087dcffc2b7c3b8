"""The ACPI PM registers: the power button and its SCI, power-off, the PM timer, GPE 0 (the
VM generation ID's event) and state."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from kasou.devices import DeviceStateError
from kasou.devices.legacy import AcpiPm, AcpiPmState
from kasou.persist import decode_state, encode_state

# Offsets from 0x600 and bits as an ACPI OS knows them (ACPI 6.5 §4.8.3, Tables 4.16-4.18).
PM1_STS, PM1_EN, PM1_CNT, PM_TMR = 0, 2, 4, 8
PWRBTN_STS = PWRBTN_EN = 1 << 8
WAK_STS = 1 << 15
SCI_EN, BM_RLD, GBL_RLS = 1 << 0, 1 << 1, 1 << 2
SLP_EN = 1 << 13
# The GPE0 block at 0x60c (ACPI 6.5 §4.8.4.1): one status byte, one enable byte; GPE 0 is bit 0.
GPE0_STS, GPE0_EN = 12, 13
GPE0 = 1 << 0


def slp_typ(value: int) -> int:
    return value << 10


class Line:
    """The SCI as the interrupt controller sees it: every level change, in order."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    @property
    def high(self) -> bool:
        return bool(self.levels) and self.levels[-1]


class Clock:
    """A monotonic clock in nanoseconds that moves only when a test moves it."""

    def __init__(self, now: int = 0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Machine:
    """The device with its SCI, its power-off line and its clock."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.sci = Line()
        self.poweroffs = 0
        self.clock = clock or Clock()
        self.pm = AcpiPm(self.sci, self.power_off, self.clock)

    def power_off(self) -> None:
        self.poweroffs += 1

    def read(self, offset: int, size: int) -> int:
        data = bytearray(size)
        self.pm.read(offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write(self, offset: int, value: int, size: int = 2) -> None:
        self.pm.write(offset, memoryview(bytearray(value.to_bytes(size, "little"))))


def test_at_reset_nothing_is_pending_and_the_machine_is_in_acpi_mode() -> None:
    machine = Machine()
    assert machine.read(PM1_STS, 2) == 0
    assert machine.read(PM1_EN, 2) == 0
    # No SMI_CMD: an OS finds SCI_EN set and never tries to switch modes.
    assert machine.read(PM1_CNT, 2) == SCI_EN
    assert machine.read(GPE0_STS, 2) == 0
    assert not machine.pm.generation_change_enabled
    assert machine.sci.levels == []


def test_a_press_the_guest_did_not_enable_is_refused_and_leaves_no_trace() -> None:
    machine = Machine()
    assert machine.pm.press_power_button() is False
    assert machine.read(PM1_STS, 2) == 0
    # Enabling the event later must not deliver the refused press.
    machine.write(PM1_EN, PWRBTN_EN)
    assert machine.sci.levels == []
    assert machine.read(PM1_STS, 2) == 0


def test_the_power_button_raises_the_sci_until_the_guest_clears_its_status() -> None:
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    assert machine.pm.power_button_enabled

    assert machine.pm.press_power_button() is True
    assert machine.read(PM1_STS, 2) == PWRBTN_STS
    assert machine.sci.levels == [True]
    # The line stays high: reading does not clear, nor does writing 0 to the status.
    machine.write(PM1_STS, 0)
    assert machine.read(PM1_STS, 2) == PWRBTN_STS
    assert machine.sci.high

    machine.write(PM1_STS, PWRBTN_STS)  # write 1 to clear
    assert machine.read(PM1_STS, 2) == 0
    assert machine.sci.levels == [True, False]


def test_masking_the_event_lowers_the_sci_and_unmasking_raises_it_again() -> None:
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    machine.pm.press_power_button()
    machine.write(PM1_EN, 0)
    assert machine.read(PM1_STS, 2) == PWRBTN_STS  # the status stays latched
    assert not machine.sci.high
    machine.write(PM1_EN, PWRBTN_EN)
    assert machine.sci.levels == [True, False, True]


def test_a_second_press_while_pending_keeps_one_level_and_one_status() -> None:
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    assert machine.pm.press_power_button()
    assert machine.pm.press_power_button()
    assert machine.sci.levels == [True]
    machine.write(PM1_STS, PWRBTN_STS)
    assert machine.sci.levels == [True, False]


def test_only_the_modelled_bits_stick() -> None:
    machine = Machine()
    machine.write(PM1_EN, 0xFFFF)
    # Every enable bit ACPI defines reads back (ACPICA checks that each it sets sticks):
    # TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN, PCIEXP_WAKE_DIS.
    assert machine.read(PM1_EN, 2) == 1 << 0 | 1 << 5 | PWRBTN_EN | 1 << 9 | 1 << 10 | 1 << 14
    assert not machine.sci.high  # no status to go with them
    machine.write(PM1_STS, 0xFFFF)
    assert machine.read(PM1_STS, 2) == 0
    machine.write(PM1_CNT, 0xFFFF & ~SLP_EN)
    # BM_RLD and SLP_TYP read back; GBL_RLS and SLP_EN are write-only; SCI_EN is always 1.
    assert machine.read(PM1_CNT, 2) == SCI_EN | BM_RLD | slp_typ(0b111)


def test_one_32_bit_access_reads_status_and_enable_together() -> None:
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    machine.pm.press_power_button()
    assert machine.read(PM1_STS, 4) == PWRBTN_EN << 16 | PWRBTN_STS
    # A 32-bit write of both: clears the status and disables the event in one access.
    machine.write(PM1_STS, PWRBTN_STS, size=4)
    assert machine.read(PM1_STS, 4) == 0
    assert machine.sci.levels == [True, False]


def test_byte_writes_reach_the_high_half_of_a_register() -> None:
    machine = Machine()
    machine.write(PM1_EN + 1, PWRBTN_EN >> 8, size=1)
    assert machine.read(PM1_EN, 2) == PWRBTN_EN
    machine.pm.press_power_button()
    assert machine.read(PM1_STS + 1, 1) == PWRBTN_STS >> 8
    machine.write(PM1_STS + 1, PWRBTN_STS >> 8, size=1)
    assert machine.read(PM1_STS, 2) == 0
    assert not machine.sci.high


def test_slp_en_with_slp_typ_0_powers_off() -> None:
    machine = Machine()
    machine.write(PM1_CNT, SLP_EN)  # what kasou-agent poweroff writes
    assert machine.poweroffs == 1


def test_the_acpi_sleep_sequence_powers_off_on_its_second_write() -> None:
    # ACPICA's acpi_hw_legacy_sleep: read PM1_CNT, write it with SLP_TYP from \_S5, then
    # write it again with SLP_EN added.
    machine = Machine()
    control = machine.read(PM1_CNT, 2) & ~(slp_typ(0b111) | SLP_EN) | slp_typ(0)
    machine.write(PM1_CNT, control)
    assert machine.poweroffs == 0
    assert machine.read(PM1_CNT, 2) == SCI_EN  # SLP_TYP 0 read back
    machine.write(PM1_CNT, control | SLP_EN)
    assert machine.poweroffs == 1


def test_a_one_byte_write_of_slp_en_powers_off() -> None:
    machine = Machine()
    machine.write(PM1_CNT + 1, SLP_EN >> 8, size=1)
    assert machine.poweroffs == 1


def test_other_sleep_types_do_not_power_off() -> None:
    machine = Machine()
    for kind in range(1, 8):
        machine.write(PM1_CNT, slp_typ(kind) | SLP_EN)
    assert machine.poweroffs == 0
    assert machine.read(PM1_CNT, 2) & SLP_EN == 0  # SLP_EN is never stored


def test_a_generation_change_raises_the_sci_until_the_guest_clears_gpe0() -> None:
    machine = Machine()
    machine.write(GPE0_EN, GPE0, size=1)
    assert machine.pm.generation_change_enabled

    assert machine.pm.notify_generation_change() is True
    assert machine.read(GPE0_STS, 1) == GPE0
    assert machine.sci.levels == [True]
    # Reading does not clear, nor does writing 0.
    machine.write(GPE0_STS, 0, size=1)
    assert machine.read(GPE0_STS, 1) == GPE0
    assert machine.sci.high

    machine.write(GPE0_STS, GPE0, size=1)  # write 1 to clear
    assert machine.read(GPE0_STS, 1) == 0
    assert machine.sci.levels == [True, False]


def test_a_generation_change_the_guest_did_not_enable_returns_false() -> None:
    machine = Machine()
    assert machine.pm.notify_generation_change() is False
    assert machine.sci.levels == []
    # The status latches, as a GPE's does: a guest that enables GPE 0 later hears of it.
    assert machine.read(GPE0_STS, 1) == GPE0
    machine.write(GPE0_EN, GPE0, size=1)
    assert machine.sci.levels == [True]


def test_acpica_boot_and_dispatch_of_an_edge_gpe() -> None:
    machine = Machine()
    machine.pm.notify_generation_change()  # before the guest's ACPI is up: latched only
    # acpi_ev_create_gpe_info_blocks: disable every GPE, clear every status.
    machine.write(GPE0_EN, 0x00, size=1)
    machine.write(GPE0_STS, 0xFF, size=1)
    assert machine.read(GPE0_STS, 2) == 0
    # acpi_ev_initialize_gpe_block: _E00 exists, so GPE 0 is enabled (read-modify-write).
    machine.write(GPE0_EN, machine.read(GPE0_EN, 1) | GPE0, size=1)
    assert machine.sci.levels == []

    assert machine.pm.notify_generation_change() is True
    assert machine.sci.levels == [True]
    # acpi_ev_gpe_dispatch: mask GPE 0, clear its status (edge), run _E00, unmask.
    machine.write(GPE0_EN, machine.read(GPE0_EN, 1) & ~GPE0, size=1)
    assert machine.sci.levels == [True, False]
    machine.write(GPE0_STS, GPE0, size=1)
    # A change while _E00 runs latches and comes in when ACPICA unmasks GPE 0.
    assert machine.pm.notify_generation_change() is False
    assert machine.sci.levels == [True, False]
    machine.write(GPE0_EN, machine.read(GPE0_EN, 1) | GPE0, size=1)
    assert machine.sci.levels == [True, False, True]
    machine.write(GPE0_STS, GPE0, size=1)
    assert machine.sci.levels == [True, False, True, False]


def test_gpe0_enables_stick_and_only_gpe0_ever_has_status() -> None:
    machine = Machine()
    machine.write(GPE0_EN, 0xFF, size=1)
    assert machine.read(GPE0_EN, 1) == 0xFF
    assert not machine.sci.high  # enables alone raise nothing
    machine.write(GPE0_STS, 0xFF, size=1)
    assert machine.read(GPE0_STS, 1) == 0
    machine.pm.notify_generation_change()
    assert machine.read(GPE0_STS, 1) == GPE0
    # One 16-bit access reads status then enable, and writes both.
    assert machine.read(GPE0_STS, 2) == 0xFF << 8 | GPE0
    machine.write(GPE0_STS, 0x00 << 8 | GPE0, size=2)
    assert machine.read(GPE0_STS, 2) == 0
    assert machine.sci.levels == [True, False]


def test_the_sci_stays_high_while_either_event_is_pending() -> None:
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    machine.write(GPE0_EN, GPE0, size=1)
    machine.pm.press_power_button()
    machine.pm.notify_generation_change()
    assert machine.sci.levels == [True]
    machine.write(PM1_STS, PWRBTN_STS)
    assert machine.sci.levels == [True]  # GPE 0 still pending
    machine.pm.press_power_button()
    machine.write(GPE0_STS, GPE0, size=1)
    assert machine.sci.levels == [True]  # the power button still pending
    machine.write(PM1_STS, PWRBTN_STS)
    assert machine.sci.levels == [True, False]


def test_the_pm_timer_counts_at_3_579545_mhz() -> None:
    clock = Clock(now=10**9)
    machine = Machine(clock)
    start = machine.read(PM_TMR, 4)
    assert start == 3_579_545
    clock.now += 1_000_000  # 1 ms
    assert machine.read(PM_TMR, 4) - start in (3579, 3580)
    clock.now += 10**9
    assert machine.read(PM_TMR, 4) - start == 3_579_545 + 3_579


def test_the_pm_timer_wraps_at_32_bits_and_ignores_writes() -> None:
    # 2**32 ticks take 1199.9 s: just before the wrap, then just after it.
    wrap_ns = (1 << 32) * 10**9 // 3_579_545
    clock = Clock(now=wrap_ns - 1000)
    machine = Machine(clock)
    before = machine.read(PM_TMR, 4)
    assert before > 0xFFFF_FF00
    machine.write(PM_TMR, 0, size=4)
    assert machine.read(PM_TMR, 4) == before
    clock.now = wrap_ns + 1000
    assert machine.read(PM_TMR, 4) < 0x100


def test_the_pm_timer_reads_in_pieces() -> None:
    clock = Clock(now=123_456_789_012)
    machine = Machine(clock)
    whole = machine.read(PM_TMR, 4)
    low, high = machine.read(PM_TMR, 2), machine.read(PM_TMR + 2, 2)
    assert high << 16 | low == whole
    assert machine.read(PM_TMR + 3, 1) == whole >> 24


def test_the_gap_between_control_and_timer_reads_zero() -> None:
    machine = Machine()
    assert machine.read(6, 2) == 0
    machine.write(6, 0xFFFF)
    assert machine.read(6, 2) == 0
    assert machine.read(PM1_CNT, 2) == SCI_EN


@pytest.mark.parametrize(("size", "offset"), list(itertools.product((1, 2, 4, 8), range(14))))
def test_any_access_inside_the_block_is_safe(size: int, offset: int) -> None:
    # The guest is untrusted: every width at every offset, including ones that run past the
    # end (the bus refuses those, but the device must not depend on it).
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    machine.write(GPE0_EN, GPE0, size=1)
    machine.pm.press_power_button()
    machine.pm.notify_generation_change()
    data = bytearray(size)
    machine.pm.read(offset, memoryview(data))
    machine.pm.write(offset, memoryview(bytearray(b"\xff" * size)))
    machine.pm.read(offset, memoryview(data))
    # Whatever was written, the SCI follows the registers.
    pending = machine.read(PM1_STS, 2) & machine.read(PM1_EN, 2)
    pending |= machine.read(GPE0_STS, 1) & machine.read(GPE0_EN, 1)
    assert machine.sci.high == bool(pending)


def test_all_ones_over_the_whole_control_register_powers_off() -> None:
    # 0xffff has SLP_EN with SLP_TYP 7, which the DSDT does not offer: no power-off. A write
    # of the high byte with SLP_EN and SLP_TYP 0 does.
    machine = Machine()
    machine.write(PM1_STS, 0xFFFF_FFFF_FFFF_FFFF, size=8)
    assert machine.poweroffs == 0
    machine.write(PM1_CNT + 1, 0x20, size=1)
    assert machine.poweroffs == 1


def test_state_round_trips_and_restore_raises_a_pending_sci() -> None:
    machine = Machine()
    machine.write(PM1_EN, PWRBTN_EN)
    machine.write(PM1_CNT, BM_RLD | slp_typ(5))
    machine.pm.press_power_button()
    state = machine.pm.save()
    assert state == AcpiPmState(status=PWRBTN_STS, enable=PWRBTN_EN, control=BM_RLD | slp_typ(5))

    line = Line()
    restored = AcpiPm.restore(line, lambda: None, state, Clock())
    assert restored.save() == state
    assert line.levels == [True]
    assert restored.sci_high
    data = memoryview(bytearray(PWRBTN_STS.to_bytes(2, "little")))
    restored.write(PM1_STS, data)
    assert line.levels == [True, False]


def test_gpe_state_round_trips_and_restore_raises_its_pending_sci() -> None:
    machine = Machine()
    machine.write(GPE0_EN, 0x81, size=1)
    machine.pm.notify_generation_change()
    state = machine.pm.save()
    assert (state.gpe0_status, state.gpe0_enable) == (GPE0, 0x81)

    line = Line()
    restored = AcpiPm.restore(line, lambda: None, state, Clock())
    assert restored.save() == state
    assert line.levels == [True]
    restored.write(GPE0_STS, memoryview(bytearray([GPE0])))
    assert line.levels == [True, False]


def test_states_saved_before_the_gpe_block_still_restore() -> None:
    # A state encoded by a kasou whose AcpiPmState had three fields.
    @dataclasses.dataclass(frozen=True)
    class OlderAcpiPmState:
        status: int
        enable: int
        control: int

    data = encode_state(OlderAcpiPmState(status=PWRBTN_STS, enable=PWRBTN_EN, control=BM_RLD))
    state = decode_state(data, AcpiPmState, what="pm")
    assert state == AcpiPmState(
        status=PWRBTN_STS, enable=PWRBTN_EN, control=BM_RLD, gpe0_status=0, gpe0_enable=0
    )
    line = Line()
    restored = AcpiPm.restore(line, lambda: None, state, Clock())
    assert line.levels == [True]  # the pending power button, as before
    assert not restored.generation_change_enabled


@pytest.mark.parametrize(
    "change",
    [
        {"status": 1},  # TMR_STS: not modelled
        {"status": -1},
        {"enable": 1 << 1},  # reserved
        {"control": SLP_EN},
        {"control": SCI_EN},
        {"status": "256"},
        {"enable": True},
        {"gpe0_status": 1 << 1},  # GPE 1 has no source
        {"gpe0_status": -1},
        {"gpe0_enable": 0x100},
        {"gpe0_enable": -1},
        {"gpe0_enable": True},
        {"gpe0_status": None},
    ],
)
def test_restore_refuses_states_no_device_could_be_in(change: dict[str, object]) -> None:
    state = dataclasses.replace(AcpiPmState(status=0, enable=0, control=0), **change)  # type: ignore[arg-type]
    with pytest.raises(DeviceStateError, match="ACPI PM state is invalid"):
        AcpiPm.restore(Line(), lambda: None, state)
