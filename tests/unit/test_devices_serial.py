"""The 16550A UART, driven through its registers the way Linux's 8250 driver drives it."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kasou.devices import DeviceStateError
from kasou.devices.legacy import Serial, SerialState
from kasou.errors import SnapshotError

# Register offsets and bits as a driver knows them (PC16550D datasheet; Linux serial_reg.h).
RX = TX = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_TIMEOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_ID_MASK, IIR_FIFOS = 0x0F, 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
FCR_TRIGGER_1, FCR_TRIGGER_14 = 0x00, 0xC0
LCR_DLAB, LCR_8N1 = 0x80, 0x03
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DCTS, MSR_DDCD, MSR_CTS, MSR_DSR, MSR_DCD = 0x01, 0x08, 0x10, 0x20, 0x80


class CountingTrigger:
    """A fake interrupt line that counts edges."""

    def __init__(self) -> None:
        self.edges = 0

    def trigger(self) -> None:
        self.edges += 1


def discard(data: bytes) -> None:
    """An output that goes nowhere."""


class Uart:
    """A Serial with its trigger, its output collected, and byte-wide port helpers."""

    def __init__(self, state: SerialState | None = None) -> None:
        self.irq = CountingTrigger()
        self.output = bytearray()
        self.input_ready = 0
        if state is None:
            self.serial = Serial(self.irq, self.output.extend, on_input_ready=self._ready)
        else:
            self.serial = Serial.restore(
                self.irq, self.output.extend, state, on_input_ready=self._ready
            )

    def _ready(self) -> None:
        self.input_ready += 1

    def inb(self, offset: int) -> int:
        data = bytearray(1)
        self.serial.read(offset, memoryview(data))
        return data[0]

    def outb(self, offset: int, value: int) -> None:
        self.serial.write(offset, memoryview(bytearray([value])))

    def setup_like_linux(self, fcr: int = FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX) -> None:
        """115200 8N1, FIFOs on, DTR/RTS/OUT2: what serial8250_startup/set_termios leave."""
        self.outb(LCR, LCR_DLAB)
        self.outb(DLL, 1)
        self.outb(DLM, 0)
        self.outb(LCR, LCR_8N1)
        self.outb(FCR, fcr)
        self.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)


def test_linux_autoconfig_probe_finds_a_16550a() -> None:
    uart = Uart()
    # IER scratch test: bits 4-7 of IER read back as 0 on a real 8250-family UART.
    uart.outb(IER, 0)
    assert uart.inb(IER) & 0x0F == 0
    uart.outb(IER, 0xFF)
    assert uart.inb(IER) == 0x0F
    uart.outb(IER, 0)
    # Loopback test: MCR LOOP|OUT2|RTS shows as DCD|CTS in MSR's upper half.
    uart.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert uart.inb(MSR) & 0xF0 == 0x90
    uart.outb(MCR, 0)
    # FIFO test: IIR bits 6-7 both set once the FIFO is enabled means 16550A.
    uart.outb(FCR, FCR_ENABLE)
    assert uart.inb(IIR) >> 6 == 3
    # No EFR behind LCR 0xbf: IIR still reads as IIR there.
    uart.outb(LCR, 0xBF)
    assert uart.inb(IIR) != 0
    uart.outb(LCR, 0)
    uart.outb(SCR, 0x5A)
    assert uart.inb(SCR) == 0x5A


def test_divisor_latch_is_behind_dlab() -> None:
    uart = Uart()
    uart.setup_like_linux()
    uart.outb(TX, ord("x"))
    uart.outb(IER, IER_RDI)

    uart.outb(LCR, LCR_DLAB | LCR_8N1)
    assert (uart.inb(DLL), uart.inb(DLM)) == (1, 0)
    uart.outb(DLL, 0x0C)
    uart.outb(LCR, LCR_8N1)
    assert uart.inb(IER) == IER_RDI
    uart.outb(LCR, LCR_DLAB | LCR_8N1)
    assert (uart.inb(DLL), uart.inb(DLM)) == (0x0C, 0)
    assert uart.output == b"x"


def test_bytes_written_to_thr_reach_the_output_in_order() -> None:
    uart = Uart()
    uart.setup_like_linux()

    for byte in b"login: ":
        assert uart.inb(LSR) & LSR_THRE  # the console's wait_for_xmitr
        uart.outb(TX, byte)

    assert uart.output == b"login: "
    assert uart.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert uart.irq.edges == 0  # no interrupt was enabled


def test_input_sets_data_ready_and_raises_exactly_one_edge() -> None:
    uart = Uart()
    uart.setup_like_linux(FCR_ENABLE | FCR_TRIGGER_14)
    uart.outb(IER, IER_RDI | IER_RLSI)
    assert uart.inb(IIR) == IIR_FIFOS | IIR_NO_INT

    assert uart.serial.enqueue_input(b"ls") == 2
    assert uart.serial.enqueue_input(b"\r") == 1  # the line is already up: no new edge

    assert uart.irq.edges == 1
    assert uart.inb(LSR) & LSR_DR
    # Fewer bytes than the trigger level (14): reported as the FIFO character timeout.
    assert uart.inb(IIR) == IIR_FIFOS | IIR_TIMEOUT
    received = bytearray()
    while uart.inb(LSR) & LSR_DR:
        received.append(uart.inb(RX))
    assert received == b"ls\r"
    assert uart.inb(IIR) == IIR_FIFOS | IIR_NO_INT

    uart.serial.enqueue_input(b"x")
    assert uart.irq.edges == 2


def test_input_at_the_trigger_level_is_reported_as_data_available() -> None:
    uart = Uart()
    uart.setup_like_linux(FCR_ENABLE | FCR_TRIGGER_1)
    uart.outb(IER, IER_RDI)
    uart.serial.enqueue_input(b"a")
    assert uart.inb(IIR) == IIR_FIFOS | IIR_RDI


def test_the_fifo_takes_64_bytes_and_reports_when_it_can_take_more() -> None:
    uart = Uart()
    uart.setup_like_linux()
    assert uart.serial.input_space() == 64

    assert uart.serial.enqueue_input(bytes(range(100))) == 64
    assert uart.serial.input_space() == 0
    assert uart.serial.enqueue_input(b"more") == 0

    received = bytes(uart.inb(RX) for _ in range(63))
    assert uart.input_ready == 0  # one byte is still waiting
    received += bytes([uart.inb(RX)])
    assert received == bytes(range(64))
    assert uart.input_ready == 1
    assert uart.serial.input_space() == 64


def test_without_fifos_the_receiver_holds_one_byte() -> None:
    uart = Uart()  # FIFOs are off at power-on: 16450 mode
    assert uart.serial.enqueue_input(b"ab") == 1
    assert uart.serial.input_space() == 0
    assert uart.inb(IIR) & IIR_FIFOS == 0
    assert uart.inb(RX) == ord("a")
    assert uart.input_ready == 1


def test_disabling_the_fifo_or_clearing_it_drops_received_bytes() -> None:
    uart = Uart()
    uart.setup_like_linux()
    uart.serial.enqueue_input(b"abc")
    uart.outb(FCR, FCR_ENABLE | FCR_CLEAR_RX)
    assert not uart.inb(LSR) & LSR_DR
    assert uart.input_ready == 1

    uart.serial.enqueue_input(b"abc")
    uart.outb(FCR, 0)
    assert not uart.inb(LSR) & LSR_DR
    assert uart.serial.input_space() == 1


def test_thre_interrupt_follows_the_linux_thre_test() -> None:
    uart = Uart()
    uart.setup_like_linux()
    # serial8250_do_startup: enable THRI, read IIR, disable, enable again, read IIR.
    uart.outb(IER, IER_THRI)
    assert uart.irq.edges == 1
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_THRI
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_NO_INT  # reading IIR cleared it
    uart.outb(IER, 0)
    uart.outb(IER, IER_THRI)
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_THRI  # newly enabling THRI raises it again
    assert uart.irq.edges == 2


def test_writing_thr_raises_thre_again_once_per_burst() -> None:
    uart = Uart()
    uart.setup_like_linux()
    uart.outb(IER, IER_THRI)
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_THRI  # the interrupt handler identifies it

    for byte in b"hello":  # ... and refills the transmitter
        uart.outb(TX, byte)

    assert uart.irq.edges == 2  # the first write raised THRE again; the line then stayed up
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_THRI
    uart.outb(IER, 0)  # serial8250_stop_tx
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_NO_INT
    assert uart.output == b"hello"


def test_interrupts_are_identified_in_priority_order() -> None:
    uart = Uart()
    uart.setup_like_linux(FCR_ENABLE | FCR_TRIGGER_1)
    uart.outb(MCR, MCR_LOOP)
    for byte in range(65):  # one byte more than the FIFO holds: overrun
        uart.outb(TX, byte)
    uart.outb(MCR, MCR_LOOP | MCR_OUT2)  # DCD changes: modem status
    uart.outb(IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    assert uart.irq.edges == 1

    assert uart.inb(IIR) & IIR_ID_MASK == IIR_RLSI
    assert uart.inb(LSR) & LSR_OE
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_RDI
    assert bytes(uart.inb(RX) for _ in range(64)) == bytes(range(64))
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_THRI
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_MSI
    assert uart.inb(MSR) & (MSR_DDCD | MSR_DCD) == MSR_DDCD | MSR_DCD
    assert uart.inb(IIR) & IIR_ID_MASK == IIR_NO_INT
    assert uart.output == b""


def test_loopback_keeps_bytes_off_the_output_and_ignores_host_input() -> None:
    uart = Uart()
    uart.setup_like_linux()
    uart.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS)
    assert uart.inb(MSR) & (MSR_CTS | MSR_DSR | MSR_DCD) == MSR_CTS | MSR_DSR

    uart.outb(TX, 0x42)
    assert uart.serial.input_space() == 0
    assert uart.serial.enqueue_input(b"host") == 0
    assert uart.inb(RX) == 0x42
    assert uart.input_ready == 0  # still in loopback: host input cannot come in yet

    uart.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    assert uart.input_ready == 1
    assert uart.serial.enqueue_input(b"host") == 4
    assert uart.output == b""
    # Outside loopback the modem inputs show an attached, ready terminal.
    assert uart.inb(MSR) & 0xF0 == MSR_CTS | MSR_DSR | MSR_DCD


def test_state_round_trips_through_save_and_restore() -> None:
    uart = Uart()
    uart.setup_like_linux(FCR_ENABLE | FCR_TRIGGER_14)
    uart.outb(SCR, 0x99)
    uart.outb(IER, IER_RDI | IER_THRI)
    uart.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2 | MCR_OUT1)
    uart.serial.enqueue_input(b"pending input")
    state = uart.serial.save()

    restored = Uart(state)

    assert restored.serial.save() == state
    assert restored.irq.edges == 0  # a restore raises no edge of its own
    assert restored.inb(IIR) == IIR_FIFOS | IIR_TIMEOUT
    assert bytes(restored.inb(RX) for _ in range(13)) == b"pending input"
    restored.outb(TX, ord("!"))
    assert restored.output == b"!"
    assert restored.inb(SCR) == 0x99


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dll": 256}, "dll is 256, not a byte"),
        ({"lcr": -1}, "lcr is -1, not a byte"),
        ({"ier": 0x10}, "ier 0x10 has bits set outside 0x0f"),
        ({"mcr": 0x20}, "mcr 0x20 has bits set outside 0x1f"),
        ({"fcr": 0xC0}, "FIFO settings with FIFOs disabled"),
        ({"fcr": 0x01, "rx_fifo": bytes(65)}, "holds 65 bytes, at most 64 fit"),
        ({"rx_fifo": b"ab"}, "holds 2 bytes, at most 1 fit"),
        ({"rx_fifo": "text"}, "rx_fifo is a str, not bytes"),
        ({"thre_pending": 1}, "thre_pending is 1, not a bool"),
    ],
)
def test_restore_rejects_a_corrupt_state(change: dict[str, object], message: str) -> None:
    state = dataclasses.replace(Serial(CountingTrigger(), discard).save(), **change)  # type: ignore[arg-type]

    with pytest.raises(DeviceStateError, match=message) as caught:
        Serial.restore(CountingTrigger(), discard, state)
    assert isinstance(caught.value, SnapshotError)


accesses = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, 255)),
        st.tuples(st.just("read"), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("input"), st.integers(0, 100), st.just(0)),
    ),
    max_size=200,
)


@given(accesses)
def test_arbitrary_register_accesses_never_fail_or_overfill_the_fifo(
    operations: list[tuple[str, int, int]],
) -> None:
    uart = Uart()
    for kind, number, value in operations:
        if kind == "write":
            uart.outb(number, value)
        elif kind == "read":
            uart.inb(number)
        else:
            accepted = uart.serial.enqueue_input(bytes(number))
            assert 0 <= accepted <= number
        state = uart.serial.save()
        assert len(state.rx_fifo) <= 64
        assert uart.serial.input_space() >= 0
        assert Serial.restore(CountingTrigger(), discard, state).save() == state
