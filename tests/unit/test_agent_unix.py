"""The guest agent's stream service (what it serves on vsock), run on the host with
``kasou-agent --unix PATH`` and driven by the host's client (kasou.client.agent, kasou.client.copy)
and by raw frames; ``kasou exec`` and ``kasou cp`` end to end through a fake control socket and a
fake VMM vsock socket (the peers, speaking their real protocols)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import pytest

from kasou.agent import protocol as ap
from kasou.cli import main
from kasou.client.agent import AgentSession, AgentUnavailableError, connect_vsock
from kasou.client.copy import CopyError, copy_from_guest, copy_to_guest, extract_archive
from kasou.errors import GuestError, HostError
from kasou.image._userland import AGENT_SOURCE

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

# A guard against a hung agent, not a pace: every wait ends as soon as what it waits for comes.
_TIMEOUT_S = 20.0


def _wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll a state the kernel shows only in /proc (no event announces it)."""
    deadline = time.monotonic() + _TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "kasou-agent"
    result = subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), AGENT_SOURCE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def folder() -> Iterator[Path]:
    # Short: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="kasou-agent-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Agent:
    """``kasou-agent --unix PATH`` as a child process."""

    def __init__(self, binary: Path, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen([binary, "--unix", str(path)], stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], _TIMEOUT_S)
        assert ready, "the agent did not start listening"
        assert self.proc.stderr.readline() == f"kasou-agent: listening on {path}\n".encode()

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.path))
        return sock

    def session(self) -> AgentSession:
        session = AgentSession(self.connect())
        assert session.wait_ready(_TIMEOUT_S) == ap.AGENT_VERSION
        return session

    def peak_memory_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def agent(agent_binary: Path, folder: Path) -> Iterator[Agent]:
    running = Agent(agent_binary, folder / "agent.sock")
    yield running
    assert running.proc.poll() is None, "the agent died"
    running.close()


@pytest.fixture
def session(agent: Agent) -> Iterator[AgentSession]:
    with agent.session() as opened:
        yield opened


class Conn:
    """One raw connection: ``send`` frames, ``read`` the agent's messages."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._decoder = ap.FrameDecoder()
        self._pending: list[ap.SessionMessage] = []
        self.frames: list[ap.Frame] = []

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def read(self) -> ap.SessionMessage:
        while not self._pending:
            ready, _, _ = select.select([self.sock], [], [], _TIMEOUT_S)
            assert ready, "the agent sent nothing"
            data = self.sock.recv(1 << 20)
            assert data, "the agent closed the connection"
            frames = self._decoder.feed(data)
            self.frames += frames
            self._pending += [ap.parse_session_frame(f) for f in frames]
        return self._pending.pop(0)

    def closed(self) -> bool:
        """Whether the agent hung up (after whatever it sent before)."""
        ready, _, _ = select.select([self.sock], [], [], _TIMEOUT_S)
        assert ready, "the agent neither sent nor closed"
        return self.sock.recv(1 << 16) == b""

    def run(self, id: int, *argv: str) -> tuple[bytes, bytes, int]:
        self.send(ap.exec_frame(id, argv), ap.stdin_eof_frame(id))
        out = {"stdout": b"", "stderr": b""}
        while True:
            message = self.read()
            if isinstance(message, ap.Output) and message.id == id:
                out[message.stream] += message.data
            elif isinstance(message, ap.Exit) and message.id == id:
                return out["stdout"], out["stderr"], message.status
            elif not isinstance(message, ap.StdinAck):
                raise AssertionError(f"unexpected {message}")


@pytest.fixture
def conn(agent: Agent) -> Iterator[Conn]:
    opened = Conn(agent.connect())
    assert opened.read() == ap.Ready(ap.AGENT_VERSION)
    yield opened
    opened.sock.close()


class Collect:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.data = b""

    def __call__(self, data: bytes) -> None:
        self.data += data


# --- the agent's constants and frame types are the codec's ------------------------------------


def test_the_agent_and_the_codec_agree_on_frame_types_and_constants() -> None:
    source = AGENT_SOURCE.read_text()
    in_c = {name: int(value) for name, value in re.findall(r"\bT_(\w+) = (\d+),", source)}
    assert in_c == {kind.name: kind.value for kind in ap.FrameType}
    defines = dict(re.findall(r'#define (\w+) ("[^"]*"|\S+)', source))
    assert defines["AGENT_VERSION"] == f'"{ap.AGENT_VERSION}"'
    assert int(defines["KASOU_AGENT_PORT"]) == ap.KASOU_AGENT_PORT
    assert int(defines["STREAM_CHUNK"]) == ap.STREAM_CHUNK
    assert int(defines["CHUNK"]) == ap.CHUNK
    assert int(defines["MAX_ARGS"]) == ap.MAX_ARGS
    assert defines["SPAWN_TTY"] == f"{ap.SPAWN_TTY}u"


# --- running commands --------------------------------------------------------------------------


def test_exec_returns_the_status_and_keeps_stderr_apart(session: AgentSession) -> None:
    out, err = Collect(), Collect()
    status = session.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], stdout=out, stderr=err)
    assert (status, out.data, err.data) == (3, b"out\n", b"err\n")


def test_a_program_that_cannot_start_is_an_error_and_the_session_goes_on(
    session: AgentSession,
) -> None:
    with pytest.raises(GuestError, match="cannot run /no/such/program: No such file"):
        session.exec(["/no/such/program"])
    assert session.exec(["true"]) == 0


def test_the_environment_is_added_to_the_agents(session: AgentSession) -> None:
    out = Collect()
    script = 'echo "$GREETING|$TERM|$HOME|$PATH"'
    assert session.exec(["sh", "-c", script], stdout=out, env={"GREETING": "hi there"}) == 0
    assert out.data == b"hi there|dumb|/root|/bin:/sbin:/usr/bin:/usr/sbin\n"
    out.data = b""
    session.exec(["sh", "-c", script], stdout=out, env={"HOME": "/tmp", "TERM": "vt220"})
    assert out.data == b"|vt220|/tmp|/bin:/sbin:/usr/bin:/usr/sbin\n"


def test_100_mb_of_stdout_stream_to_a_file_without_the_client_holding_them(
    session: AgentSession, agent: Agent, tmp_path: Path
) -> None:
    size = 100 << 20
    line = b"0123456789abcdef\n"
    expected = hashlib.sha256()
    whole, rest = divmod(size, len(line))
    block = line * 4096
    for _ in range(whole // 4096):
        expected.update(block)
    expected.update(line * (whole % 4096) + line[:rest])
    target = tmp_path / "out"
    with target.open("wb") as file:
        tracemalloc.start()
        try:
            status = session.exec(
                ["sh", "-c", f"yes 0123456789abcdef | head -c {size}"], stdout=file.fileno()
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status == 0
    assert target.stat().st_size == size
    with target.open("rb") as file:
        assert hashlib.file_digest(file, "sha256").hexdigest() == expected.hexdigest()
    assert peak < 4 << 20, f"the client held {peak} bytes at once"
    assert agent.peak_memory_kib() < 16 << 10


def test_vsock_frames_carry_up_to_64_kib(conn: Conn) -> None:
    # dd writes 1 MiB at once: the pipe is full (64 KiB) whenever the agent reads it.
    out, _, status = conn.run(1, "dd", "if=/dev/zero", "bs=1048576", "count=4", "status=none")
    assert (len(out), status) == (4 << 20, 0)
    sizes = [len(f.payload) - 4 for f in conn.frames if f.type == ap.FrameType.STDOUT]
    assert max(sizes) <= ap.STREAM_CHUNK
    assert len(sizes) < (4 << 20) // ap.CHUNK // 4  # mostly far over COM2's 4 KiB


def test_a_host_that_stops_reading_holds_the_command_back(agent: Agent, conn: Conn) -> None:
    size = 100 << 20
    conn.send(ap.exec_frame(1, ["sh", "-c", f"echo $$ >&2; exec head -c {size} /dev/zero"]))
    got = 0
    while not isinstance(message := conn.read(), ap.Output) or message.stream != "stderr":
        assert isinstance(message, ap.Output), message
        got += len(message.data)
    pid = int(message.data)
    # Not reading now: head must end up blocked on its full pipe, having written only what the
    # pipe, the agent's bounded queue and the socket's buffers hold.
    _wait_until(
        lambda: Path(f"/proc/{pid}/wchan").read_text().endswith("pipe_write"),
        "head blocked writing",
    )
    counts = Path(f"/proc/{pid}/io").read_text()
    written = int(counts.split("wchar:")[1].split()[0])
    assert written < 8 << 20, f"head wrote {written} bytes to a host that reads nothing"
    while True:
        message = conn.read()
        if isinstance(message, ap.Exit):
            break
        assert isinstance(message, ap.Output)
        got += len(message.data)
    assert (message.status, got) == (0, size)
    assert agent.peak_memory_kib() < 16 << 10


def test_stdin_streams_at_the_commands_pace(session: AgentSession) -> None:
    # More than the agent's 4 MiB stdin queue: only the STDIN_ACK window keeps it from ERROR.
    data = os.urandom(12 << 20)
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    digest = hashlib.sha256()
    try:
        # dd with small blocks reads slower than the host sends.
        status = session.exec(
            ["sh", "-c", "dd bs=4096 2>/dev/null | cat"], stdin=read_end, stdout=digest.update
        )
    finally:
        feeder.join()
        os.close(read_end)
    assert status == 0
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_stdin_from_a_file_object(session: AgentSession) -> None:
    out = Collect()
    assert session.exec(["wc", "-c"], stdin=BytesIO(b"x" * 300_000), stdout=out) == 0
    assert out.data.strip() == b"300000"


def test_ctrl_c_reaches_the_guest_command(session: AgentSession) -> None:
    def on_output(data: bytes) -> None:
        if b"started" in data:  # the guest's shell is up: now the user presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    status = session.exec(["sh", "-c", "echo started; exec sleep 1000"], stdout=on_output)
    assert status == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_a_raw_signal_frame_ends_a_sleep(conn: Conn) -> None:
    conn.send(ap.spawn_frame(6, ["sleep", "1000"]), ap.signal_frame(6, signal.SIGTERM))
    assert conn.read() == ap.Exit(6, 128 + signal.SIGTERM)


def test_a_local_reader_that_goes_away_ends_the_command_with_sigpipe(
    session: AgentSession,
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        assert session.exec(["yes"], stdout=write_end) == 128 + signal.SIGPIPE
    finally:
        os.close(write_end)


def test_a_timeout_kills_the_command(session: AgentSession) -> None:
    with pytest.raises(GuestError, match=r"sleep did not finish within 0\.2 s; it was killed"):
        session.exec(["sleep", "1000"], timeout=0.2)
    assert session.exec(["true"]) == 0


# --- terminals ---------------------------------------------------------------------------------


def test_tty_mode_runs_the_command_on_a_pseudo_terminal(session: AgentSession) -> None:
    out = Collect()
    assert session.exec(["sh", "-c", "tty; echo $TERM; echo err >&2"], tty=True, stdout=out) == 0
    assert re.fullmatch(rb"/dev/pts/\d+\r\nxterm\r\nerr\r\n", out.data), out.data


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_the_guest_terminal_follows_the_local_one_and_the_local_one_is_restored(
    session: AgentSession,
) -> None:
    # A pty stands in for the user's terminal: its slave is the client's stdin.
    master, slave = pty.openpty()
    try:
        _set_size(slave, 30, 100)
        before = termios.tcgetattr(slave)
        seen: list[bytes] = []
        raw_inside: list[bool] = []

        def on_output(data: bytes) -> None:
            seen.append(data)
            if b"30 100" in b"".join(seen) and not raw_inside:
                raw_inside.append(not termios.tcgetattr(slave)[3] & termios.ECHO)
                _set_size(slave, 45, 132)  # the user resizes the window ...
                os.kill(os.getpid(), signal.SIGWINCH)
                os.write(master, b"go\n")  # ... and types

        status = session.exec(
            ["sh", "-c", "stty size; read answer; echo got $answer; stty size"],
            stdin=slave,
            stdout=on_output,
            tty=True,
        )
        assert status == 0
        assert b"".join(seen).replace(b"\r\n", b"\n").endswith(b"30 100\ngo\ngot go\n45 132\n")
        assert raw_inside == [True]
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_stdin_eof_on_a_terminal_ends_the_read(session: AgentSession) -> None:
    out = Collect()
    assert session.exec(["cat"], stdin=BytesIO(b"no newline"), tty=True, stdout=out) == 0
    assert out.data.endswith(b"no newline")


def test_resize_of_a_command_without_a_terminal_is_an_error(conn: Conn) -> None:
    conn.send(ap.spawn_frame(2, ["cat"]), ap.resize_frame(2, 10, 10))
    message = conn.read()
    assert isinstance(message, ap.AgentError) and "no terminal" in message.message
    conn.send(ap.stdin_eof_frame(2))
    assert conn.read() == ap.Exit(2, 0)


# --- connections -------------------------------------------------------------------------------


def test_closing_the_connection_kills_its_commands(agent: Agent, conn: Conn) -> None:
    conn.send(ap.spawn_frame(1, ["sh", "-c", "echo $$; exec sleep 1000"]))
    message = conn.read()
    assert isinstance(message, ap.Output), message
    pidfd = os.pidfd_open(int(message.data))
    try:
        conn.sock.close()
        ready, _, _ = select.select([pidfd], [], [], _TIMEOUT_S)
        assert ready, "the command outlived its connection"
    finally:
        os.close(pidfd)
    with agent.session() as other:  # the agent itself goes on
        assert other.exec(["true"]) == 0


def test_connections_are_independent_frame_streams(agent: Agent) -> None:
    conns = [Conn(agent.connect()) for _ in range(3)]
    try:
        for each in conns:
            assert each.read() == ap.Ready(ap.AGENT_VERSION)
            each.send(ap.spawn_frame(1, ["cat"]))  # the same id on every connection
        for number, each in reversed(list(enumerate(conns))):
            each.send(ap.stdin_frame(1, b"to %d\n" % number))
        for number, each in enumerate(conns):
            assert each.read() == ap.StdinAck(1, 5)
            assert each.read() == ap.Output(1, "stdout", b"to %d\n" % number)
            each.send(ap.stdin_eof_frame(1))
            assert each.read() == ap.Exit(1, 0)
    finally:
        for each in conns:
            each.sock.close()


def test_the_seventeenth_connection_is_turned_away(agent: Agent) -> None:
    conns = [Conn(agent.connect()) for _ in range(16)]
    try:
        for each in conns:
            assert each.read() == ap.Ready(ap.AGENT_VERSION)
        extra = Conn(agent.connect())
        message = extra.read()
        assert message == ap.AgentError(0, "16 connections are open already")
        assert extra.closed()
        extra.sock.close()
        conns.pop().sock.close()
        with agent.session() as session:  # a place is free again
            assert session.exec(["true"]) == 0
    finally:
        for each in conns:
            each.sock.close()


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"\x00\x00\x00\x00rubbish", "bad frame length 0"),
        (ap.encode_frame(99, b"x"), "unexpected frame type 99"),
        (ap.encode_frame(ap.FrameType.SPAWN, b"\x00\x00\x00\x05"), "at least 16"),
        (
            ap.encode_frame(
                ap.FrameType.SPAWN, bytes.fromhex("00000005 00000004 0000 0000 00000001") + b"ls\0"
            ),
            "unknown flags",
        ),
        (
            ap.encode_frame(
                ap.FrameType.SPAWN, bytes.fromhex("00000005 00000000 0000 0000 00000003") + b"ls\0"
            ),
            "fewer than argc 3",
        ),
        (
            ap.encode_frame(
                ap.FrameType.SPAWN,
                bytes.fromhex("00000005 00000000 0000 0000 00000001") + b"ls\0NOEQUALS\0",
            ),
            "not NAME=VALUE",
        ),
        (
            ap.encode_frame(
                ap.FrameType.SPAWN, bytes.fromhex("00000000 00000000 0000 0000 00000001") + b"ls\0"
            ),
            "id 0",
        ),
        (ap.encode_frame(ap.FrameType.RESIZE, b"\x00\x00\x00\x05"), "8 bytes"),
        (ap.resize_frame(404, 1, 1), "no command 404"),
    ],
)
def test_malformed_frames_get_an_error_and_nothing_else_suffers(
    agent: Agent, conn: Conn, raw: bytes, complaint: str
) -> None:
    with agent.session() as bystander:
        conn.send(raw)
        message = conn.read()
        assert isinstance(message, ap.AgentError), message
        assert complaint in message.message
        assert conn.run(12, "true") == (b"", b"", 0)
        assert bystander.exec(["true"]) == 0


# --- the CONNECT handshake ----------------------------------------------------------------------


class FakeVmm:
    """The VMM's side of a vsock device's Unix socket, as Firecracker documents it: read
    ``CONNECT <port>``, answer ``OK <hostport>`` and relay to the guest (here the agent's Unix
    socket), or hang up when nothing listens on the port."""

    def __init__(self, path: Path, agent: Agent | None, answer: bytes | None = None) -> None:
        self.path = path
        self.agent = agent
        self.answer = answer
        self.ports: list[int] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        hostports = itertools.count(1 << 30)
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._open.append(client)
            line = b""
            while not line.endswith(b"\n") and (byte := client.recv(1)):
                line += byte
            port = int(line.removeprefix(b"CONNECT ").strip())
            self.ports.append(port)
            if self.answer is not None:
                client.sendall(self.answer)
                client.close()
            elif self.agent is None or port != ap.KASOU_AGENT_PORT:
                client.close()  # nothing listens there
            else:
                guest = self.agent.connect()
                self._open.append(guest)
                client.sendall(b"OK %d\n" % next(hostports))
                for a, b in ((client, guest), (guest, client)):
                    threading.Thread(target=self._relay, args=(a, b), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for each in self._open:
            each.close()


@pytest.fixture
def vmm(folder: Path, agent: Agent) -> Iterator[FakeVmm]:
    serving = FakeVmm(folder / "vsock.sock", agent)
    yield serving
    serving.close()


def test_connect_vsock_does_the_handshake_and_hands_over_the_agents_stream(vmm: FakeVmm) -> None:
    with AgentSession(connect_vsock(vmm.path, timeout=_TIMEOUT_S)) as session:
        assert session.wait_ready(_TIMEOUT_S) == ap.AGENT_VERSION
        out = Collect()
        assert session.exec(["echo", "through the VMM"], stdout=out) == 0
    assert (vmm.ports, out.data) == ([ap.KASOU_AGENT_PORT], b"through the VMM\n")


def test_a_port_nobody_listens_on_says_the_agent_is_not_there(vmm: FakeVmm) -> None:
    with pytest.raises(AgentUnavailableError, match="the guest agent is not listening yet"):
        connect_vsock(vmm.path, port=5000, timeout=_TIMEOUT_S)


def test_a_missing_vmm_socket_says_so(folder: Path) -> None:
    with pytest.raises(HostError, match="no such socket: is the VM running with --vsock"):
        connect_vsock(folder / "nothing.sock")


def test_an_answer_that_is_not_ok_is_refused(folder: Path) -> None:
    fake = FakeVmm(folder / "odd.sock", None, answer=b"ERR busy\n")
    try:
        with pytest.raises(HostError, match="answered CONNECT 1024 with b'ERR busy"):
            connect_vsock(fake.path, timeout=_TIMEOUT_S)
    finally:
        fake.close()


# --- kasou cp ----------------------------------------------------------------------------------


def _make_tree(root: Path) -> Path:
    """dir/{sub/file (0640), exe (0755), empty/, link -> sub/file}."""
    top = root / "dir"
    (top / "sub").mkdir(parents=True)
    (top / "empty").mkdir()
    (top / "sub" / "file").write_bytes(b"hello\n" * 1000)
    (top / "sub" / "file").chmod(0o640)
    (top / "exe").write_bytes(b"#!/bin/sh\necho hi\n")
    (top / "exe").chmod(0o755)
    (top / "link").symlink_to("sub/file")
    return top


def _describe(top: Path, dir_modes: bool = True) -> dict[str, Any]:
    """What a copy must keep: each entry's type, content or target, and mode."""
    seen: dict[str, Any] = {}
    for path in sorted([top, *top.rglob("*")]):
        info = path.lstat()
        name = path.relative_to(top).as_posix()
        if stat.S_ISLNK(info.st_mode):
            seen[name] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            seen[name] = ("dir", stat.S_IMODE(info.st_mode) if dir_modes else None)
        else:
            seen[name] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return seen


def test_cp_copies_a_tree_into_the_guest_and_back(session: AgentSession, tmp_path: Path) -> None:
    top = _make_tree(tmp_path / "host")
    (top / "empty").chmod(0o750)
    guest = tmp_path / "guest"
    guest.mkdir()
    copy_to_guest(session, [top], f"{guest}/")
    assert _describe(guest / "dir") == _describe(top)  # the guest's tar keeps directory modes
    back = tmp_path / "back"
    back.mkdir()
    copy_from_guest(session, [str(guest / "dir")], back)
    # Extracted with the "data" filter: directories get default modes on the way back.
    assert _describe(back / "dir", dir_modes=False) == _describe(top, dir_modes=False)


def test_cp_renames_a_single_source(session: AgentSession, tmp_path: Path) -> None:
    source = tmp_path / "hostname"
    source.write_bytes(b"kasou\n")
    copy_to_guest(session, [source], str(tmp_path / "renamed"))
    assert (tmp_path / "renamed").read_bytes() == b"kasou\n"
    copy_from_guest(session, [str(tmp_path / "renamed")], tmp_path / "again")
    assert (tmp_path / "again").read_bytes() == b"kasou\n"


def test_cp_of_a_missing_source_fails(session: AgentSession, tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="no such file or directory"):
        copy_to_guest(session, [tmp_path / "missing"], str(tmp_path))
    with pytest.raises(CopyError, match=r"tar in the guest failed \(status 2\).*missing"):
        copy_from_guest(session, [str(tmp_path / "missing")], tmp_path)


def test_cp_of_several_sources_needs_a_directory(session: AgentSession, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(CopyError, match="is not a directory in the guest"):
        copy_to_guest(session, [tmp_path / "a", tmp_path / "a"], str(tmp_path / "nowhere"))
    with pytest.raises(CopyError, match="is not a directory"):
        copy_from_guest(session, [str(tmp_path / "a"), str(tmp_path / "a")], tmp_path / "a")


def _archive(*members: tuple[str, str, str]) -> BytesIO:
    """A tar stream of (name, kind, link target or content) entries, as a hostile guest's."""
    data = BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, BytesIO(value.encode()))
    data.seek(0)
    return data


@pytest.mark.parametrize(
    "members",
    [
        [("dir", "dir", ""), ("dir/../../escaped", "file", "x")],
        [("../escaped", "file", "x")],
        [("/tmp/escaped", "file", "x")],
        [("other/escaped", "file", "x")],
        [("dir", "dir", ""), ("dir/up", "symlink", "../.."), ("dir/up/escaped", "file", "x")],
        [("dir", "dir", ""), ("dir/abs", "symlink", "/etc/passwd")],
    ],
    ids=["dotdot-inside", "dotdot", "absolute", "elsewhere", "through-a-link", "absolute-link"],
)
def test_an_archive_from_the_guest_cannot_write_outside_the_destination(
    tmp_path: Path, members: list[tuple[str, str, str]]
) -> None:
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(CopyError, match="refused"):
        extract_archive(_archive(*members), dest, "dir")
    assert not list(tmp_path.rglob("escaped"))
    assert {p.name for p in tmp_path.rglob("*")} <= {"a", "b", "dir"}


# --- kasou exec and kasou cp, end to end -------------------------------------------------------


class FakeControl:
    """A VM's control socket that answers ``status`` (naming a vsock Unix socket or not) and
    ``exec`` (as the COM2 path would)."""

    def __init__(self, path: Path, uds: Path | None, booting: int = 0) -> None:
        self.path = path
        self.uds = uds
        self.booting = booting  # status requests answered "booting" (no VM built yet)
        self.requests: list[dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with client, client.makefile("rwb") as lines:
                for line in lines:
                    request = json.loads(line)
                    self.requests.append(request)
                    result: dict[str, Any] = {"state": "running"}
                    if request["request"] == "status" and self.booting > 0:
                        self.booting -= 1
                        result = {"state": "booting"}
                    elif request["request"] == "status" and self.uds is not None:
                        result["vsock"] = {"cid": 3, "uds": str(self.uds)}
                    if request["request"] == "exec":
                        words = " ".join(request["argv"])
                        result = {"status": 4, "stdout": f"com2: {words}\n", "stderr": ""}
                    lines.write(json.dumps({"ok": True, "result": result}).encode() + b"\n")
                    lines.flush()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def control(folder: Path, vmm: FakeVmm) -> Iterator[FakeControl]:
    serving = FakeControl(folder / "vm.sock", vmm.path)
    yield serving
    serving.close()


@pytest.fixture
def stdin_pipe() -> Iterator[Callable[[bytes], None]]:
    """fd 0 of this process on a pipe holding the given bytes, then EOF (restored after)."""
    saved = os.dup(0)

    def fill(data: bytes) -> None:
        read_end, write_end = os.pipe()
        os.write(write_end, data)
        os.close(write_end)
        os.dup2(read_end, 0)
        os.close(read_end)

    fill(b"")
    yield fill
    os.dup2(saved, 0)
    os.close(saved)


def test_kasou_exec_streams_over_vsock_with_stdin_and_status(
    control: FakeControl, stdin_pipe: Callable[[bytes], None], capfd: pytest.CaptureFixture[str]
) -> None:
    stdin_pipe(b"piped in\n")
    argv = ["exec", "--sock", str(control.path), "--", "sh", "-c", "cat; echo oops >&2; exit 5"]
    assert main(argv) == 5
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("piped in\n", "oops\n")
    assert [r["request"] for r in control.requests] == ["status"]


def test_kasou_exec_waits_for_a_booting_vm_to_name_its_vsock(
    folder: Path,
    vmm: FakeVmm,
    stdin_pipe: Callable[[bytes], None],
    capfd: pytest.CaptureFixture[str],
) -> None:
    fake = FakeControl(folder / "booting.sock", vmm.path, booting=3)
    try:
        assert main(["exec", "--sock", str(fake.path), "--", "echo", "over vsock"]) == 0
        assert capfd.readouterr().out == "over vsock\n"
        assert [r["request"] for r in fake.requests] == ["status"] * 4
    finally:
        fake.close()


def test_kasou_exec_falls_back_to_com2_without_vsock(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", StringIO(""))
    fake = FakeControl(folder / "com2.sock", None)
    try:
        assert main(["exec", "--sock", str(fake.path), "--", "uname", "-a"]) == 4
        assert capfd.readouterr().out == "com2: uname -a\n"
        assert [r["request"] for r in fake.requests] == ["status", "exec"]
        assert main(["exec", "--sock", str(fake.path), "-t", "--", "sh"]) == 2
        (line,) = capfd.readouterr().err.splitlines()
        assert line.startswith("kasou: error: tty: -t needs the VM's vsock device")
    finally:
        fake.close()


def test_kasou_cp_both_ways(control: FakeControl, tmp_path: Path) -> None:
    top = _make_tree(tmp_path / "host")
    guest = tmp_path / "guest"
    guest.mkdir()
    assert main(["cp", "--sock", str(control.path), str(top), f":{guest}/"]) == 0
    assert _describe(guest / "dir", dir_modes=False) == _describe(top, dir_modes=False)
    (tmp_path / "back").mkdir()
    assert main(["cp", "--sock", str(control.path), f":{guest}/dir", str(tmp_path / "back")]) == 0
    assert _describe(tmp_path / "back" / "dir", dir_modes=False) == _describe(top, dir_modes=False)


@pytest.mark.parametrize(
    ("paths", "says"),
    [
        (["/no/such/source", ":/tmp/"], "/no/such/source: no such file or directory"),
        ([":/no/such/source", "/tmp/"], "tar in the guest failed"),
        ([":/a", ":/b"], "not from guest to guest"),
        (["/a", "/b"], "one side must be the guest"),
        ([":/a", "/b", ":/c"], "not from guest to guest"),
        (["/tmp"], "name a source and a destination"),
    ],
)
def test_kasou_cp_errors_are_one_line_and_status_2(
    control: FakeControl, paths: list[str], says: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["cp", "--sock", str(control.path), *paths]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("kasou: error: ")
    assert says in line


def test_kasou_cp_without_vsock_says_what_it_needs(
    folder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fake = FakeControl(folder / "com2.sock", None)
    try:
        assert main(["cp", "--sock", str(fake.path), "/etc/hostname", ":/tmp/"]) == 2
        (line,) = capfd.readouterr().err.splitlines()
        assert "needs the VM's vsock device" in line
    finally:
        fake.close()
