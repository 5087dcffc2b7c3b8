"""A 16550A UART (8250 family): the guest's serial console.

Scope: a 16550A good enough for Linux's 8250 driver (probe, console, interactive shell) — the
eight registers at offsets 0..7 from the base port (0x3f8 for COM1), a 64-byte receive FIFO,
and the interrupt identification of the National Semiconductor PC16550D datasheet ("Table II,
Interrupt Control Functions"). Transmission is instantaneous: a byte written to THR goes to
the ``output`` callback at once, so the transmitter is always empty (LSR.THRE and LSR.TEMT
always set) and there is no transmit FIFO to model. Baud rate, word length, parity and stop
bits are stored (LCR, DLL/DLM) but change nothing. The modem inputs read as a connected,
ready terminal (CTS, DSR, DCD asserted).

Not modelled: the receiver timing (the FIFO character-timeout interrupt is reported as soon
as the FIFO holds fewer bytes than the trigger level, as if the four character times had
passed), parity/framing errors and breaks from the host side, the 16750's 64-byte FIFO mode
bit, DMA. Bytes from the host are never lost: ``enqueue_input`` takes only what fits and the
caller keeps the rest.

Interrupts are edges (a KVM irqfd): ``trigger()`` is called when the UART's interrupt output
goes from inactive to active at the end of a register access or of ``enqueue_input``. The
output is not gated by MCR.OUT2, as in most virtual UARTs. Linux's 8250 interrupt handler
loops until IIR reports no interrupt, so an edge per rising of the output is enough.

Threads: ``read``/``write`` come from vCPU threads (serialised by the bus's per-device lock),
``enqueue_input`` from the event loop; one data-structure lock covers all state. The output
and trigger callbacks are called after that lock is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from kasou.devices import DeviceStateError
from kasou.devices.trigger import Trigger

__all__ = ["FIFO_SIZE", "Serial", "SerialState"]

FIFO_SIZE = 64
"""Bytes the receive FIFO holds while FIFOs are enabled (FCR bit 0); one while disabled."""

# Register offsets from the base port (PC16550D datasheet, Table IV "Register Summary").
# With LCR.DLAB set, offsets 0 and 1 are the divisor latch (DLL, DLM) instead.
_RBR_THR = 0
_IER = 1
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7

# IER: interrupt enables. Bits 4-7 are always 0 on a 16550A (Linux's probe checks this).
_IER_ERBFI = 0x01  # received data available (and FIFO character timeout)
_IER_ETBEI = 0x02  # transmitter holding register empty
_IER_ELSI = 0x04  # receiver line status
_IER_EDSSI = 0x08  # modem status
_IER_MASK = 0x0F

# IIR: interrupt identification, bit 0 clear while an interrupt is pending. Bits 6-7 read 1
# while the FIFOs are enabled (FCR bit 0).
_IIR_NONE = 0x01
_IIR_MODEM_STATUS = 0x00
_IIR_THR_EMPTY = 0x02
_IIR_RX_DATA = 0x04
_IIR_RX_LINE_STATUS = 0x06
_IIR_RX_TIMEOUT = 0x0C
_IIR_FIFOS_ENABLED = 0xC0

# FCR: FIFO control (write only). Bits 1 and 2 clear the FIFOs and read back as 0; bits 4-5
# are reserved; bits 1-7 are programmed only together with bit 0 set.
_FCR_ENABLE = 0x01
_FCR_CLEAR_RX = 0x02
_FCR_DMA_MODE = 0x08
_FCR_TRIGGER_MASK = 0xC0
_FCR_TRIGGER_SHIFT = 6
_FCR_STORED = _FCR_ENABLE | _FCR_DMA_MODE | _FCR_TRIGGER_MASK
_RX_TRIGGER_LEVELS = (1, 4, 8, 14)

_LCR_DLAB = 0x80

# MCR: modem control. Bits 5-7 are always 0 on a 16550A.
_MCR_DTR = 0x01
_MCR_RTS = 0x02
_MCR_OUT1 = 0x04
_MCR_OUT2 = 0x08
_MCR_LOOP = 0x10
_MCR_MASK = 0x1F

# LSR: line status.
_LSR_DR = 0x01
_LSR_OE = 0x02
_LSR_THRE = 0x20
_LSR_TEMT = 0x40
_LSR_ERRORS = 0x1E  # OE, PE, FE, BI: cleared by reading LSR

# MSR: modem status. Bits 0-3 record changes of bits 4-7 since MSR was last read.
_MSR_DCTS = 0x01
_MSR_DDSR = 0x02
_MSR_TERI = 0x04
_MSR_DDCD = 0x08
_MSR_CTS = 0x10
_MSR_DSR = 0x20
_MSR_RI = 0x40
_MSR_DCD = 0x80
_MSR_DELTAS = 0x0F
# What the modem inputs read outside loopback: a terminal is attached and ready.
_MSR_CONNECTED = _MSR_CTS | _MSR_DSR | _MSR_DCD

# Divisor 12: 9600 baud from the PC's 1.8432 MHz clock; any value works, nothing is timed.
_DEFAULT_DIVISOR = 12


@dataclass(frozen=True)
class SerialState:
    """A ``Serial``'s registers and receive FIFO. Field names are a snapshot format contract.

    ``lsr`` and ``msr`` are the values a read would return; of them only the error bits
    (LSR bits 1-4) and the change bits (MSR bits 0-3) are state, the rest is derived.
    """

    dll: int
    dlm: int
    ier: int
    fcr: int
    lcr: int
    mcr: int
    lsr: int
    msr: int
    scr: int
    thre_pending: bool
    rx_fifo: bytes


class Serial:
    """A 16550A UART whose transmitter writes to ``output`` and whose receiver is fed by
    ``enqueue_input``.

    ``on_input_ready``, if given, is called (on the vCPU thread, after the access) when the
    receiver becomes empty and able to take input again, so a caller holding input that did
    not fit knows when to retry ``enqueue_input``.
    """

    def __init__(
        self,
        trigger: Trigger,
        output: Callable[[bytes], None],
        *,
        on_input_ready: Callable[[], None] | None = None,
    ) -> None:
        self._trigger = trigger
        self._output = output
        self._on_input_ready = on_input_ready
        self._lock = threading.Lock()
        # Power-on values (datasheet Table III "UART Reset Configuration").
        self._dll = _DEFAULT_DIVISOR
        self._dlm = 0
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._scr = 0
        self._thre_pending = False
        self._rx = bytearray()
        self._line = False  # the interrupt output as last seen; edges are found against it

    # -- the bus side (vCPU threads) --------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        """Read the registers at ``offset``, one per byte of ``data`` (normally one)."""
        with self._lock:
            was_ready = self._input_ready()
            for i in range(len(data)):
                data[i] = self._read_register(offset + i)
            rose = self._update_line()
            became_ready = not was_ready and self._input_ready()
        self._notify(rose, became_ready)

    def write(self, offset: int, data: memoryview) -> None:
        """Write the registers at ``offset``, one per byte of ``data`` (normally one)."""
        transmitted = bytearray()
        with self._lock:
            was_ready = self._input_ready()
            for i, value in enumerate(data):
                self._write_register(offset + i, value, transmitted)
            rose = self._update_line()
            became_ready = not was_ready and self._input_ready()
        if transmitted:
            self._output(bytes(transmitted))
        self._notify(rose, became_ready)

    # -- the host side (event loop) ---------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Put host input into the receive FIFO; returns how many bytes of ``data`` it took.

        The rest did not fit (the FIFO is full, FIFOs are disabled and the one-byte receive
        buffer is taken, or the UART is in loopback and ignores its serial input): keep it and
        try again, e.g. from ``on_input_ready``.
        """
        with self._lock:
            accepted = data[: self._input_space()]
            self._rx += accepted
            rose = self._update_line()
        if rose:
            self._trigger.trigger()
        return len(accepted)

    def input_space(self) -> int:
        """How many bytes ``enqueue_input`` would take now."""
        with self._lock:
            return self._input_space()

    # -- save and restore -------------------------------------------------------------------

    def save(self) -> SerialState:
        """The UART's state as plain data."""
        with self._lock:
            return SerialState(
                dll=self._dll,
                dlm=self._dlm,
                ier=self._ier,
                fcr=self._fcr,
                lcr=self._lcr,
                mcr=self._mcr,
                lsr=self._lsr_value(),
                msr=self._modem_inputs() | self._msr_deltas,
                scr=self._scr,
                thre_pending=self._thre_pending,
                rx_fifo=bytes(self._rx),
            )

    @classmethod
    def restore(
        cls,
        trigger: Trigger,
        output: Callable[[bytes], None],
        state: SerialState,
        *,
        on_input_ready: Callable[[], None] | None = None,
    ) -> Serial:
        """A UART in ``state``, which is validated as untrusted input (``DeviceStateError``).

        No edge is raised for an interrupt already pending in ``state``: the interrupt
        controller's own restored state holds that edge.
        """
        for name in ("dll", "dlm", "ier", "fcr", "lcr", "mcr", "lsr", "msr", "scr"):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise _state_error(f"{name} is {value!r}, not a byte")
        for name, value, mask in (
            ("ier", state.ier, _IER_MASK),
            ("fcr", state.fcr, _FCR_STORED),
            ("mcr", state.mcr, _MCR_MASK),
        ):
            if value & ~mask:
                raise _state_error(f"{name} {value:#04x} has bits set outside {mask:#04x}")
        if state.fcr and not state.fcr & _FCR_ENABLE:
            raise _state_error(f"fcr {state.fcr:#04x} has FIFO settings with FIFOs disabled")
        if type(state.thre_pending) is not bool:
            raise _state_error(f"thre_pending is {state.thre_pending!r}, not a bool")
        if type(state.rx_fifo) is not bytes:
            raise _state_error(f"rx_fifo is a {type(state.rx_fifo).__name__}, not bytes")
        capacity = FIFO_SIZE if state.fcr & _FCR_ENABLE else 1
        if len(state.rx_fifo) > capacity:
            raise _state_error(
                f"the receive FIFO holds {len(state.rx_fifo)} bytes, at most {capacity} fit"
            )
        serial = cls(trigger, output, on_input_ready=on_input_ready)
        serial._dll = state.dll
        serial._dlm = state.dlm
        serial._ier = state.ier
        serial._fcr = state.fcr
        serial._lcr = state.lcr
        serial._mcr = state.mcr
        serial._lsr_errors = state.lsr & _LSR_ERRORS
        serial._msr_deltas = state.msr & _MSR_DELTAS
        serial._scr = state.scr
        serial._thre_pending = state.thre_pending
        serial._rx = bytearray(state.rx_fifo)
        serial._line = serial._interrupt_id() != _IIR_NONE
        return serial

    # -- registers (called with the lock held) ----------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & _LCR_DLAB
        if offset == _RBR_THR:
            if dlab:
                return self._dll
            # An empty receiver reads 0 (hardware would repeat the last byte received).
            return self._rx.pop(0) if self._rx else 0
        if offset == _IER:
            return self._dlm if dlab else self._ier
        if offset == _IIR_FCR:
            # IIR is at offset 2 whatever DLAB says. Reading IIR while it shows the THR-empty
            # interrupt clears that interrupt (datasheet Table II).
            interrupt = self._interrupt_id()
            if interrupt == _IIR_THR_EMPTY:
                self._thre_pending = False
            return interrupt | (_IIR_FIFOS_ENABLED if self._fcr & _FCR_ENABLE else 0)
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _LSR:
            value = self._lsr_value()
            self._lsr_errors = 0  # reading LSR clears OE, PE, FE and BI
            return value
        if offset == _MSR:
            value = self._modem_inputs() | self._msr_deltas
            self._msr_deltas = 0  # reading MSR clears the change bits
            return value
        if offset == _SCR:
            return self._scr
        return 0xFF  # past the eight registers: nothing drives the data lines

    def _write_register(self, offset: int, value: int, transmitted: bytearray) -> None:
        dlab = self._lcr & _LCR_DLAB
        if offset == _RBR_THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value, transmitted)
        elif offset == _IER:
            if dlab:
                self._dlm = value
            else:
                value &= _IER_MASK
                if value & _IER_ETBEI and not self._ier & _IER_ETBEI:
                    # THR is always empty, so enabling its interrupt raises it at once.
                    # Linux's 8250 driver checks that a UART does this (its THRE test at
                    # startup) and falls back to polling the transmitter if not.
                    self._thre_pending = True
                self._ier = value
        elif offset == _IIR_FCR:
            self._write_fcr(value)
        elif offset == _LCR:
            self._lcr = value
        elif offset == _MCR:
            self._write_mcr(value)
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR are read-only (writing them is a factory test mode): ignored.

    def _transmit(self, value: int, transmitted: bytearray) -> None:
        if self._mcr & _MCR_LOOP:
            # Loopback: the transmitter feeds the receiver; the serial output is idle.
            self._receive_looped(value)
        else:
            transmitted.append(value)
        # Writing THR clears the THRE interrupt; the byte leaves at once, so THR is empty
        # again and the interrupt is due again.
        self._thre_pending = True

    def _receive_looped(self, value: int) -> None:
        if self._fcr & _FCR_ENABLE:
            if len(self._rx) < FIFO_SIZE:
                self._rx.append(value)
            else:
                self._lsr_errors |= _LSR_OE  # FIFO full: the new byte is lost
        elif self._rx:
            self._rx[0] = value  # 16450 mode: the unread byte is overwritten
            self._lsr_errors |= _LSR_OE
        else:
            self._rx.append(value)

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & _FCR_ENABLE:
            self._rx.clear()  # switching between FIFO and 16450 mode empties the FIFOs
        if value & _FCR_ENABLE:
            if value & _FCR_CLEAR_RX:
                self._rx.clear()
            self._fcr = value & _FCR_STORED
        else:
            self._fcr = 0  # the other bits are programmed only together with bit 0

    def _write_mcr(self, value: int) -> None:
        before = self._modem_inputs()
        self._mcr = value & _MCR_MASK
        after = self._modem_inputs()
        changed = before ^ after
        if changed & _MSR_CTS:
            self._msr_deltas |= _MSR_DCTS
        if changed & _MSR_DSR:
            self._msr_deltas |= _MSR_DDSR
        if changed & _MSR_DCD:
            self._msr_deltas |= _MSR_DDCD
        if before & _MSR_RI and not after & _MSR_RI:
            self._msr_deltas |= _MSR_TERI  # TERI marks the trailing edge of RI only

    def _modem_inputs(self) -> int:
        mcr = self._mcr
        if not mcr & _MCR_LOOP:
            return _MSR_CONNECTED
        # Loopback wires the modem outputs to the inputs: RTS->CTS, DTR->DSR, OUT1->RI,
        # OUT2->DCD (datasheet, MCR bit 4). Linux's probe expects 0x90 for MCR 0x1a.
        inputs = 0
        if mcr & _MCR_RTS:
            inputs |= _MSR_CTS
        if mcr & _MCR_DTR:
            inputs |= _MSR_DSR
        if mcr & _MCR_OUT1:
            inputs |= _MSR_RI
        if mcr & _MCR_OUT2:
            inputs |= _MSR_DCD
        return inputs

    def _lsr_value(self) -> int:
        return (_LSR_DR if self._rx else 0) | self._lsr_errors | _LSR_THRE | _LSR_TEMT

    def _interrupt_id(self) -> int:
        """The highest-priority pending interrupt, as IIR bits 0-3 (datasheet Table II)."""
        ier = self._ier
        if ier & _IER_ELSI and self._lsr_errors:
            return _IIR_RX_LINE_STATUS
        if ier & _IER_ERBFI and self._rx:
            if self._fcr & _FCR_ENABLE and len(self._rx) < self._rx_trigger_level():
                return _IIR_RX_TIMEOUT
            return _IIR_RX_DATA
        if ier & _IER_ETBEI and self._thre_pending:
            return _IIR_THR_EMPTY
        if ier & _IER_EDSSI and self._msr_deltas:
            return _IIR_MODEM_STATUS
        return _IIR_NONE

    def _rx_trigger_level(self) -> int:
        return _RX_TRIGGER_LEVELS[self._fcr >> _FCR_TRIGGER_SHIFT]

    def _update_line(self) -> bool:
        """Recompute the interrupt output; whether it rose (a new edge is due)."""
        active = self._interrupt_id() != _IIR_NONE
        rose = active and not self._line
        self._line = active
        return rose

    def _input_space(self) -> int:
        if self._mcr & _MCR_LOOP:
            return 0  # loopback disconnects the serial input from the receiver
        capacity = FIFO_SIZE if self._fcr & _FCR_ENABLE else 1
        return capacity - len(self._rx)

    def _input_ready(self) -> bool:
        return not self._rx and not self._mcr & _MCR_LOOP

    def _notify(self, rose: bool, became_ready: bool) -> None:
        if rose:
            self._trigger.trigger()
        if became_ready and self._on_input_ready is not None:
            self._on_input_ready()


def _state_error(detail: str) -> DeviceStateError:
    return DeviceStateError(
        f"serial (16550A) state is invalid: {detail}; the snapshot is corrupt or was not "
        "written by kasou: take a new one"
    )
