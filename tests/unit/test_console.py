"""COM1's host end (kasou.vmm.console.Console): output to a file, the Ctrl-A escapes, and host
input that waits for room in the UART."""

from __future__ import annotations

import os
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.event import EventLoop
from kasou.vmm.config import ConsoleConfig
from kasou.vmm.console import Console

DEADLINE = 5.0  # seconds a test waits before it fails
CTRL_A = b"\x01"


class FakeSerial:
    """The UART's receive side: takes at most ``per_call`` bytes each time it is fed."""

    def __init__(self, per_call: int, expected: int) -> None:
        self.per_call = per_call
        self.expected = expected
        self.received = bytearray()
        self.calls = 0
        self.complete = threading.Event()

    def enqueue_input(self, data: bytes) -> int:
        self.calls += 1
        taken = data[: self.per_call]
        self.received += taken
        if len(self.received) >= self.expected:
            self.complete.set()
        return len(taken)


class Quits:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    events = EventLoop("kasou-test-console")
    events.start()
    yield events
    events.stop()


# --- output ---------------------------------------------------------------------------------


def test_guest_output_is_appended_to_the_file(tmp_path: Path) -> None:
    log = tmp_path / "guest.log"
    log.write_bytes(b"earlier boot\n")
    console = Console(ConsoleConfig("file", log), on_quit=Quits())
    console.write(b"Linux version 6.1")
    console.write(b"\r\nlogin: ")
    assert log.read_bytes() == b"earlier boot\nLinux version 6.1\r\nlogin: "  # unbuffered
    console.close()
    console.close()  # closing twice is harmless
    assert log.read_bytes() == b"earlier boot\nLinux version 6.1\r\nlogin: "


def test_a_console_to_nowhere_drops_output(tmp_path: Path) -> None:
    console = Console(ConsoleConfig("none"), on_quit=Quits())
    console.write(b"lost")
    console.close()
    assert list(tmp_path.iterdir()) == []


def test_a_file_console_takes_no_input(tmp_path: Path, loop: EventLoop) -> None:
    console = Console(ConsoleConfig("file", tmp_path / "log"), on_quit=Quits())
    console.attach(loop, FakeSerial(per_call=16, expected=1))
    assert not console.interactive
    console.close()


# --- escapes (Ctrl-A X quits, Ctrl-A Ctrl-A sends one Ctrl-A) --------------------------------


def _console(tmp_path: Path) -> tuple[Console, Quits]:
    quits = Quits()
    return Console(ConsoleConfig("file", tmp_path / "log"), on_quit=quits), quits


@pytest.mark.parametrize("key", [b"x", b"X"])
def test_ctrl_a_x_quits(tmp_path: Path, key: bytes) -> None:
    console, quits = _console(tmp_path)
    assert console._filter_escapes(b"ls" + CTRL_A + key + b"never sent") == b"ls"
    assert quits.count == 1
    console.close()


def test_ctrl_a_ctrl_a_passes_one_ctrl_a(tmp_path: Path) -> None:
    console, quits = _console(tmp_path)
    assert console._filter_escapes(b"a" + CTRL_A + CTRL_A + b"b") == b"a" + CTRL_A + b"b"
    assert console._filter_escapes(CTRL_A * 4) == CTRL_A * 2
    assert quits.count == 0
    console.close()


def test_other_bytes_pass_untouched(tmp_path: Path) -> None:
    console, quits = _console(tmp_path)
    every_other_byte = bytes(b for b in range(256) if b != CTRL_A[0])
    assert console._filter_escapes(every_other_byte) == every_other_byte
    assert console._filter_escapes(b"x\x18\x03") == b"x\x18\x03"  # x alone, Ctrl-X, Ctrl-C
    assert quits.count == 0
    console.close()


def test_an_escape_split_across_reads_still_works(tmp_path: Path) -> None:
    console, quits = _console(tmp_path)
    assert console._filter_escapes(b"echo" + CTRL_A) == b"echo"
    assert console._filter_escapes(b"x") == b""
    assert quits.count == 1
    assert console._filter_escapes(CTRL_A) == b""
    assert console._filter_escapes(CTRL_A + b"z") == CTRL_A + b"z"
    assert quits.count == 1
    console.close()


# --- input that waits for room ----------------------------------------------------------------


@pytest.fixture
def stdin_from() -> Iterator[list[int]]:
    """Put a file or pipe on fd 0 (what `kasou run < file` or `... | kasou run` gives);
    fd 0 is put back afterwards."""
    saved = os.dup(0)
    replaced: list[int] = []
    yield replaced
    os.dup2(saved, 0)
    os.close(saved)
    for fd in replaced:
        os.close(fd)


def test_redirected_input_is_fed_as_the_uart_takes_it(
    tmp_path: Path, loop: EventLoop, stdin_from: list[int]
) -> None:
    typed = b"".join(b"line %d\n" % number for number in range(20))
    source = tmp_path / "commands.txt"
    source.write_bytes(typed)
    fd = os.open(source, os.O_RDONLY)
    stdin_from.append(fd)
    os.dup2(fd, 0)
    serial = FakeSerial(per_call=7, expected=len(typed))  # a nearly full FIFO each time
    console = Console(ConsoleConfig("stdio"), on_quit=Quits())
    try:
        assert not console.interactive
        console.attach(loop, serial)  # epoll refuses a regular file: read at once, then fed
        assert serial.complete.wait(DEADLINE)
    finally:
        console.close()
    assert bytes(serial.received) == typed  # all of it, in order
    assert serial.calls >= len(typed) // 7  # in many pieces: retried, not dropped


def test_piped_input_is_fed_as_the_uart_takes_it(loop: EventLoop, stdin_from: list[int]) -> None:
    read_end, write_end = os.pipe()
    stdin_from.append(read_end)
    os.dup2(read_end, 0)
    typed = bytes(range(32, 127)) + b"\n"
    serial = FakeSerial(per_call=5, expected=len(typed) * 2)
    console = Console(ConsoleConfig("stdio"), on_quit=Quits())
    try:
        console.attach(loop, serial)
        with os.fdopen(write_end, "wb", buffering=0) as writer:
            writer.write(typed)
            writer.write(typed)
        # The pipe is closed: end of input, and the console stops reading.
        assert serial.complete.wait(DEADLINE)
    finally:
        console.close()
    assert bytes(serial.received) == typed * 2


def test_keys_typed_on_a_terminal_go_through_the_escapes(
    loop: EventLoop, stdin_from: list[int]
) -> None:
    controller, terminal = os.openpty()
    stdin_from.extend([controller, terminal])
    os.dup2(terminal, 0)
    modes = termios.tcgetattr(0)
    quit_pressed = threading.Event()
    serial = FakeSerial(per_call=2, expected=3)
    console = Console(ConsoleConfig("stdio"), on_quit=quit_pressed.set)
    try:
        assert console.interactive
        console.attach(loop, serial)
        assert termios.tcgetattr(0) != modes  # raw: the guest's shell sees every key
        os.write(controller, b"ls" + CTRL_A + CTRL_A + CTRL_A + b"x")
        assert quit_pressed.wait(DEADLINE)
        assert serial.complete.wait(DEADLINE)
    finally:
        console.close()
    assert bytes(serial.received) == b"ls" + CTRL_A
    assert termios.tcgetattr(0) == modes  # the terminal is given back as it was


_STALLED_WRITER = """
import sys
from kasou.vmm.config import ConsoleConfig
from kasou.vmm.console import OUTPUT_BACKLOG, Console

console = Console(ConsoleConfig("stdio"), on_quit=lambda: None)
line = b"0123456789abcdef" * 63 + b"\\n"  # about 1 KiB
for index in range(OUTPUT_BACKLOG // len(line) * 2):  # twice what may wait
    console.write(line)
sys.stderr.write(f"written {console._output.dropped}\\n")
sys.stderr.flush()
sys.stdin.read()  # until the test has read stdout
console.close()
"""


def test_stdout_that_nobody_reads_never_blocks_the_guest(tmp_path: Path) -> None:
    """The guest writes 2 MiB to a pipe nobody reads (64 KiB fit in it): its writes all return
    at once; up to the backlog waits and arrives in order, the rest is dropped."""
    import select
    import subprocess
    import sys

    from kasou.vmm.console import OUTPUT_BACKLOG

    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_WRITER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stderr is not None and child.stdout is not None and child.stdin is not None
        ready, _, _ = select.select([child.stderr], [], [], 30)
        assert ready, "the guest's writes blocked on a stdout nobody read"
        said = child.stderr.readline().decode()
        dropped = int(said.split()[1])
        assert OUTPUT_BACKLOG // 2 <= dropped <= 2 * OUTPUT_BACKLOG
        child.stdin.close()
        output = child.stdout.read()
        assert child.wait(30) == 0
        line = b"0123456789abcdef" * 63 + b"\n"
        assert len(output) + dropped == OUTPUT_BACKLOG // len(line) * 2 * len(line)
        assert output == line * (len(output) // len(line))  # whole lines, in order
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
