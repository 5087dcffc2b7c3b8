"""A client for the guest agent over virtio-vsock: commands run in the guest with their stdio
streamed both ways, as they happen.

The VMM serves the guest's vsock device on a Unix socket (``kasou run --vsock cid=N,uds=PATH``)
the way Firecracker documents it: a host process connects, writes ``CONNECT <port>\\n``, and the
VMM opens a stream to that guest port and answers ``OK <hostport>\\n``, or closes the connection
when nothing listens there. From then on the Unix stream is the vsock stream, carrying the
agent's frames (``kasou.agent.protocol``). ``connect_vsock`` does the handshake;
``AgentSession`` runs commands on one connection, one at a time (SPAWN, with stdin flow control
by STDIN_ACK); ``open_session`` waits for an agent that is still starting.

What it does not do: read the control socket (the CLI finds the Unix socket's path in the VM's
status), or choose what a terminal session forwards (the caller passes the fds).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import signal
import socket
import termios
import threading
import time
import tty as ttymode
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType as PyFrame
from typing import IO, Any

from kasou.agent import protocol
from kasou.errors import ConfigError, GuestError, HostError

__all__ = [
    "AgentSession",
    "AgentUnavailableError",
    "Sink",
    "Source",
    "connect_vsock",
    "open_session",
]

log = logging.getLogger(__name__)

Source = int | IO[bytes] | None
"""Where a command's stdin comes from: an fd, a binary file (read through its fd when it has
one), or None for none (the command reads EOF)."""

Sink = int | IO[bytes] | Callable[[bytes], object] | None
"""Where a command's output goes: an fd, a binary file, a function given each piece, or None
to drop it."""

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What the caller's process receives and the command's process group gets in its place."""

_RECEIVE = 1 << 18  # bytes read from the connection at once: several full frames
_SEND_HIGH = 256 << 10  # queued for the agent, over which stdin is not read
_KILL_GRACE_S = 10.0  # after SIGKILL for a timeout: how long the agent has to say EXIT
_LINE_MAX = 64  # the VMM's answer to CONNECT is a short line
_DEFAULT_SIZE = (24, 80)

_Handler = Callable[[int, PyFrame | None], Any] | int | signal.Handlers | None


class AgentUnavailableError(HostError):
    """The VMM found nothing listening on the guest's agent port: the agent has not started
    yet, or the guest has no vsock driver."""


def _read_line(sock: socket.socket) -> bytes:
    """One line, a byte at a time: what follows it is the agent's and stays in the socket."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < _LINE_MAX:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def connect_vsock(
    uds: str | Path, port: int = protocol.KASOU_AGENT_PORT, timeout: float = 10.0
) -> socket.socket:
    """A stream to guest vsock ``port`` through the VMM's Unix socket ``uds`` (the handshake
    done, the socket blocking). Raises AgentUnavailableError when the VMM finds nothing
    listening on the port, HostError for everything else that goes wrong."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(uds))
        except FileNotFoundError:
            raise HostError(
                f"{uds}: no such socket: is the VM running with --vsock cid=N,uds={uds}?"
            ) from None
        except ConnectionRefusedError:
            raise HostError(
                f"{uds}: nothing accepts connections there: has the VM stopped?"
            ) from None
        except OSError as error:
            raise HostError(f"cannot connect to {uds}: {error.strerror or error}") from error
        try:
            sock.sendall(f"CONNECT {port}\n".encode())
            answer = _read_line(sock)
        except TimeoutError:
            raise HostError(
                f"{uds}: the VMM did not answer CONNECT {port} within {timeout:.0f} s"
            ) from None
        except OSError:
            answer = b""  # reset: the VMM turned the stream down, as when it closes it
        if not answer:
            raise AgentUnavailableError(
                f"nothing listens on the guest's vsock port {port}: the guest agent is not "
                "listening yet (is the guest still booting?), or the guest has no vsock driver"
            )
        if not (answer.startswith(b"OK ") and answer.endswith(b"\n")):
            raise HostError(f"{uds}: the VMM answered CONNECT {port} with {answer[:_LINE_MAX]!r}")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def open_session(
    uds: str | Path, port: int = protocol.KASOU_AGENT_PORT, timeout: float = 30.0
) -> AgentSession:
    """An AgentSession on the guest's agent, once it is there: while the VMM finds nothing on
    the port (a guest still booting) this tries again, for up to ``timeout`` seconds, then
    waits for the agent's READY."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        try:
            sock = connect_vsock(uds, port, max(1.0, deadline - time.monotonic()))
            break
        except AgentUnavailableError:
            if time.monotonic() + pause > deadline:
                raise
        # Polling is the only way: the VMM answers a port nobody listens on by hanging up.
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
    session = AgentSession(sock)
    try:
        session.wait_ready(max(1.0, deadline - time.monotonic()))
    except BaseException:
        session.close()
        raise
    return session


class _Input:
    """A command's stdin as the session reads it: through an fd (polled) or a file object."""

    def __init__(self, source: Source) -> None:
        self.fd: int | None = None
        self.file: IO[bytes] | None = None
        self.open = source is not None
        if isinstance(source, int):
            self.fd = source
        elif source is not None:
            try:
                self.fd = source.fileno()
            except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
                self.file = source

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at the end (a terminal hung up counts as the end)."""
        if self.file is not None:
            return self.file.read(size) or b""
        assert self.fd is not None
        try:
            return os.read(self.fd, size)
        except OSError as error:
            if error.errno == errno.EIO:
                return b""
            raise


class _Output:
    """Where one of a command's streams goes. A reader that went away (EPIPE) turns it into a
    drain: ``write`` then returns False, once."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.broken = False

    def write(self, data: bytes) -> bool:
        if self.broken or self._sink is None:
            return True
        try:
            if isinstance(self._sink, int):
                view = memoryview(data)
                while view:
                    view = view[os.write(self._sink, view) :]
            elif callable(self._sink):
                self._sink(data)
            else:
                self._sink.write(data)
                self._sink.flush()  # an interactive reader sees it now
        except BrokenPipeError:
            self.broken = True
            return False
        return True


@contextlib.contextmanager
def _forwarding(signals: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
    """While inside: ``signals`` received by this process are noted in the list and wake the
    fd instead of doing what they did. Only the main thread can take signals over; elsewhere
    nothing is forwarded (the fd never wakes)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    received: list[int] = []

    def note(number: int, _frame: PyFrame | None) -> None:
        received.append(number)
        with contextlib.suppress(BlockingIOError):  # already awake
            os.write(wake_w, b"\0")

    previous: dict[int, _Handler] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for number in signals:
                previous[number] = signal.signal(number, note)
        yield wake_r, received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        os.close(wake_r)
        os.close(wake_w)


@contextlib.contextmanager
def _raw(fd: int | None) -> Iterator[None]:
    """The local terminal on ``fd`` in raw mode while inside (keys go to the guest as they are
    typed, ^C included), restored however the block is left."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    ttymode.setraw(fd, termios.TCSANOW)  # keep what was typed ahead: it goes to the guest
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminal_size(fds: Sequence[int | None]) -> tuple[int, int] | None:
    """(rows, cols) of the first terminal among ``fds``."""
    for fd in fds:
        if fd is not None and os.isatty(fd):
            with contextlib.suppress(OSError):
                size = os.get_terminal_size(fd)
                return size.lines, size.columns
    return None


class AgentSession:
    """One connection to the guest agent: run commands on it, one at a time.

    If ``exec`` is left by an exception other than the command's own failure to start (an
    interrupt, a lost connection, a sink that raised), the session closes: the agent then kills
    what was running. Later calls raise HostError.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._socket.setblocking(False)
        self._decoder = protocol.FrameDecoder()
        self._received: deque[protocol.SessionMessage] = deque()
        self._outgoing: deque[bytes] = deque()
        self._sent = 0  # bytes of _outgoing[0] already sent
        self._queued = 0  # bytes in _outgoing, not counting _sent
        self._ids = itertools.count(1)
        self._closed = False
        self.version: str | None = None

    # --- the connection --------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._socket.close()

    def __enter__(self) -> AgentSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise HostError("this connection to the guest agent is closed: open another one")

    def _queue(self, frame: bytes) -> None:
        self._outgoing.append(frame)
        self._queued += len(frame)

    def _send_some(self) -> None:
        """Send what the connection takes without blocking."""
        while self._outgoing:
            head = self._outgoing[0]
            try:
                sent = self._socket.send(memoryview(head)[self._sent :])
            except BlockingIOError:
                return
            except OSError as lost:
                raise HostError(f"lost the connection to the guest agent: {lost}") from lost
            self._sent += sent
            self._queued -= sent
            if self._sent < len(head):
                return
            self._outgoing.popleft()
            self._sent = 0

    def _drop_unsent(self) -> None:
        """Forget queued frames, but finish one half sent: the stream must stay in frames."""
        if self._sent:
            head = self._outgoing[0]
            self._socket.setblocking(True)
            try:
                self._socket.sendall(memoryview(head)[self._sent :])
            except OSError as lost:
                raise HostError(f"lost the connection to the guest agent: {lost}") from lost
            finally:
                self._socket.setblocking(False)
        self._outgoing.clear()
        self._sent = self._queued = 0

    def _receive(self) -> None:
        """Read what has arrived (the socket was readable) into ``_received``."""
        try:
            data = self._socket.recv(_RECEIVE)
        except BlockingIOError:
            return
        except OSError as lost:
            raise HostError(f"lost the connection to the guest agent: {lost}") from lost
        if not data:
            raise HostError("the guest agent closed the connection: did the VM stop?")
        for frame in self._decoder.feed(data):
            message = protocol.parse_session_frame(frame)
            if isinstance(message, protocol.Ready):
                self.version = message.version
            self._received.append(message)

    def wait_ready(self, timeout: float) -> str:
        """Wait for the agent's READY on this connection; return its version string."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while self.version is None:
            for message in self._received:
                if isinstance(message, protocol.AgentError) and message.id == 0:
                    # As when 16 connections are open already; the agent hangs up next.
                    raise HostError(
                        f"the guest agent turned the connection away: {message.message}"
                    )
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._socket], [], [], left)[0]:
                raise GuestError(f"the guest agent did not say READY within {timeout:.0f} s")
            self._receive()
        return self.version

    # --- commands --------------------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: Source = None,
        stdout: Sink = None,
        stderr: Sink = None,
        tty: bool = False,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        forward_signals: bool = True,
    ) -> int:
        """Run ``argv`` in the guest; return its status (its exit code, or 128 + the number of
        the signal that ended it).

        Output goes to ``stdout``/``stderr`` as it arrives; ``stdin`` is forwarded as it can
        be read, at the pace the command reads it. With ``forward_signals`` (and on the main
        thread), SIGINT, SIGTERM and SIGHUP sent to this process go to the command's process
        group instead. With ``tty`` the command runs on a terminal in the guest (stderr comes
        out on ``stdout``), sized like the local terminal on stdin or stdout; a terminal on
        ``stdin`` is put in raw mode until the command ends, and SIGWINCH resizes the guest's.
        ``env`` adds to the agent's environment (PATH, HOME, TERM) or replaces its entries.
        After ``timeout`` seconds the command is killed and GuestError raised. GuestError also
        says when the command could not be started.
        """
        self._check_open()
        id = next(self._ids)
        in_fd = stdin if isinstance(stdin, int) else None
        out_fd = stdout if isinstance(stdout, int) else None
        size = (_terminal_size([in_fd, out_fd]) or _DEFAULT_SIZE) if tty else None
        try:
            spawn = protocol.spawn_frame(id, argv, tty=size, env=env)
        except ValueError as error:
            raise ConfigError("command", str(error)) from None
        run = _Run(self, id, argv[0], _Input(stdin), _Output(stdout), _Output(stderr))
        wanted = list(FORWARDED_SIGNALS) if forward_signals else []
        if tty and forward_signals:
            wanted.append(signal.SIGWINCH)
        try:
            with _forwarding(wanted) as (wake, received), _raw(in_fd if tty else None):
                return run.run(spawn, wake, received, timeout, [in_fd, out_fd] if tty else None)
        except BaseException:
            if not run.ended:
                self.close()  # the agent kills the command with the connection
            raise


class _Run:
    """One command's life on a session: the loop that moves its bytes."""

    def __init__(
        self,
        session: AgentSession,
        id: int,
        program: str,
        stdin: _Input,
        stdout: _Output,
        stderr: _Output,
    ) -> None:
        self.session = session
        self.id = id
        self.program = program
        self.stdin = stdin
        self.outputs = {"stdout": stdout, "stderr": stderr}
        self.credit = protocol.STDIN_WINDOW
        self.started = False  # the agent's answer to SPAWN is behind us
        self.ended = False  # EXIT, or the ERROR that refused the command
        self.status: int | None = None
        self.marker = b"spawned %d" % id

    def run(
        self,
        spawn: bytes,
        wake: int,
        received: list[int],
        timeout: float | None,
        terminal: list[int | None] | None,
    ) -> int:
        session = self.session
        # The agent handles a connection's frames in order, so the PONG comes after its answer
        # to SPAWN: an ERROR for this id before it says the command did not start.
        session._queue(spawn + protocol.ping_frame(self.marker))
        if not self.stdin.open:
            session._queue(protocol.stdin_eof_frame(self.id))
        deadline = None if timeout is None else time.monotonic() + timeout
        killed = False
        while not self.ended:
            self._handle_received()
            if self.ended:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if killed:
                    raise HostError(
                        f"the guest agent did not end {self.program} after SIGKILL: is the "
                        "guest stuck?"
                    )
                session._queue(protocol.signal_frame(self.id, signal.SIGKILL))
                killed = True
                deadline = now + _KILL_GRACE_S
            session._send_some()
            poller = select.poll()
            poller.register(
                session._socket,
                select.POLLIN | select.POLLOUT if session._queued else select.POLLIN,
            )
            poller.register(wake, select.POLLIN)
            reading = self.stdin.open and self.credit > 0 and session._queued < _SEND_HIGH
            if reading and self.stdin.fd is not None:
                poller.register(self.stdin.fd, select.POLLIN)
            wait_ms = None if deadline is None else max(0, int((deadline - now) * 1000) + 1)
            if reading and self.stdin.fd is None:
                wait_ms = 0  # a file object: always ready to be read
            ready = dict(poller.poll(wait_ms))
            if ready.get(wake):
                self._take_signals(wake, received, terminal)
            if ready.get(session._socket.fileno()):
                session._receive()
            if reading and (self.stdin.fd is None or ready.get(self.stdin.fd)):
                self._forward_stdin()
        session._drop_unsent()  # stdin or signals for a command that is over
        if killed:
            raise GuestError(f"{self.program} did not finish within {timeout:g} s; it was killed")
        assert self.status is not None
        return self.status

    def _forward_stdin(self) -> None:
        data = self.stdin.read(min(self.credit, protocol.STREAM_CHUNK))
        if data:
            self.credit -= len(data)
            self.session._queue(protocol.stdin_frame(self.id, data))
        else:
            self.stdin.open = False
            self.session._queue(protocol.stdin_eof_frame(self.id))

    def _take_signals(
        self, wake: int, received: list[int], terminal: list[int | None] | None
    ) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(wake, 4096)
        while received:
            number = received.pop(0)
            if number == signal.SIGWINCH:
                size = _terminal_size(terminal or [])
                if size is not None:
                    self.session._queue(protocol.resize_frame(self.id, *size))
            else:
                self.session._queue(protocol.signal_frame(self.id, number))

    def _handle_received(self) -> None:
        received = self.session._received
        while received and not self.ended:
            message = received.popleft()
            if isinstance(message, protocol.Pong):
                self.started = self.started or message.data == self.marker
            elif isinstance(message, protocol.AgentError) and message.id == 0:
                raise GuestError(f"the guest agent refused a frame: {message.message}")
            elif isinstance(message, protocol.Ready) or message.id != self.id:
                continue  # a late frame about an earlier command
            elif isinstance(message, protocol.Output):
                if not self.outputs[message.stream].write(message.data):
                    # The local reader went away, as a pipe's does: the command learns it the
                    # way it would have locally.
                    self.session._queue(protocol.signal_frame(self.id, signal.SIGPIPE))
            elif isinstance(message, protocol.StdinAck):
                self.credit = min(protocol.STDIN_WINDOW, self.credit + message.count)
            elif isinstance(message, protocol.Exit):
                self.status = message.status
                self.ended = True
            elif not self.started:
                self.ended = True
                raise GuestError(f"in the guest: {message.message}")
            else:
                log.warning("the guest agent about %s: %s", self.program, message.message)
