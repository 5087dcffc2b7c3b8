"""An i8042 that emulates just enough to let the guest reset the machine.

The PC/AT keyboard controller sits at ports 0x60 (data) and 0x64 (status on read, command on
write). Here it has no keyboard and no mouse attached and raises no interrupts. It exists for
two reasons:

- Reset: command 0xFE (pulse output-port bit 0, the CPU reset line, low) calls ``on_reset``.
  Linux's ``reboot=k`` path (arch/x86/kernel/reboot.c) waits for status bit 1 (input buffer
  full) to clear and then writes 0xFE to port 0x64; that is also where Linux ends up on a
  machine without ACPI. Every pulse command 0xF0..0xFF with bit 0 clear resets, as does
  writing the output port (command 0xD1) with bit 0 clear.
- Probing: Linux's i8042 driver (drivers/input/serio/i8042.c) flushes the output buffer, runs
  the controller self test (0xAA, answered 0x55), reads and writes the command byte (0x20,
  0x60) and tests the ports. Every command it waits on is answered at once, so probing never
  waits on a timeout: it finds a controller with no aux (mouse) port, and the keyboard driver
  finds no keyboard.

The device is inserted once on the PIO bus, at base 0x60 with length 5: offset 0 is port 0x60,
offset 4 is port 0x64. Offsets 1..3 (ports 0x61..0x63) belong to no register here: they read
0xFF and ignore writes, as a hole would (port 0x61, system control port B, is served by KVM's
in-kernel PIT when there is one, before it reaches the bus).

``on_reset`` is called on the vCPU thread, in the middle of the I/O exit, and may be called
several times in a row (Linux sends 0xFE up to ten times): it should record the request and
kick the VM, and be idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kasou.devices import DeviceStateError

__all__ = ["I8042", "I8042State"]

# Offsets from base 0x60.
_DATA_PORT = 0  # port 0x60
_COMMAND_PORT = 4  # port 0x64: status on read, command on write

# Status register (port 0x64 read; IBM PC/AT Technical Reference, "Keyboard Controller").
_STATUS_OBF = 0x01  # output buffer full: port 0x60 has a byte for the CPU
_STATUS_IBF = 0x02  # input buffer full: never, commands and data are taken at once
_STATUS_SYSTEM = 0x04  # system flag, copied from command byte bit 2
_STATUS_LAST_WAS_COMMAND = 0x08  # the last byte written went to port 0x64 (1) or 0x60 (0)
_STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the key lock
_STATUS_AUXDATA = 0x20  # the output buffer holds aux (mouse) data: never, there is no aux port
_STATUS_TIMEOUT = 0x40  # general time-out: a byte sent to the keyboard got no answer

# Command byte (read with 0x20, written with 0x60).
_CTR_KBD_INTERRUPT = 0x01
_CTR_SYSTEM = 0x04
_CTR_KBD_DISABLED = 0x10
_CTR_AUX_DISABLED = 0x20
_CTR_TRANSLATE = 0x40
# What a BIOS leaves: keyboard interrupt enabled, system flag (POST passed), scan code
# translation; the missing aux port disabled.
_DEFAULT_COMMAND_BYTE = _CTR_KBD_INTERRUPT | _CTR_SYSTEM | _CTR_AUX_DISABLED | _CTR_TRANSLATE

# Output port (read with 0xD0, written with 0xD1): bit 0 is the CPU reset line, active low;
# bit 1 is the A20 gate.
_OUTPORT_RESET = 0x01
_OUTPORT_A20 = 0x02
_DEFAULT_OUTPUT_PORT = _OUTPORT_RESET | _OUTPORT_A20

# Controller commands (port 0x64 write).
_CMD_READ_COMMAND_BYTE = 0x20
_CMD_WRITE_COMMAND_BYTE = 0x60
_CMD_DISABLE_AUX = 0xA7
_CMD_ENABLE_AUX = 0xA8
_CMD_TEST_AUX = 0xA9
_CMD_SELF_TEST = 0xAA
_CMD_TEST_KBD = 0xAB
_CMD_DISABLE_KBD = 0xAD
_CMD_ENABLE_KBD = 0xAE
_CMD_READ_OUTPUT_PORT = 0xD0
_CMD_WRITE_OUTPUT_PORT = 0xD1
_CMD_WRITE_KBD_BUFFER = 0xD2
_CMD_WRITE_AUX = 0xD4
_CMD_PULSE_FIRST = 0xF0  # 0xF0..0xFF pulse the output-port lines whose bit (0-3) is clear

# Commands whose parameter is the next byte written to port 0x60.
_COMMANDS_WITH_DATA = frozenset(
    {_CMD_WRITE_COMMAND_BYTE, _CMD_WRITE_OUTPUT_PORT, _CMD_WRITE_KBD_BUFFER, _CMD_WRITE_AUX}
)

_SELF_TEST_PASSED = 0x55
_INTERFACE_OK = 0x00
# The aux interface test's "clock line stuck low": the answer for a port with nothing behind
# it that Linux takes as "no aux port" without waiting for a mouse (i8042_check_aux).
_INTERFACE_CLOCK_LOW = 0x01
# Loaded with the time-out status bit when a byte for the (absent) keyboard gets no answer.
_NO_ANSWER = 0xFF


@dataclass(frozen=True)
class I8042State:
    """An ``I8042``'s registers. Field names are a snapshot format contract.

    ``output_buffer`` is the byte waiting at port 0x60 (``None``: empty); ``pending_command``
    is the command waiting for its parameter byte on port 0x60 (``None``: none).
    """

    command_byte: int
    output_port: int
    output_buffer: int | None
    timeout: bool
    last_write_was_command: bool
    pending_command: int | None


class I8042:
    """An i8042 keyboard controller with nothing attached, whose reset line calls
    ``on_reset``."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._command_byte = _DEFAULT_COMMAND_BYTE
        self._output_port = _DEFAULT_OUTPUT_PORT
        self._output: int | None = None
        self._timeout = False
        self._last_write_was_command = False
        self._pending: int | None = None

    def read(self, offset: int, data: memoryview) -> None:
        """Read port 0x60 (the output buffer) or 0x64 (status) at ``offset`` from 0x60."""
        for i in range(len(data)):
            data[i] = self._read_port(offset + i)

    def write(self, offset: int, data: memoryview) -> None:
        """Write port 0x60 (data) or 0x64 (command) at ``offset`` from 0x60."""
        for i, value in enumerate(data):
            if offset + i == _DATA_PORT:
                self._write_data(value)
            elif offset + i == _COMMAND_PORT:
                self._write_command(value)

    def save(self) -> I8042State:
        """The controller's state as plain data."""
        return I8042State(
            command_byte=self._command_byte,
            output_port=self._output_port,
            output_buffer=self._output,
            timeout=self._timeout,
            last_write_was_command=self._last_write_was_command,
            pending_command=self._pending,
        )

    @classmethod
    def restore(cls, on_reset: Callable[[], None], state: I8042State) -> I8042:
        """A controller in ``state``, which is validated as untrusted input
        (``DeviceStateError``)."""
        for name in ("command_byte", "output_port"):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise _state_error(f"{name} is {value!r}, not a byte")
        if state.output_buffer is not None and (
            type(state.output_buffer) is not int or not 0 <= state.output_buffer <= 0xFF
        ):
            raise _state_error(f"output_buffer is {state.output_buffer!r}, not a byte or None")
        for name in ("timeout", "last_write_was_command"):
            if type(getattr(state, name)) is not bool:
                raise _state_error(f"{name} is {getattr(state, name)!r}, not a bool")
        if state.pending_command is not None and state.pending_command not in _COMMANDS_WITH_DATA:
            raise _state_error(
                f"pending_command is {state.pending_command!r}, not a command that takes data"
            )
        if not state.output_port & _OUTPORT_RESET:
            raise _state_error("the output port holds the CPU in reset (bit 0 clear)")
        controller = cls(on_reset)
        controller._command_byte = state.command_byte
        controller._output_port = state.output_port
        controller._output = state.output_buffer
        controller._timeout = state.timeout
        controller._last_write_was_command = state.last_write_was_command
        controller._pending = state.pending_command
        return controller

    def _read_port(self, offset: int) -> int:
        if offset == _DATA_PORT:
            value = self._output
            self._output = None
            self._timeout = False
            return 0x00 if value is None else value
        if offset == _COMMAND_PORT:
            status = _STATUS_UNLOCKED
            if self._output is not None:
                status |= _STATUS_OBF
            if self._command_byte & _CTR_SYSTEM:
                status |= _STATUS_SYSTEM
            if self._last_write_was_command:
                status |= _STATUS_LAST_WAS_COMMAND
            if self._timeout:
                status |= _STATUS_TIMEOUT
            return status
        return 0xFF  # ports 0x61..0x63: not ours

    def _write_command(self, command: int) -> None:
        self._last_write_was_command = True
        self._pending = None  # a new command abandons one still waiting for its parameter
        if command == _CMD_READ_COMMAND_BYTE:
            self._put_output(self._command_byte)
        elif command in _COMMANDS_WITH_DATA:
            self._pending = command
        elif command == _CMD_DISABLE_AUX:
            self._command_byte |= _CTR_AUX_DISABLED
        elif command == _CMD_ENABLE_AUX:
            self._command_byte &= ~_CTR_AUX_DISABLED
        elif command == _CMD_TEST_AUX:
            self._put_output(_INTERFACE_CLOCK_LOW)
        elif command == _CMD_SELF_TEST:
            self._put_output(_SELF_TEST_PASSED)
        elif command == _CMD_TEST_KBD:
            self._put_output(_INTERFACE_OK)
        elif command == _CMD_DISABLE_KBD:
            self._command_byte |= _CTR_KBD_DISABLED
        elif command == _CMD_ENABLE_KBD:
            self._command_byte &= ~_CTR_KBD_DISABLED
        elif command == _CMD_READ_OUTPUT_PORT:
            self._put_output(self._output_port)
        elif command >= _CMD_PULSE_FIRST and not command & _OUTPORT_RESET:
            # Pulse the output-port lines whose bits 0-3 are clear for about 6 us; bit 0 is
            # the reset line. 0xFE pulses only it: the classic keyboard-controller reset.
            self._on_reset()
        # Anything else (other pulses, reads of internal RAM, vendor commands) is ignored;
        # a parameter that follows it goes to the keyboard, which is absent.

    def _write_data(self, value: int) -> None:
        self._last_write_was_command = False
        pending, self._pending = self._pending, None
        if pending == _CMD_WRITE_COMMAND_BYTE:
            self._command_byte = value
        elif pending == _CMD_WRITE_OUTPUT_PORT:
            if not value & _OUTPORT_RESET:
                self._on_reset()
            # The line is released as the CPU resets; the controller keeps running.
            self._output_port = value | _OUTPORT_RESET
        elif pending == _CMD_WRITE_KBD_BUFFER:
            self._put_output(value)  # as if the keyboard had sent it
        elif pending == _CMD_WRITE_AUX:
            pass  # for the aux device, which is absent
        else:
            # A byte for the keyboard: nothing answers it, and the controller reports the
            # time-out (status bit 6) with 0xFF in the output buffer.
            self._put_output(_NO_ANSWER)
            self._timeout = True

    def _put_output(self, value: int) -> None:
        # The output buffer holds one byte; a new one replaces an unread one.
        self._output = value
        self._timeout = False


def _state_error(detail: str) -> DeviceStateError:
    return DeviceStateError(
        f"i8042 state is invalid: {detail}; the snapshot is corrupt or was not written by "
        "kasou: take a new one"
    )
