"""The wire protocol between kasou and its guest agent, and the host side's codec for it.

The agent (``agent/agent.c``, ``/sbin/kasou-agent`` in the default guest) talks to kasou over
two kinds of line:

- the guest's second serial port, COM2 (I/O 0x2f8, IRQ 3; ``/dev/ttyS1`` in the guest), in
  raw mode; COM1 stays the user's console. It is one frame stream, read by the VMM.
- virtio-vsock, where the kernel has it: the agent listens on port ``KASOU_AGENT_PORT`` (1024)
  of any local CID, and every connection is a frame stream of its own, with its own READY,
  its own command ids and its own commands, which the agent kills (SIGKILL to each one's
  process group) when the connection closes. At most 16 are open at once; the agent answers
  one more with an ERROR of id 0 and closes it. ``kasou-agent --unix PATH`` serves the same
  on a Unix socket (for tests on a host).

This module owns the byte format and nothing else: it does not open lines, run commands or
keep per-command state.

Framing. Both directions carry a stream of frames::

    +----------------------+---------+-----------------------+
    | length: u32, big end | type: u8| payload: length-1 B   |
    +----------------------+---------+-----------------------+

``length`` counts the type byte and the payload, so it is at least 1 and at most
``MAX_FRAME`` (1 MiB). A reader that meets a length of 0 or over ``MAX_FRAME`` cannot find the
next frame boundary: it drops every byte it holds (the agent also answers with an ERROR frame
of id 0) and starts again with the next bytes that arrive.

Frames (``id`` is a u32 naming one command, chosen by the host, never 0; ids are big endian,
like every integer here; "strings" are bytes, UTF-8 by convention):

========= ===== ============== =========================================================
type      value direction      payload
========= ===== ============== =========================================================
READY     1     guest -> host  ASCII ``kasou-agent <version>`` (now ``kasou-agent 2``),
                               sent once when the line opens: on COM2 when the agent
                               starts (the guest's boot-time mark), on vsock when the
                               agent accepts the connection
EXEC      2     host -> guest  id, then argv as NUL-terminated strings (1 to 4096); the
                               agent forks and execs argv[0] (searched in
                               PATH=/bin:/sbin:/usr/bin:/usr/sbin) in its own session,
                               its stdin/stdout/stderr on pipes, cwd /, environment
                               PATH, HOME=/root, TERM=dumb
STDIN     3     host -> guest  id, data for the command's stdin (queued while it is not
                               reading; at most 4 MiB queued, beyond that ERROR)
STDIN_EOF 4     host -> guest  id: close the command's stdin once the queue is written (on
                               a terminal: write its EOF character, ^D, if it is in
                               canonical mode; twice after an unfinished line)
STDOUT    5     guest -> host  id, data the command wrote to stdout (at most ``CHUNK`` B on
                               COM2, ``STREAM_CHUNK`` on vsock), or to its terminal
STDERR    6     guest -> host  id, the same for stderr
EXIT      7     guest -> host  id, i32 status: the exit code, or 128 + the number of the
                               signal that ended it; sent after all of the command's output
ERROR     8     guest -> host  id (0: about a frame, not a command), UTF-8 message
PING      9     host -> guest  any bytes
PONG      10    guest -> host  the PING's bytes
SIGNAL    11    host -> guest  id, u32 signal number, sent to the command's process group
SPAWN     12    host -> guest  id, u32 flags, u16 rows, u16 cols, u32 argc, then argc argv
                               strings and any number of ``NAME=VALUE`` environment
                               strings, all NUL-terminated: EXEC with options. Flag
                               ``SPAWN_TTY`` (bit 0; the others must be 0) runs the
                               command on a new pseudo-terminal (its session's controlling
                               tty, TIOCSCTTY) of rows x cols (0 x 0: left unset), which
                               carries stdin and stdout; TERM is then ``xterm``. The
                               environment strings replace the agent's entries of the same
                               name. The command's stdin is acknowledged with STDIN_ACK
RESIZE    13    host -> guest  id, u16 rows, u16 cols: set the size of a SPAWN_TTY
                               command's terminal (TIOCSWINSZ; the kernel sends SIGWINCH)
STDIN_ACK 14    guest -> host  id, u32 count: ``count`` more bytes of a SPAWN command's
                               STDIN were written to it, or dropped because nothing reads
                               them any more. Only SPAWN commands get it
========= ===== ============== =========================================================

Each EXEC or SPAWN ends in exactly one EXIT, or in one ERROR if the command could not be
started (an unknown program, a malformed frame, an id in use, 64 commands running already). An
ERROR about a running command (stdin dropped, a bad SIGNAL) does not end it. An ERROR may come
after the EXIT of the command it names if the host's frame crossed the command's end; the host
ignores those. Output written after the command exits by processes it left behind is lost (on
a terminal the agent waits up to 200 ms for it to drain).

Flow control. The agent never blocks on a line: it queues frames and stops reading a line,
and its commands' output, while over 256 KiB are queued for it, so a host that stops reading
holds the commands back (they block writing) instead of filling the guest's memory. A host
sending a SPAWN command's stdin keeps at most ``STDIN_WINDOW`` bytes of it not yet
acknowledged by STDIN_ACK; that way the agent's queue never overflows and the line never
stalls behind stdin that a command is slow to read (a SIGNAL still gets through).

Compatibility: a version-1 host (EXEC only) sees nothing new on COM2: STDIN_ACK and terminal
output come only for SPAWN commands.

The agent's other mode, ``kasou-agent poweroff`` (init's last shutdown step), writes
``POWEROFF_VALUE`` (16 bit) to I/O port ``POWEROFF_PORT``: kasou's power-off register, modelled
on ACPI PM1a_CNT's SLP_EN bit (ACPI 6.5 §4.8.3.2.1). If the VM is still running after that, the
agent halts the CPUs. It does nothing where ``/etc/kasou-guest`` is missing (on a host, port
0x604 may be something else).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kasou.errors import GuestError

__all__ = [
    "AGENT_VERSION",
    "CHUNK",
    "KASOU_AGENT_PORT",
    "MAX_ARGS",
    "MAX_FRAME",
    "POWEROFF_PORT",
    "POWEROFF_VALUE",
    "SPAWN_TTY",
    "STDIN_WINDOW",
    "STREAM_CHUNK",
    "AgentError",
    "AgentProtocolError",
    "Exit",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GuestMessage",
    "Output",
    "Pong",
    "Ready",
    "SessionMessage",
    "Spawn",
    "StdinAck",
    "encode_frame",
    "error_frame",
    "exec_frame",
    "exit_frame",
    "output_frame",
    "parse_error",
    "parse_exec",
    "parse_exit",
    "parse_guest_frame",
    "parse_id",
    "parse_id_data",
    "parse_ready",
    "parse_resize",
    "parse_session_frame",
    "parse_signal",
    "parse_spawn",
    "parse_stdin_ack",
    "ping_frame",
    "pong_frame",
    "ready_frame",
    "resize_frame",
    "signal_frame",
    "spawn_frame",
    "stdin_ack_frame",
    "stdin_eof_frame",
    "stdin_frame",
]

MAX_FRAME = 1 << 20
"""The largest ``length`` field either side accepts (type byte plus payload)."""

CHUNK = 4096
"""The most STDOUT/STDERR data the agent puts in one frame on COM2."""

STREAM_CHUNK = 65536
"""The most STDOUT/STDERR data the agent puts in one frame on a vsock connection."""

STDIN_WINDOW = 1 << 20
"""The most STDIN bytes of a SPAWN command a host has sent and not yet seen acknowledged."""

MAX_ARGS = 4096
"""The most strings (argv, and environment for SPAWN) one EXEC or SPAWN may carry."""

KASOU_AGENT_PORT = 1024
"""The vsock port the agent listens on (any local CID)."""

SPAWN_TTY = 1
"""SPAWN's flag for a command on a pseudo-terminal."""

AGENT_VERSION = "kasou-agent 2"
"""The READY payload of the agent this module describes."""

POWEROFF_PORT = 0x604
POWEROFF_VALUE = 0x2000
"""``kasou-agent poweroff`` writes POWEROFF_VALUE (SLP_EN, bit 13) to POWEROFF_PORT, 16 bit."""

_U32 = struct.Struct(">I")
_ID_I32 = struct.Struct(">Ii")
_ID_U32 = struct.Struct(">II")
_ID_SIZE = struct.Struct(">IHH")
_SPAWN_HEAD = struct.Struct(">IIHHI")


class FrameType(enum.IntEnum):
    READY = 1
    EXEC = 2
    STDIN = 3
    STDIN_EOF = 4
    STDOUT = 5
    STDERR = 6
    EXIT = 7
    ERROR = 8
    PING = 9
    PONG = 10
    SIGNAL = 11
    SPAWN = 12
    RESIZE = 13
    STDIN_ACK = 14


class AgentProtocolError(GuestError):
    """Bytes from the agent (or meant for it) that break the protocol."""


@dataclass(frozen=True)
class Frame:
    """One frame as read off the wire: ``type`` may be a value FrameType does not know."""

    type: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_frame(self.type, self.payload)


def encode_frame(type: int, payload: bytes = b"") -> bytes:
    """The bytes of one frame. Raises ValueError for a type outside a byte or a frame over
    ``MAX_FRAME``."""
    if not 0 <= type <= 0xFF:
        raise ValueError(f"frame type {type} does not fit in a byte")
    if len(payload) + 1 > MAX_FRAME:
        raise ValueError(f"a {len(payload)}-byte payload is over the {MAX_FRAME - 1} limit")
    return _U32.pack(len(payload) + 1) + bytes((type,)) + payload


class FrameDecoder:
    """Cuts a byte stream into frames, whatever pieces it arrives in.

    ``feed`` returns the frames completed by the new bytes. A header with a bad length
    (0, or over ``max_frame``) raises ``AgentProtocolError`` after the decoder has dropped every
    byte it held; when frames came before it in the same call, those are returned first and
    the error is raised by the next call. Either way the decoder goes on with the bytes that
    come after: nothing else escapes ``feed``.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        at = 0
        while len(buffer) - at >= 4:
            (length,) = _U32.unpack_from(buffer, at)
            if length == 0 or length > self._max_frame:
                if frames:
                    break
                dropped = len(buffer) - at
                buffer.clear()
                raise AgentProtocolError(
                    f"bad frame length {length} (1 to {self._max_frame} allowed): "
                    f"dropped {dropped} buffered bytes"
                )
            end = at + 4 + length
            if len(buffer) < end:
                break
            frames.append(Frame(buffer[at + 4], bytes(buffer[at + 5 : end])))
            at = end
        del buffer[:at]
        return frames


# --- frames the host sends ---------------------------------------------------------------------


def _check_id(id: int) -> None:
    if not 0 < id <= 0xFFFF_FFFF:
        raise ValueError(f"command id {id} is not in 1..2**32-1")


def exec_frame(id: int, argv: Sequence[str | bytes]) -> bytes:
    """EXEC ``argv`` as command ``id``. Raises ValueError for an empty argv, an empty program
    name or an argument with a NUL byte (it could not be sent)."""
    _check_id(id)
    if not argv:
        raise ValueError("argv is empty: name a program to run")
    args = [a.encode() if isinstance(a, str) else bytes(a) for a in argv]
    if not args[0]:
        raise ValueError("the program name (argv[0]) is empty")
    for arg in args:
        if b"\0" in arg:
            raise ValueError(f"argument {arg!r} contains a NUL byte")
    return encode_frame(FrameType.EXEC, _U32.pack(id) + b"".join(a + b"\0" for a in args))


def stdin_frame(id: int, data: bytes) -> bytes:
    _check_id(id)
    return encode_frame(FrameType.STDIN, _U32.pack(id) + data)


def stdin_eof_frame(id: int) -> bytes:
    _check_id(id)
    return encode_frame(FrameType.STDIN_EOF, _U32.pack(id))


def signal_frame(id: int, signal: int) -> bytes:
    _check_id(id)
    if not 0 < signal < 65:
        raise ValueError(f"{signal} is not a signal number")
    return encode_frame(FrameType.SIGNAL, _ID_U32.pack(id, signal))


def ping_frame(data: bytes = b"") -> bytes:
    return encode_frame(FrameType.PING, data)


def _check_size(rows: int, cols: int) -> None:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError(f"a terminal of {rows} x {cols} does not fit in 16-bit sizes")


def spawn_frame(
    id: int,
    argv: Sequence[str | bytes],
    *,
    tty: tuple[int, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """SPAWN ``argv`` as command ``id``; ``tty`` = (rows, cols) runs it on a terminal of that
    size, ``env`` adds to (or replaces entries of) the agent's environment. Raises ValueError
    for what could not be sent: an empty argv or program name, a NUL byte, an environment name
    that is empty or holds "=", a size over 16 bits, more than ``MAX_ARGS`` strings."""
    _check_id(id)
    if not argv:
        raise ValueError("argv is empty: name a program to run")
    args = [a.encode() if isinstance(a, str) else bytes(a) for a in argv]
    if not args[0]:
        raise ValueError("the program name (argv[0]) is empty")
    entries: list[bytes] = []
    for name, value in (env or {}).items():
        if not name or "=" in name:
            raise ValueError(f"environment name {name!r} is empty or contains '='")
        entries.append(f"{name}={value}".encode())
    for arg in args + entries:
        if b"\0" in arg:
            raise ValueError(f"argument or environment entry {arg!r} contains a NUL byte")
    if len(args) + len(entries) > MAX_ARGS:
        raise ValueError(f"{len(args) + len(entries)} strings are over the {MAX_ARGS} limit")
    rows, cols = tty if tty is not None else (0, 0)
    _check_size(rows, cols)
    flags = SPAWN_TTY if tty is not None else 0
    head = _SPAWN_HEAD.pack(id, flags, rows, cols, len(args))
    return encode_frame(FrameType.SPAWN, head + b"".join(s + b"\0" for s in args + entries))


def resize_frame(id: int, rows: int, cols: int) -> bytes:
    """RESIZE command ``id``'s terminal to ``rows`` x ``cols``."""
    _check_id(id)
    _check_size(rows, cols)
    return encode_frame(FrameType.RESIZE, _ID_SIZE.pack(id, rows, cols))


# --- frames the agent sends (what a fake agent in a test needs) --------------------------------


def ready_frame(version: str = AGENT_VERSION) -> bytes:
    return encode_frame(FrameType.READY, version.encode("ascii"))


def output_frame(stream: Literal["stdout", "stderr"], id: int, data: bytes) -> bytes:
    kind = FrameType.STDOUT if stream == "stdout" else FrameType.STDERR
    return encode_frame(kind, _U32.pack(id) + data)


def exit_frame(id: int, status: int) -> bytes:
    return encode_frame(FrameType.EXIT, _ID_I32.pack(id, status))


def error_frame(id: int, message: str) -> bytes:
    return encode_frame(FrameType.ERROR, _U32.pack(id) + message.encode())


def pong_frame(data: bytes) -> bytes:
    return encode_frame(FrameType.PONG, data)


def stdin_ack_frame(id: int, count: int) -> bytes:
    return encode_frame(FrameType.STDIN_ACK, _ID_U32.pack(id, count))


# --- payload parsers: each raises AgentProtocolError on a malformed payload -------------------


def _need(payload: bytes, size: int, what: str, exact: bool = False) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise AgentProtocolError(
            f"{what} payload of {len(payload)} bytes: it needs {'exactly' if exact else 'at least'}"
            f" {size}"
        )


def parse_id(payload: bytes, what: str = "STDIN_EOF") -> int:
    """The id of a frame whose payload is just an id."""
    _need(payload, 4, what, exact=True)
    return int(_U32.unpack(payload)[0])


def parse_id_data(payload: bytes, what: str = "STDOUT") -> tuple[int, bytes]:
    """(id, data) of STDIN, STDOUT or STDERR."""
    _need(payload, 4, what)
    return int(_U32.unpack_from(payload)[0]), payload[4:]


def parse_ready(payload: bytes) -> str:
    """The agent's version string."""
    try:
        return payload.decode("ascii")
    except UnicodeDecodeError as err:
        raise AgentProtocolError(f"READY payload is not ASCII: {payload[:64]!r}") from err


def parse_exec(payload: bytes) -> tuple[int, list[bytes]]:
    """(id, argv) of EXEC."""
    _need(payload, 5, "EXEC")
    if payload[-1] != 0:
        raise AgentProtocolError("EXEC argv does not end with a NUL byte")
    return int(_U32.unpack_from(payload)[0]), payload[4:-1].split(b"\0")


def parse_exit(payload: bytes) -> tuple[int, int]:
    """(id, status) of EXIT."""
    _need(payload, 8, "EXIT", exact=True)
    id, status = _ID_I32.unpack(payload)
    return int(id), int(status)


def parse_error(payload: bytes) -> tuple[int, str]:
    """(id, message) of ERROR; a message that is not UTF-8 is decoded with replacements."""
    _need(payload, 4, "ERROR")
    return int(_U32.unpack_from(payload)[0]), payload[4:].decode("utf-8", "replace")


def parse_signal(payload: bytes) -> tuple[int, int]:
    """(id, signal) of SIGNAL."""
    _need(payload, 8, "SIGNAL", exact=True)
    id, signal = _ID_U32.unpack(payload)
    return int(id), int(signal)


@dataclass(frozen=True)
class Spawn:
    """A SPAWN request: ``tty`` is (rows, cols) for a command on a terminal, else None."""

    id: int
    argv: list[bytes]
    env: list[bytes]
    tty: tuple[int, int] | None


def parse_spawn(payload: bytes) -> Spawn:
    """The request a SPAWN carries, checked as the agent checks it."""
    _need(payload, _SPAWN_HEAD.size, "SPAWN")
    id, flags, rows, cols, argc = _SPAWN_HEAD.unpack_from(payload)
    if flags & ~SPAWN_TTY:
        raise AgentProtocolError(f"SPAWN with unknown flags {flags:#x}")
    if not 0 < argc <= MAX_ARGS:
        raise AgentProtocolError(f"SPAWN argc {argc} is not in 1..{MAX_ARGS}")
    strings = payload[_SPAWN_HEAD.size :]
    if not strings.endswith(b"\0"):
        raise AgentProtocolError("SPAWN strings must be NUL-terminated")
    parts = strings[:-1].split(b"\0")
    if len(parts) < argc:
        raise AgentProtocolError(f"SPAWN has {len(parts)} strings, fewer than argc {argc}")
    if len(parts) > MAX_ARGS:
        raise AgentProtocolError(f"SPAWN has more than {MAX_ARGS} strings")
    env = parts[argc:]
    for entry in env:
        if entry.find(b"=") < 1:
            raise AgentProtocolError(f"SPAWN environment entry {entry[:64]!r} is not NAME=VALUE")
    tty = (int(rows), int(cols)) if flags & SPAWN_TTY else None
    return Spawn(int(id), parts[:argc], env, tty)


def parse_resize(payload: bytes) -> tuple[int, int, int]:
    """(id, rows, cols) of RESIZE."""
    _need(payload, 8, "RESIZE", exact=True)
    id, rows, cols = _ID_SIZE.unpack(payload)
    return int(id), int(rows), int(cols)


def parse_stdin_ack(payload: bytes) -> tuple[int, int]:
    """(id, count) of STDIN_ACK."""
    _need(payload, 8, "STDIN_ACK", exact=True)
    id, count = _ID_U32.unpack(payload)
    return int(id), int(count)


# --- what the host reads, typed ---------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    version: str


@dataclass(frozen=True)
class Output:
    id: int
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class Exit:
    id: int
    status: int


@dataclass(frozen=True)
class AgentError:
    id: int
    message: str


@dataclass(frozen=True)
class Pong:
    data: bytes


@dataclass(frozen=True)
class StdinAck:
    id: int
    count: int


GuestMessage = Ready | Output | Exit | AgentError | Pong
"""What the agent sends a host that only EXECs (the VMM's COM2 channel)."""

SessionMessage = GuestMessage | StdinAck
"""What the agent sends a host that SPAWNs too (a vsock connection)."""


def parse_guest_frame(frame: Frame) -> GuestMessage:
    """The message a frame from the agent carries. Raises AgentProtocolError for a frame type
    the agent does not send or a malformed payload."""
    match frame.type:
        case FrameType.READY:
            return Ready(parse_ready(frame.payload))
        case FrameType.STDOUT:
            id, data = parse_id_data(frame.payload, "STDOUT")
            return Output(id, "stdout", data)
        case FrameType.STDERR:
            id, data = parse_id_data(frame.payload, "STDERR")
            return Output(id, "stderr", data)
        case FrameType.EXIT:
            return Exit(*parse_exit(frame.payload))
        case FrameType.ERROR:
            return AgentError(*parse_error(frame.payload))
        case FrameType.PONG:
            return Pong(frame.payload)
    raise AgentProtocolError(f"frame type {frame.type} is not one the agent sends")


def parse_session_frame(frame: Frame) -> SessionMessage:
    """``parse_guest_frame``, and STDIN_ACK too (which comes only for SPAWN commands)."""
    if frame.type == FrameType.STDIN_ACK:
        return StdinAck(*parse_stdin_ack(frame.payload))
    return parse_guest_frame(frame)
