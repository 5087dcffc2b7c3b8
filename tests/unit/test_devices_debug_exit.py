"""The debug-exit port: what a guest write ends the VM with, how ``--debug-exit`` is read and
checked, and the exit status ``kasou run`` takes from the ending."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasou.devices import Bus
from kasou.devices.legacy.debug_exit import DebugExit, exit_status
from kasou.errors import ConfigError
from kasou.vmm.config import DebugExitConfig, VmConfig, parse_debug_exit
from kasou.vmm.vcpu import ExitKind, GuestExit


class Machine:
    """A DebugExit on a PIO bus at ``port``, recording what guest writes asked for."""

    def __init__(self, port: int = 0xF4, size: int = 4) -> None:
        self.values: list[int] = []
        self.bus = Bus("pio")
        self.bus.insert(DebugExit(self.values.append, size), port, size)

    def out(self, port: int, value: int, width: int) -> bool:
        return self.bus.write(port, memoryview(bytearray(value.to_bytes(width, "little"))))

    def inp(self, port: int, width: int) -> int:
        data = bytearray(b"\xff" * width)
        assert self.bus.read(port, memoryview(data))
        return int.from_bytes(data, "little")


@pytest.mark.parametrize(("width", "value"), [(1, 0x07), (2, 0x1234), (4, 0xDEADBEEF)])
def test_a_write_of_any_width_at_the_port_reports_its_value(width: int, value: int) -> None:
    machine = Machine()
    machine.out(0xF4, value, width)
    assert machine.values == [value]


def test_a_write_inside_the_range_counts_wherever_it_lands() -> None:
    machine = Machine(size=4)
    machine.out(0xF7, 0x2A, 1)
    assert machine.values == [0x2A]


def test_a_write_that_runs_past_the_range_reaches_nothing() -> None:
    machine = Machine(size=2)
    assert not machine.out(0xF4, 1, 4)
    assert machine.values == []


def test_reads_return_zeros() -> None:
    assert Machine().inp(0xF4, 4) == 0


@pytest.mark.parametrize(
    ("value", "status"), [(0, 1), (7, 15), (0x7F, 0xFF), (0x80, 1), (0xFF, 0xFF), (0x1234, 0x69)]
)
def test_the_exit_status_is_value_shifted_left_or_1_in_8_bits(value: int, status: int) -> None:
    assert exit_status(value) == status


def test_a_size_other_than_1_2_or_4_is_a_wiring_error() -> None:
    with pytest.raises(ValueError, match="1, 2 or 4"):
        DebugExit(lambda value: None, 3)


def test_the_status_of_a_debug_exit_is_its_own_and_every_other_ending_keeps_its_kind() -> None:
    assert GuestExit(ExitKind.DEBUG_EXIT, "wrote 7", code=15).status == 15
    assert GuestExit(ExitKind.DEBUG_EXIT, "wrote 0", code=1).status == 1
    assert GuestExit(ExitKind.POWEROFF, "off").status == 0
    assert GuestExit(ExitKind.CRASH, "triple fault").status == 1
    assert GuestExit(ExitKind.STOPPED, "stopped").status == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0xf4", DebugExitConfig(0xF4, 4)),
        ("0XF4", DebugExitConfig(0xF4, 4)),
        ("244", DebugExitConfig(0xF4, 4)),
        ("0x501,size=2", DebugExitConfig(0x501, 2)),
        ("1281,size=1", DebugExitConfig(0x501, 1)),
    ],
)
def test_the_option_takes_a_hex_or_decimal_port_and_a_size(
    text: str, expected: DebugExitConfig
) -> None:
    assert parse_debug_exit(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "not a port"),
        ("f4", "not a port"),
        ("0xf4,size=3", "size=3: use 1, 2 or 4"),
        ("0xf4,width=2", "unknown option 'width'"),
        ("0xf4,0xf8", "give PORT"),
    ],
)
def test_a_malformed_option_is_refused_with_the_fix(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        parse_debug_exit(text)
    assert caught.value.field == "debug-exit"


@pytest.mark.parametrize(
    ("debug_exit", "expected"),
    [
        (DebugExitConfig(0x10000, 1), "ports end at 0xffff"),
        (DebugExitConfig(0xFFFE, 4), "ports end at 0xffff"),
        (DebugExitConfig(-1, 1), "ports end at 0xffff"),
        (DebugExitConfig(0x40, 1), "taken by the PIT"),
        (DebugExitConfig(0x1E, 4), "taken by the PIC"),
        (DebugExitConfig(0x4D0, 2), "taken by the ELCR"),
    ],
)
def test_a_port_kasou_cannot_serve_is_refused(
    tmp_path: Path, debug_exit: DebugExitConfig, expected: str
) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\0")
    with pytest.raises(ConfigError, match=expected):
        VmConfig(kernel=kernel, debug_exit=debug_exit)
    assert VmConfig(kernel=kernel, debug_exit=DebugExitConfig(0xF4)).debug_exit is not None
