"""The host end of the guest agent's line (COM2): run commands in the guest.

The agent (``/sbin/kasou-agent`` in the default guest) speaks the frames of
``kasou.agent.protocol`` over the guest's second UART. Guest output arrives here byte by
byte on a vCPU thread (the UART's THR writes); frames are cut, and each command's output and
exit status collected. Bytes for the guest wait here until the UART's receive FIFO has room;
``feed`` runs on the event loop, woken by the UART when it drains. Anything malformed the
guest sends is dropped and logged: a guest cannot break the channel for the host.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kasou.errors import GuestError
from kasou.event import EventLoop

if TYPE_CHECKING:
    from kasou.agent import protocol

# kasou.agent.protocol is imported where it is first needed: its frame types cost a few
# milliseconds of start-up, and the agent speaks seconds after the VM starts.

__all__ = ["AgentChannel", "AgentState", "ExecResult"]

log = logging.getLogger(__name__)


class ExecResult:
    """What a command run in the guest did (filled in as its frames arrive)."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.error: str | None = None
        self.done = threading.Event()


@dataclass(frozen=True)
class AgentState:
    """What a snapshot keeps of COM2's host end: whether the agent had said READY (it says
    so once, at its start; a restored guest's agent is long past it). Field names are a
    snapshot format contract."""

    ready: bool
    version: str | None


class AgentChannel:
    """COM2's host end for one ``kasou run`` (it outlives reboots; each boot re-attaches)."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._decoder: protocol.FrameDecoder | None = None  # made on the first byte
        self._serial: Callable[[bytes], int] | None = None
        self._outgoing = bytearray()
        self._commands: dict[int, ExecResult] = {}
        self._ids = itertools.count(1)
        self._ready = threading.Condition(self._lock)
        self.ready_ns: int | None = None  # CLOCK_MONOTONIC when READY arrived
        self.version: str | None = None

    # --- wiring -----------------------------------------------------------------------

    def attach(self, enqueue_input: Callable[[bytes], int]) -> None:
        """A new boot: a fresh UART and agent. Commands of the previous boot fail."""
        with self._lock:
            self._serial = enqueue_input
            self._decoder = None
            self._outgoing.clear()
            self.ready_ns = None
            self.version = None
            pending, self._commands = self._commands, {}
        for result in pending.values():
            result.error = "the guest rebooted"
            result.done.set()

    def save(self) -> AgentState:
        with self._lock:
            return AgentState(self.ready_ns is not None, self.version)

    def restore(self, state: AgentState) -> None:
        """After ``attach`` for a restored VM: its agent is as ready as it was saved."""
        if not isinstance(state.ready, bool) or not (
            state.version is None or (isinstance(state.version, str) and len(state.version) < 256)
        ):
            from kasou.errors import SnapshotError

            raise SnapshotError("agent: the saved state is not valid")
        with self._lock:
            if state.ready:
                self.ready_ns = time.monotonic_ns()
                self.version = state.version
                self._ready.notify_all()

    def detach(self) -> None:
        self.attach(lambda data: 0)
        with self._lock:
            self._serial = None

    def input_ready(self) -> None:
        """The UART can take input again (called on a vCPU thread)."""
        if self._outgoing:
            self._loop.call_soon(self.feed)

    # --- guest to host (vCPU thread) ---------------------------------------------------

    def output(self, data: bytes) -> None:
        """Bytes the guest wrote to COM2."""
        from kasou.agent import protocol

        if self._decoder is None:
            self._decoder = protocol.FrameDecoder()
        try:
            frames = self._decoder.feed(data)
        except protocol.AgentProtocolError as error:
            log.warning("agent line: %s", error)
            return
        for frame in frames:
            try:
                message = protocol.parse_guest_frame(frame)
            except protocol.AgentProtocolError as error:
                log.warning("agent line: %s", error)
                continue
            self._dispatch(message)

    def _dispatch(self, message: protocol.GuestMessage) -> None:
        from kasou.agent import protocol

        with self._lock:
            if isinstance(message, protocol.Ready):
                self.ready_ns = time.monotonic_ns()
                self.version = message.version
                self._ready.notify_all()
                return
            if isinstance(message, protocol.Pong):
                return
            result = self._commands.get(message.id)
            if result is None:
                return  # a late frame of a finished command, or a guest making things up
            if isinstance(message, protocol.Output):
                target = result.stdout if message.stream == "stdout" else result.stderr
                # Cut at the cap, so what is kept is a prefix of what the command wrote.
                target += message.data[: max(0, MAX_OUTPUT - len(target))]
                return
            del self._commands[message.id]
        if isinstance(message, protocol.Exit):
            result.status = message.status
        else:
            result.error = message.message
        result.done.set()

    # --- host to guest -------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._outgoing += data
        self._loop.call_soon(self.feed)

    def feed(self) -> None:
        """Move waiting bytes into the UART (event loop thread)."""
        with self._lock:
            if self._serial is None or not self._outgoing:
                return
            taken = self._serial(bytes(self._outgoing[:4096]))
            del self._outgoing[:taken]

    # --- the API -------------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> int:
        """Block until the agent said READY; return when (CLOCK_MONOTONIC ns)."""
        with self._lock:
            if not self._ready.wait_for(lambda: self.ready_ns is not None, timeout):
                raise GuestError(f"the guest agent did not start within {timeout:.0f} s")
            assert self.ready_ns is not None
            return self.ready_ns

    def execute(self, argv: Sequence[str], stdin: bytes = b"", timeout: float = 60.0) -> ExecResult:
        """Run ``argv`` in the guest, feed it ``stdin``, wait for its exit."""
        from kasou.agent import protocol

        if self.ready_ns is None:
            self.wait_ready(timeout)
        result = ExecResult()
        with self._lock:
            command = next(self._ids)
            self._commands[command] = result
        message = protocol.exec_frame(command, argv)
        for start in range(0, len(stdin), protocol.CHUNK):
            message += protocol.stdin_frame(command, stdin[start : start + protocol.CHUNK])
        self._send(message + protocol.stdin_eof_frame(command))
        if not result.done.wait(timeout):
            self._send(protocol.signal_frame(command, 9))
            with self._lock:
                self._commands.pop(command, None)
            raise GuestError(f"{argv[0]} did not finish within {timeout:.0f} s; it was killed")
        if result.error is not None:
            raise GuestError(f"the guest agent could not run {argv[0]}: {result.error}")
        return result


MAX_OUTPUT = 16 << 20  # per stream and command: a chatty guest cannot fill the host's memory
