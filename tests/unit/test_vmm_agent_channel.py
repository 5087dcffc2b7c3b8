"""The host end of the guest agent's line (kasou.vmm.agent.AgentChannel), with a real event
loop and a fake UART; the guest's side is played with frames from kasou.agent.protocol."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.agent import protocol as ap
from kasou.agent.protocol import Frame, FrameDecoder, FrameType
from kasou.errors import GuestError
from kasou.event import EventLoop
from kasou.vmm.agent import MAX_OUTPUT, AgentChannel, ExecResult

DEADLINE = 5.0  # seconds any wait may take before the test fails


class FakeUart:
    """COM2's receive side: takes at most ``per_call`` bytes per call, none while ``full``."""

    def __init__(self, per_call: int = 1 << 20) -> None:
        self.per_call = per_call
        self.full = False
        self.calls = 0
        self.received = bytearray()
        self.changed = threading.Condition()

    def enqueue_input(self, data: bytes) -> int:
        with self.changed:
            self.calls += 1
            taken = b"" if self.full else data[: self.per_call]
            self.received += taken
            self.changed.notify_all()
            return len(taken)

    def clear(self) -> None:
        with self.changed:
            self.received.clear()

    def frames(self) -> list[Frame]:
        with self.changed:
            return FrameDecoder().feed(bytes(self.received))

    def wait_for(self, done: Callable[[FakeUart], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: done(self), DEADLINE), "the UART got no input"

    def wait_for_frame(self, kind: FrameType) -> Frame:
        self.wait_for(lambda uart: any(f.type == kind for f in uart.frames()))
        return next(f for f in self.frames() if f.type == kind)


class Background:
    """Runs a blocking call (``execute``, ``wait_ready``) on its own thread."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self.result = function()
        except BaseException as error:
            self.error = error

    def join(self) -> Any:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    events = EventLoop("kasou-test-agent")
    events.start()
    yield events
    events.stop()


@pytest.fixture
def uart() -> FakeUart:
    return FakeUart()


@pytest.fixture
def channel(loop: EventLoop, uart: FakeUart) -> AgentChannel:
    agent = AgentChannel(loop)
    agent.attach(uart.enqueue_input)
    return agent


@pytest.fixture
def ready(channel: AgentChannel) -> AgentChannel:
    channel.output(ap.ready_frame())
    return channel


def _barrier(loop: EventLoop) -> None:
    done = threading.Event()
    loop.call_soon(done.set)
    assert done.wait(DEADLINE)


def _drain(channel: AgentChannel, uart: FakeUart, loop: EventLoop) -> None:
    """Play the UART telling the channel it has room (as a 16550 does when its receive FIFO
    empties) until the last frame of a command, STDIN_EOF, has gone through."""
    for _ in range(1000):
        if any(f.type == FrameType.STDIN_EOF for f in uart.frames()):
            return
        channel.input_ready()
        _barrier(loop)
    pytest.fail("STDIN_EOF never reached the UART")


def _start(
    channel: AgentChannel, uart: FakeUart, argv: list[str], **options: Any
) -> tuple[Background, int]:
    """Start ``execute`` and return it with the command id the guest sees."""
    call = Background(lambda: channel.execute(argv, **options))
    exec_frame = uart.wait_for_frame(FrameType.EXEC)
    command, _ = ap.parse_exec(exec_frame.payload)
    return call, command


# --- READY --------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, len(ap.ready_frame())), max_size=6))
def test_ready_in_any_pieces_marks_the_boot(cuts: list[int]) -> None:
    raw = ap.ready_frame()
    edges = sorted({0, *cuts, len(raw)})
    loop = EventLoop()
    try:
        channel = AgentChannel(loop)
        channel.attach(len)  # a UART with room for everything
        before = time.monotonic_ns()
        for start, end in itertools.pairwise(edges):
            assert channel.ready_ns is None
            channel.output(raw[start:end])
        assert channel.ready_ns is not None
        assert before <= channel.ready_ns <= time.monotonic_ns()
        assert channel.version == ap.AGENT_VERSION
    finally:
        loop.stop()


def test_wait_ready_wakes_when_ready_arrives(channel: AgentChannel) -> None:
    waiting = Background(lambda: channel.wait_ready(DEADLINE))
    channel.output(ap.pong_frame(b"not yet"))
    channel.output(ap.ready_frame("kasou-agent 2"))
    assert waiting.join() == channel.ready_ns
    assert channel.version == "kasou-agent 2"


def test_wait_ready_gives_up_after_its_timeout(channel: AgentChannel) -> None:
    with pytest.raises(GuestError, match="did not start within"):
        channel.wait_ready(0.01)


# --- commands -----------------------------------------------------------------------------------


def test_execute_sends_exec_stdin_and_eof(
    ready: AgentChannel, uart: FakeUart, loop: EventLoop
) -> None:
    stdin = bytes(range(256)) * 40  # more than one STDIN frame holds
    call, command = _start(ready, uart, ["cat", "-n"], stdin=stdin, timeout=DEADLINE)
    _drain(ready, uart, loop)
    frames = uart.frames()
    assert [f.type for f in frames] == [FrameType.EXEC] + [FrameType.STDIN] * 3 + [
        FrameType.STDIN_EOF
    ]
    assert ap.parse_exec(frames[0].payload) == (command, [b"cat", b"-n"])
    pieces = [ap.parse_id_data(f.payload, "STDIN") for f in frames[1:-1]]
    assert {id for id, _ in pieces} == {command}
    assert all(len(data) <= ap.CHUNK for _, data in pieces)
    assert b"".join(data for _, data in pieces) == stdin
    assert ap.parse_id(frames[-1].payload) == command
    ready.output(ap.exit_frame(command, 0))
    assert call.join().status == 0


def test_execute_collects_output_and_status(ready: AgentChannel, uart: FakeUart) -> None:
    call, command = _start(ready, uart, ["sh", "-c", "..."], timeout=DEADLINE)
    reply = b"".join(
        [
            ap.output_frame("stdout", command, b"Linux "),
            ap.output_frame("stderr", command, b"warning\n"),
            ap.output_frame("stdout", command, b"kasou\n"),
            ap.output_frame("stdout", command + 100, b"someone else's\n"),  # ignored
            ap.exit_frame(command, 3),
        ]
    )
    for at in range(0, len(reply), 5):  # the UART hands over a few bytes at a time
        ready.output(reply[at : at + 5])
    result: ExecResult = call.join()
    assert result.status == 3
    assert bytes(result.stdout) == b"Linux kasou\n"
    assert bytes(result.stderr) == b"warning\n"
    assert result.error is None


def test_commands_get_distinct_ids(ready: AgentChannel, uart: FakeUart) -> None:
    first, one = _start(ready, uart, ["true"], timeout=DEADLINE)
    uart.clear()
    second, two = _start(ready, uart, ["false"], timeout=DEADLINE)
    assert one != two
    ready.output(ap.exit_frame(two, 1) + ap.exit_frame(one, 0))
    assert (first.join().status, second.join().status) == (0, 1)


def test_an_error_frame_fails_the_command(ready: AgentChannel, uart: FakeUart) -> None:
    call, command = _start(ready, uart, ["nope"], timeout=DEADLINE)
    ready.output(ap.error_frame(command, "cannot run nope: No such file or directory"))
    with pytest.raises(GuestError, match="could not run nope: cannot run nope: No such file"):
        call.join()


def test_a_timeout_kills_the_command_and_raises(ready: AgentChannel, uart: FakeUart) -> None:
    with pytest.raises(GuestError, match=r"sleep did not finish within .* it was killed"):
        ready.execute(["sleep", "1000"], timeout=0.05)
    signal = uart.wait_for_frame(FrameType.SIGNAL)
    (exec_frame,) = [f for f in uart.frames() if f.type == FrameType.EXEC]
    command, _ = ap.parse_exec(exec_frame.payload)
    assert ap.parse_signal(signal.payload) == (command, 9)
    ready.output(ap.exit_frame(command, 137))  # its late end is dropped quietly
    uart.clear()
    call, again = _start(ready, uart, ["true"], timeout=DEADLINE)  # and the line still works
    assert again != command
    ready.output(ap.exit_frame(again, 0))
    assert call.join().status == 0


def test_a_reboot_fails_pending_commands(ready: AgentChannel, uart: FakeUart) -> None:
    call, _ = _start(ready, uart, ["sleep", "1000"], timeout=DEADLINE)
    ready.attach(FakeUart().enqueue_input)  # the next boot's UART
    with pytest.raises(GuestError, match="rebooted"):
        call.join()
    assert ready.ready_ns is None  # the new boot's agent has to say READY again


def test_output_beyond_the_cap_is_cut_not_holed(ready: AgentChannel, uart: FakeUart) -> None:
    call, command = _start(ready, uart, ["yes"], timeout=DEADLINE)
    piece = 1_000_000  # an agent sends CHUNK at most; the decoder takes up to MAX_FRAME
    stream = bytearray()
    for number in range(MAX_OUTPUT // piece + 1):
        data = bytes([number]) * piece
        stream += data
        ready.output(ap.output_frame("stdout", command, data))
    ready.output(ap.output_frame("stdout", command, b"tail"))  # fits in what is left
    stream += b"tail"
    ready.output(ap.output_frame("stderr", command, b"err") + ap.exit_frame(command, 0))
    result: ExecResult = call.join()
    assert len(result.stdout) == MAX_OUTPUT
    assert result.stdout == stream[:MAX_OUTPUT]  # a prefix of what the guest wrote
    assert bytes(result.stderr) == b"err"  # each stream has its own cap


def test_input_waits_until_the_uart_has_room(
    ready: AgentChannel, uart: FakeUart, loop: EventLoop
) -> None:
    uart.full = True
    call = Background(lambda: ready.execute(["cat"], stdin=b"x" * 100, timeout=DEADLINE))
    uart.wait_for(lambda u: u.calls >= 1)  # it tried, and got no room
    assert uart.received == b""
    uart.full = False
    uart.per_call = 16  # room for a few bytes at a time, as a 16550's FIFO has
    _drain(ready, uart, loop)
    frames = uart.frames()
    assert [f.type for f in frames] == [FrameType.EXEC, FrameType.STDIN, FrameType.STDIN_EOF]
    command, _ = ap.parse_exec(frames[0].payload)
    assert ap.parse_id_data(frames[1].payload) == (command, b"x" * 100)
    ready.output(ap.exit_frame(command, 0))
    assert call.join().status == 0


def test_input_ready_with_nothing_waiting_sends_nothing(
    ready: AgentChannel, uart: FakeUart, loop: EventLoop
) -> None:
    ready.input_ready()
    _barrier(loop)
    assert uart.calls == 0


# --- what a guest can send ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_never_raises_out_of_output(pieces: list[bytes]) -> None:
    loop = EventLoop()
    try:
        channel = AgentChannel(loop)
        channel.attach(len)
        for piece in pieces:
            channel.output(piece)
    finally:
        loop.stop()


@pytest.mark.parametrize(
    "junk",
    [
        b"\x00\x00\x00\x00garbage",  # a length of 0: no frame boundary to be found
        b"\xff\xff\xff\xff",  # a length over MAX_FRAME
        ap.encode_frame(FrameType.EXEC, b"\x00\x00\x00\x01ls\x00"),  # not a guest frame
        ap.encode_frame(FrameType.EXIT, b"\x00\x01"),  # a payload too short
        ap.encode_frame(FrameType.READY, b"\xff\xfe"),  # not ASCII
        ap.encode_frame(0xEE, b"?"),  # no such type
    ],
)
def test_the_line_recovers_after_malformed_frames(
    channel: AgentChannel, uart: FakeUart, junk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    channel.output(junk)
    assert channel.ready_ns is None
    assert "agent line" in caplog.text
    channel.output(ap.ready_frame())
    assert channel.ready_ns is not None
    call, command = _start(channel, uart, ["true"], timeout=DEADLINE)
    channel.output(ap.exit_frame(command, 0))
    assert call.join().status == 0
