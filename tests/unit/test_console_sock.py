"""COM1 on a Unix socket (``--console sock:PATH[,log=FILE]``): parsing, the socket file's
life, output fanned out to every client and to the log, a slow client losing only its own
excess, and client input reaching the UART as it takes it.

The console runs on a real event loop with real sockets; only the UART is a small fake
(``FakeSerial``) and the vCPU is the test's own thread calling ``write``.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.vmm.config import ConsoleConfig, parse_console
from kasou.vmm.console import CLIENT_BACKLOG, MAX_CLIENTS, Console

DEADLINE = 10.0  # seconds a test waits for something before it fails


class FakeSerial:
    """The UART's receive side: takes at most ``per_call`` bytes each time it is fed."""

    def __init__(self, per_call: int = 16) -> None:
        self.per_call = per_call
        self._received = bytearray()
        self._changed = threading.Condition()

    def enqueue_input(self, data: bytes) -> int:
        taken = data[: self.per_call]
        with self._changed:
            self._received += taken
            self._changed.notify_all()
        return len(taken)

    def wait_for(self, count: int) -> bytes:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._received) >= count, DEADLINE):
                raise AssertionError(f"the UART got {bytes(self._received)!r}, not {count} bytes")
            return bytes(self._received)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (state another thread changes) until it holds or DEADLINE passes."""
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"still not true after {DEADLINE} s: {what}")
        time.sleep(0.002)


def read_exactly(client: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = client.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"the console closed after {bytes(data)!r}")
        data += chunk
    return bytes(data)


class Setup:
    """A socket console on a running loop, with helpers to connect clients."""

    def __init__(self, folder: Path, log: Path | None = None) -> None:
        self.path = folder / "console.sock"
        self.log = log
        self.loop = EventLoop("kasou-test-console-sock")
        self.loop.start()
        self.serial = FakeSerial()
        self.console = Console(ConsoleConfig("sock", self.path, log), on_quit=lambda: None)
        self.console.attach(self.loop, self.serial)
        self.clients: list[socket.socket] = []

    def connect(self) -> socket.socket:
        """A client, once the console has taken it in (so it sees what is written next)."""
        before = self.console.counters()["clients"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(DEADLINE)
        client.connect(str(self.path))
        self.clients.append(client)
        wait_until(lambda: self.console.counters()["clients"] > before, "the client is accepted")
        return client

    def log_text(self) -> bytes:
        assert self.log is not None
        return self.log.read_bytes() if self.log.exists() else b""

    def close(self) -> None:
        """As ``vmm.runner.run`` ends: the loop stops first, then the console closes."""
        self.loop.stop()
        self.console.close()

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder: socket paths must stay under ~100 bytes, and pytest's are long."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def setup(folder: Path) -> Iterator[Setup]:
    made = Setup(folder, folder / "console.log")
    yield made
    made.close()
    made.close_clients()


# --- parsing ----------------------------------------------------------------------------------


def test_parse_a_socket_console(folder: Path) -> None:
    sock = folder / "c.sock"
    assert parse_console(f"sock:{sock}") == ConsoleConfig("sock", sock)
    assert parse_console(f"sock:{sock},log={folder}/c.log") == ConsoleConfig(
        "sock", sock, folder / "c.log"
    )


def test_the_other_consoles_parse_as_before() -> None:
    assert parse_console("stdio") == ConsoleConfig("stdio")
    assert parse_console("none") == ConsoleConfig("none")
    assert parse_console("file:/tmp/x.log") == ConsoleConfig("file", Path("/tmp/x.log"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sock:", "give sock:PATH[,log=FILE]"),
        ("sock:,log=/tmp/x", "give sock:PATH[,log=FILE]"),
        ("sock:{dir}/c.sock,ro", "give sock:PATH[,log=FILE]"),
        ("sock:{dir}/c.sock,log=", "log= needs a file name"),
        ("sock:{dir}/c.sock,size=4", "unknown option 'size': use log"),
        ("sock:{dir}/c.sock,log=a,log=b", "log is given twice"),
        ("sock:/nonexistent/folder/c.sock", "the folder /nonexistent/folder does not exist"),
        ("sock:/tmp/" + "x" * 100, "too long for a Unix socket"),
        ("socket:/tmp/c.sock", "use stdio, none or file:PATH, or sock:PATH[,log=FILE]"),
    ],
)
def test_bad_socket_consoles_are_refused(folder: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as caught:
        parse_console(text.replace("{dir}", str(folder)))
    assert caught.value.field == "console"


# --- the socket file --------------------------------------------------------------------------


def test_the_socket_is_private_and_removed_at_the_end(setup: Setup) -> None:
    info = setup.path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    client = setup.connect()
    setup.close()
    assert not setup.path.exists()
    assert client.recv(16) == b""  # the client sees the end
    setup.console.close()  # closing twice is harmless


def test_a_file_at_the_path_is_refused_and_kept(folder: Path) -> None:
    path = folder / "console.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket") as caught:
        Console(ConsoleConfig("sock", path), on_quit=lambda: None)
    assert caught.value.field == "console"
    assert path.read_text() == "not a socket"


def test_a_live_socket_is_refused_and_a_stale_one_replaced(folder: Path) -> None:
    path = folder / "console.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(ConfigError, match="in use by another process"):
        Console(ConsoleConfig("sock", path), on_quit=lambda: None)
    live.close()  # the file stays, nobody listens: stale
    console = Console(ConsoleConfig("sock", path), on_quit=lambda: None)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(path))  # ours now
    probe.close()
    console.close()
    assert not path.exists()


def test_a_socket_someone_else_put_at_the_path_is_left_alone(folder: Path) -> None:
    path = folder / "console.sock"
    console = Console(ConsoleConfig("sock", path), on_quit=lambda: None)
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    console.close()
    assert path.is_socket()
    other.close()


def test_a_log_that_cannot_be_opened_is_a_config_error(folder: Path) -> None:
    log = folder / "missing" / "console.log"
    with pytest.raises(ConfigError, match="cannot open the log") as caught:
        Console(ConsoleConfig("sock", folder / "c.sock", log), on_quit=lambda: None)
    assert caught.value.field == "console"
    assert not (folder / "c.sock").exists()


# --- output -----------------------------------------------------------------------------------


def test_every_client_gets_the_output_and_the_log_gets_every_byte(setup: Setup) -> None:
    assert setup.log is not None
    setup.log.write_bytes(b"earlier run\n")
    setup.console.write(b"before anyone\r\n")  # only the log has this
    wait_until(lambda: b"before anyone" in setup.log_text(), "the log has the early bytes")
    first, second = setup.connect(), setup.connect()
    for byte in b"echo: ready\r\n":  # a UART writes a byte at a time
        setup.console.write(bytes([byte]))
    assert read_exactly(first, 13) == b"echo: ready\r\n"
    assert read_exactly(second, 13) == b"echo: ready\r\n"
    wait_until(lambda: setup.log_text().endswith(b"ready\r\n"), "the log has the line")
    assert setup.log_text() == b"earlier run\nbefore anyone\r\necho: ready\r\n"


def test_the_log_is_created_private(folder: Path) -> None:
    made = Setup(folder, folder / "new.log")
    try:
        made.console.write(b"x")
        wait_until(lambda: made.log_text() == b"x", "the log has the byte")
        assert stat.S_IMODE((folder / "new.log").stat().st_mode) == 0o600
    finally:
        made.close()
        made.close_clients()


def test_output_written_before_attach_and_at_the_end_reaches_the_log(folder: Path) -> None:
    log = folder / "console.log"
    console = Console(ConsoleConfig("sock", folder / "c.sock", log), on_quit=lambda: None)
    console.write(b"early ")  # a restored guest may write before the runner attaches
    loop = EventLoop("kasou-test-console-sock")
    loop.start()
    console.attach(loop, FakeSerial())
    wait_until(lambda: log.read_bytes() == b"early ", "the early bytes are logged")
    console.write(b"last words")  # the loop may stop before it writes them: close() does
    loop.stop()
    console.close()
    assert log.read_bytes() == b"early last words"
    console.write(b"after the end")
    assert log.read_bytes() == b"early last words"


def test_a_client_that_does_not_read_loses_only_its_own_excess(setup: Setup) -> None:
    """The stalled client fills its socket and a backlog; past that its bytes are dropped
    and counted, while the writer never waits and the reading client gets every byte."""
    stalled, reader = setup.connect(), setup.connect()
    chunk_size, chunks = 64 << 10, 48  # 3 MiB, far more than a socket and a backlog hold
    stream = bytearray()
    for index in range(chunks):
        chunk = bytes([index % 251]) * chunk_size
        stream += chunk
        setup.console.write(chunk)
        # Paced by the reader, so the loop never falls a whole OUTPUT_BACKLOG behind.
        assert read_exactly(reader, chunk_size) == chunk
    dropped = setup.console.counters()["dropped"]
    assert dropped > 0
    got = read_exactly(stalled, len(stream) - dropped)
    assert got == stream[: len(got)]  # the oldest bytes, in order, then nothing
    assert len(got) >= CLIENT_BACKLOG
    stalled.settimeout(0.05)
    with pytest.raises(TimeoutError):
        stalled.recv(1)


def test_a_client_that_leaves_is_dropped_quietly(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    leaving, staying = setup.connect(), setup.connect()
    leaving.close()
    setup.console.write(b"still here\n")
    assert read_exactly(staying, 11) == b"still here\n"
    wait_until(lambda: setup.console.counters()["clients"] == 1, "the closed client is gone")
    setup.console.write(b"again\n")
    assert read_exactly(staying, 6) == b"again\n"
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_a_client_done_sending_still_gets_output(setup: Setup) -> None:
    client = setup.connect()
    client.sendall(b"ls\n")
    client.shutdown(socket.SHUT_WR)  # `echo ls | nc -U`: input ends, output is still wanted
    assert setup.serial.wait_for(3) == b"ls\n"
    setup.console.write(b"bin etc\n")
    assert read_exactly(client, 8) == b"bin etc\n"
    assert setup.console.counters()["clients"] == 1


def test_clients_past_the_limit_are_turned_away(setup: Setup) -> None:
    for _ in range(MAX_CLIENTS):
        setup.connect()
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(DEADLINE)
    extra.connect(str(setup.path))
    assert extra.recv(1) == b""
    extra.close()
    assert setup.console.counters()["clients"] == MAX_CLIENTS


# --- input ------------------------------------------------------------------------------------


def test_client_input_reaches_the_uart_as_it_takes_it(setup: Setup) -> None:
    setup.serial.per_call = 100  # less than a read: input waits and is retried
    client = setup.connect()
    message = bytes(range(256)) * 40  # raw bytes, Ctrl-A included, more than one read
    client.sendall(message)
    assert setup.serial.wait_for(len(message)) == message


def test_two_clients_both_type(setup: Setup) -> None:
    first, second = setup.connect(), setup.connect()
    first.sendall(b"abc")
    assert setup.serial.wait_for(3) == b"abc"
    second.sendall(b"xyz")
    assert setup.serial.wait_for(6) == b"abcxyz"


def test_what_a_client_sent_before_closing_is_all_fed(setup: Setup) -> None:
    setup.serial.per_call = 500
    client = setup.connect()
    message = bytes(range(256)) * 60  # more than one read while the UART takes a little
    client.sendall(message)
    client.close()
    assert setup.serial.wait_for(len(message)) == message
    wait_until(lambda: setup.console.counters()["clients"] == 0, "the client is gone")


def test_after_a_reboot_input_goes_to_the_new_uart(setup: Setup) -> None:
    client = setup.connect()
    client.sendall(b"one")
    assert setup.serial.wait_for(3) == b"one"
    rebooted = FakeSerial()
    setup.console.attach(setup.loop, rebooted)
    client.sendall(b"two")
    assert rebooted.wait_for(3) == b"two"
    setup.console.write(b"booted again\n")
    assert read_exactly(client, 13) == b"booted again\n"


def test_no_fds_are_left_open(folder: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    made = Setup(folder, folder / "console.log")
    made.connect().sendall(b"hi")
    made.console.write(b"out")
    made.serial.wait_for(2)
    made.close()
    made.close_clients()
    assert set(os.listdir("/proc/self/fd")) <= before
