"""The i8042: the reset line, and a Linux-style probe that never waits on a timeout."""

from __future__ import annotations

import dataclasses

import pytest

from kasou.devices import Bus, DeviceStateError
from kasou.devices.legacy import I8042

DATA, STATUS = 0x60, 0x64
STR_OBF, STR_IBF, STR_SYSFLAG, STR_CMDDAT, STR_AUXDATA, STR_TIMEOUT = 1, 2, 4, 8, 0x20, 0x40
CTR_KBDDIS, CTR_AUXDIS = 0x10, 0x20
# How many status polls a driver makes before it gives up (Linux: 10000 x 50 us).
POLL_LIMIT = 10_000


class Machine:
    """An I8042 on a PIO bus where the VMM puts it, counting reset pulses."""

    def __init__(self) -> None:
        self.resets = 0
        self.i8042 = I8042(self._reset)
        self.bus = Bus("pio")
        self.bus.insert(self.i8042, 0x60, 5)

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        data = bytearray(b"\xff")
        self.bus.read(port, memoryview(data))
        return data[0]

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, memoryview(bytearray([value])))

    def wait_write(self) -> None:
        polls = 0
        while self.inb(STATUS) & STR_IBF:
            polls += 1
            assert polls < POLL_LIMIT, "the input buffer never drained"

    def wait_read(self) -> None:
        polls = 0
        while not self.inb(STATUS) & STR_OBF:
            polls += 1
            assert polls < POLL_LIMIT, "the controller never answered"

    def command(self, command: int, params: bytes = b"", answers: int = 0) -> bytes:
        """What Linux's __i8042_command does: command, parameters, then wait for answers."""
        self.wait_write()
        self.outb(STATUS, command)
        for param in params:
            self.wait_write()
            self.outb(DATA, param)
        received = bytearray()
        for _ in range(answers):
            self.wait_read()
            received.append(self.inb(DATA))
        return bytes(received)

    def flush(self) -> int:
        """Linux's i8042_flush: read the output buffer empty, at most 16 bytes."""
        count = 0
        while self.inb(STATUS) & STR_OBF:
            self.inb(DATA)
            count += 1
            assert count <= 16, "the output buffer never empties"
        return count


def test_command_fe_pulses_the_reset_line() -> None:
    machine = Machine()
    machine.outb(STATUS, 0xFE)
    assert machine.resets == 1


def test_linux_reboot_k_resets_the_machine() -> None:
    machine = Machine()
    # arch/x86/kernel/reboot.c, BOOT_KBD: ten times, wait for the input buffer, write 0xFE.
    for _ in range(10):
        machine.wait_write()
        machine.outb(STATUS, 0xFE)
    assert machine.resets == 10


def test_writing_the_output_port_with_bit_0_clear_resets() -> None:
    machine = Machine()
    machine.command(0xD1, bytes([0x03]))  # reset line high, A20 on: no reset
    assert machine.resets == 0
    assert machine.command(0xD0, answers=1) == bytes([0x03])
    machine.command(0xD1, bytes([0x02]))
    assert machine.resets == 1


def test_other_commands_do_not_reset() -> None:
    machine = Machine()
    for command in (0x20, 0xAA, 0xAB, 0xAD, 0xAE, 0xA7, 0xA8, 0xFF, 0xF1):
        machine.command(command)
    assert machine.resets == 0


def test_linux_probe_finds_a_controller_without_waiting() -> None:
    machine = Machine()
    assert machine.flush() == 0  # i8042_controller_check
    assert machine.command(0xAA, answers=1) == b"\x55"  # controller self test
    ctr = machine.command(0x20, answers=1)[0]
    assert ctr & STR_SYSFLAG  # the system flag: POST passed
    assert machine.inb(STATUS) & STR_SYSFLAG
    ctr = (ctr | CTR_KBDDIS) & ~0x01
    machine.command(0x60, bytes([ctr]))
    assert machine.command(0x20, answers=1) == bytes([ctr])
    assert machine.command(0xAB, answers=1) == b"\x00"  # keyboard interface test


def test_linux_aux_probe_concludes_there_is_no_aux_port() -> None:
    machine = Machine()
    # i8042_check_aux: the aux loopback command; its answer comes back, but not as aux data.
    machine.command(0xD3, b"\x5a")
    machine.wait_read()
    assert not machine.inb(STATUS) & STR_AUXDATA
    # ... so the aux interface test decides, and it reports an error.
    answer = machine.command(0xA9, answers=1)[0]
    assert answer not in (0x00, 0xFA, 0xFF)


def test_a_byte_for_the_missing_keyboard_times_out() -> None:
    machine = Machine()
    machine.outb(DATA, 0xF2)  # atkbd's GET ID
    status = machine.inb(STATUS)
    assert status & (STR_OBF | STR_TIMEOUT | STR_CMDDAT) == STR_OBF | STR_TIMEOUT
    assert machine.inb(DATA) == 0xFF
    assert not machine.inb(STATUS) & (STR_OBF | STR_TIMEOUT)


def test_status_tells_commands_from_data() -> None:
    machine = Machine()
    machine.outb(STATUS, 0xAE)
    assert machine.inb(STATUS) & STR_CMDDAT
    machine.outb(DATA, 0x00)
    assert not machine.inb(STATUS) & STR_CMDDAT


def test_aux_and_keyboard_enables_show_in_the_command_byte() -> None:
    machine = Machine()
    machine.command(0xA8)
    machine.command(0xAD)
    ctr = machine.command(0x20, answers=1)[0]
    assert ctr & (CTR_AUXDIS | CTR_KBDDIS) == CTR_KBDDIS
    machine.command(0xA7)
    machine.command(0xAE)
    ctr = machine.command(0x20, answers=1)[0]
    assert ctr & (CTR_AUXDIS | CTR_KBDDIS) == CTR_AUXDIS


def test_ports_between_data_and_status_are_not_the_controllers() -> None:
    machine = Machine()
    machine.outb(0x61, 0x00)
    assert [machine.inb(port) for port in (0x61, 0x62, 0x63)] == [0xFF] * 3
    assert machine.resets == 0


def test_state_round_trips_through_save_and_restore() -> None:
    machine = Machine()
    machine.command(0x60, bytes([0x47]))
    machine.outb(STATUS, 0xAA)  # an answer left unread
    machine.outb(STATUS, 0xD1)  # a command waiting for its parameter
    state = machine.i8042.save()

    resets: list[None] = []
    restored = I8042.restore(lambda: resets.append(None), state)

    assert restored.save() == state
    data = memoryview(bytearray(1))
    restored.write(0, memoryview(bytearray([0x00])))  # the awaited output-port byte
    assert resets == [None]
    restored.write(4, memoryview(bytearray([0x20])))
    restored.read(0, data)
    assert data[0] == 0x47


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"command_byte": 0x100}, "command_byte is 256, not a byte"),
        ({"output_port": 0x02}, "holds the CPU in reset"),
        ({"output_buffer": -1}, "output_buffer is -1"),
        ({"pending_command": 0xAA}, "pending_command is 170, not a command that takes data"),
        ({"timeout": "no"}, "timeout is 'no', not a bool"),
    ],
)
def test_restore_rejects_a_corrupt_state(change: dict[str, object], message: str) -> None:
    state = dataclasses.replace(I8042(lambda: None).save(), **change)  # type: ignore[arg-type]
    with pytest.raises(DeviceStateError, match=message):
        I8042.restore(lambda: None, state)
