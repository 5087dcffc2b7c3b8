"""The control socket (kasou.vmm.control) on a real event loop, with a fake VM behind it,
talked to through kasou.client.ControlClient and raw sockets."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.client import ControlClient
from kasou.client.control import RemoteError, RemoteLifecycleError
from kasou.errors import ConfigError, GuestError, HostError, LifecycleError
from kasou.event import EventLoop
from kasou.vmm.control import MAX_CLIENTS, MAX_LINE, ControlServer, Deferred
from kasou.vmm.requests import Reply, Request, RequestKind

DEADLINE = 5.0  # seconds any wait may take before the test fails


class FakeVm:
    """Answers requests the way a VM does; ``exec`` is deferred and waits for ``gate``."""

    def __init__(self) -> None:
        self.state = "running"
        self.seen: list[Request] = []
        self.changed = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.exec_started = threading.Event()

    def handle(self, request: Request) -> Reply | Deferred:
        with self.changed:
            self.seen.append(request)
            self.changed.notify_all()
        match request.kind:
            case RequestKind.PAUSE | RequestKind.RESUME:
                wanted = "running" if request.kind is RequestKind.PAUSE else "paused"
                if self.state != wanted:
                    raise LifecycleError(self.state, wanted, request.kind.value)
                self.state = "paused" if request.kind is RequestKind.PAUSE else "running"
            case RequestKind.STOP:
                self.state = "stopped"
            case RequestKind.EXEC:
                return lambda: self._exec(request)
        return Reply(True, {"state": self.state})

    def _exec(self, request: Request) -> Reply:
        self.exec_started.set()
        if not self.gate.wait(DEADLINE):
            raise GuestError("the test never opened the gate")
        program = request.argv[0]
        if program == "missing":
            raise GuestError("the guest agent could not run missing: No such file")
        if program == "buggy":
            raise RuntimeError("a bug in the handler")
        return Reply(True, {"status": 0, "stdout": " ".join(request.argv[1:]), "stderr": ""})

    def kinds(self) -> list[str]:
        with self.changed:
            return [request.kind.value for request in self.seen]


@pytest.fixture
def folder() -> Iterator[Path]:
    # Short: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="kasou-ctl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    events = EventLoop("kasou-test-control")
    events.start()
    yield events
    events.stop()


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def server(folder: Path, loop: EventLoop, vm: FakeVm) -> Iterator[ControlServer]:
    serving = ControlServer(folder / "vm.sock", loop, vm.handle)
    yield serving
    serving.close()


class Raw:
    """A client that sends bytes as they are and reads reply lines."""

    def __init__(self, path: Path) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(DEADLINE)
        self.socket.connect(str(path))
        self._reader = self.socket.makefile("rb")

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def reply(self) -> dict[str, Any]:
        line = self._reader.readline()
        assert line.endswith(b"\n"), f"no reply line, got {line!r}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def disconnected(self) -> bool:
        try:
            return self._reader.readline() == b""
        except ConnectionResetError:
            return True  # the server closed with our unread bytes: the kernel says so

    def close(self) -> None:
        self._reader.close()
        self.socket.close()


@pytest.fixture
def raw(server: ControlServer) -> Iterator[Raw]:
    client = Raw(server.path)
    yield client
    client.close()


def _error(reply: dict[str, Any], kind: str = "ConfigError") -> str:
    assert reply["ok"] is False, reply
    assert reply["error"]["type"] == kind
    message: str = reply["error"]["message"]
    return message


# --- requests and replies -------------------------------------------------------------------


def test_a_request_gets_its_reply(server: ControlServer) -> None:
    with ControlClient(server.path, timeout=DEADLINE) as client:
        assert client.request("status") == {"state": "running"}
        assert client.request("pause") == {"state": "paused"}
        assert client.request("status") == {"state": "paused"}


def test_a_refused_request_raises_the_vms_error(server: ControlServer) -> None:
    with ControlClient(server.path, timeout=DEADLINE) as client:
        with pytest.raises(RemoteLifecycleError, match="cannot resume: the VM is running"):
            client.request("resume")
        with pytest.raises(RemoteError, match="unknown request 'reboot'") as caught:
            client.request("reboot")
        assert caught.value.type == "ConfigError"
        assert client.request("status") == {"state": "running"}  # still connected


def test_exec_is_answered_from_a_worker(server: ControlServer) -> None:
    with ControlClient(server.path, timeout=DEADLINE) as client:
        result = client.execute(["echo", "hello", "guest"], timeout=5)
        assert result == {"status": 0, "stdout": "hello guest", "stderr": ""}
        with pytest.raises(RemoteError, match="could not run missing") as caught:
            client.execute(["missing"], timeout=5)
        assert caught.value.type == "GuestError"
        assert client.request("status") == {"state": "running"}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"not json", "not a JSON request"),
        (b"\xff\xfe\xfa garbage", "not a JSON request"),
        (b"[" * 5000, "not a JSON request"),  # deeper than Python's recursion limit
        (b'["status"]', 'a request is a JSON object like {"request": "status"}'),
        (b'{"request": "reboot"}', "unknown request 'reboot'"),
        (b'{"request": "status", "verbose": true}', "status does not take verbose"),
        (b'{"request": "exec", "argv": []}', "exec needs argv"),
    ],
)
def test_a_bad_line_gets_an_error_and_the_connection_keeps_working(
    raw: Raw, vm: FakeVm, line: bytes, says: str
) -> None:
    raw.send(line + b"\n")
    assert says in _error(raw.reply())
    raw.send(b'\n  \n{"request": "status"}\n')  # blank lines get no reply
    assert raw.reply() == {"ok": True, "result": {"state": "running"}}
    assert vm.kinds() == ["status"]  # nothing bad reached the VM


def test_requests_split_across_writes_and_batched_in_one(raw: Raw) -> None:
    raw.send(b'{"requ')
    raw.send(b'est": "pause"}\n{"request": "status"}\n{"request"')
    assert raw.reply()["result"] == {"state": "paused"}
    assert raw.reply()["result"] == {"state": "paused"}
    raw.send(b': "resume"}\n')
    assert raw.reply()["result"] == {"state": "running"}


def test_an_overlong_line_is_refused_and_disconnected(raw: Raw, vm: FakeVm) -> None:
    raw.send(b"x" * (MAX_LINE + 4096))  # no newline: the server cannot wait for one forever
    assert "too long" in _error(raw.reply())
    assert raw.disconnected()
    assert vm.kinds() == []


def test_an_overlong_line_is_refused_even_when_it_is_valid_json(raw: Raw, vm: FakeVm) -> None:
    padded = b'{"request": "status"' + b" " * (MAX_LINE + 4096) + b"}\n"
    raw.send(padded)
    assert "too long" in _error(raw.reply())
    assert raw.disconnected()
    assert vm.kinds() == []


def test_the_server_outlives_a_bad_client(server: ControlServer, raw: Raw) -> None:
    raw.send(b"x" * (MAX_LINE + 1))
    raw.reply()
    with ControlClient(server.path, timeout=DEADLINE) as client:
        assert client.request("status") == {"state": "running"}


# --- deferred requests ----------------------------------------------------------------------


def test_replies_keep_request_order_when_one_is_deferred(
    server: ControlServer, raw: Raw, vm: FakeVm
) -> None:
    vm.gate.clear()
    # Both lines in one write: the server has them together and must hold the second back.
    raw.send(b'{"request": "exec", "argv": ["echo", "first"]}\n{"request": "pause"}\n')
    assert vm.exec_started.wait(DEADLINE)
    # Another client is served meanwhile: the loop is not blocked by the slow request ...
    with ControlClient(server.path, timeout=DEADLINE) as other:
        assert other.request("status") == {"state": "running"}
    # ... and by now the loop has been past the first client's second line, without serving it.
    assert vm.kinds() == ["exec", "status"]
    vm.gate.set()
    assert raw.reply()["result"]["stdout"] == "first"
    assert raw.reply()["result"] == {"state": "paused"}
    assert vm.kinds() == ["exec", "status", "pause"]


def test_a_deferred_request_that_fails_unexpectedly_still_gets_a_reply(
    raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    raw.send(b'{"request": "exec", "argv": ["buggy"]}\n')
    assert "a bug in the handler" in _error(raw.reply(), "RuntimeError")
    assert "control request failed" in caplog.text  # logged with its traceback for a report
    raw.send(b'{"request": "status"}\n')
    assert raw.reply()["ok"] is True


def test_a_client_that_leaves_during_a_deferred_request(server: ControlServer, vm: FakeVm) -> None:
    vm.gate.clear()
    leaving = Raw(server.path)
    leaving.send(b'{"request": "exec", "argv": ["echo"]}\n')
    assert vm.exec_started.wait(DEADLINE)
    leaving.close()
    vm.gate.set()
    with ControlClient(server.path, timeout=DEADLINE) as client:
        assert client.request("status") == {"state": "running"}


def test_clients_beyond_the_limit_are_turned_away(server: ControlServer) -> None:
    clients: list[ControlClient] = []
    try:
        for _ in range(MAX_CLIENTS):
            clients.append(ControlClient(server.path, timeout=DEADLINE))
            assert clients[-1].request("status") == {"state": "running"}  # accepted
        # Closed by the server before or after the request arrives: a HostError either way,
        # never a bare socket error.
        with (
            ControlClient(server.path, timeout=DEADLINE) as extra,
            pytest.raises(HostError, match=r"closed the connection|lost the connection"),
        ):
            extra.request("status")
        clients.pop().close()
        # The server frees the slot when it sees that client's end; until then a newcomer is
        # turned away like the extra one. Each try is a full round trip, so this cannot spin.
        for _ in range(100):
            with ControlClient(server.path, timeout=DEADLINE) as late:
                try:
                    assert late.request("status") == {"state": "running"}
                    break
                except HostError:
                    continue
        else:
            pytest.fail("a freed slot was never given to a new client")
    finally:
        for client in clients:
            client.close()


# --- the socket file ------------------------------------------------------------------------


def test_the_socket_file_is_private_and_removed_on_close(
    folder: Path, loop: EventLoop, vm: FakeVm
) -> None:
    path = folder / "vm.sock"
    server = ControlServer(path, loop, vm.handle)
    assert path.is_socket()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    server.close()
    assert not path.exists()
    with pytest.raises(HostError, match="no such socket: is the VM running with --api-sock"):
        ControlClient(path)


def test_a_stale_socket_file_is_replaced(folder: Path, loop: EventLoop, vm: FakeVm) -> None:
    path = folder / "vm.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # what a kasou killed with SIGKILL leaves behind
    dead.close()
    assert path.is_socket()
    server = ControlServer(path, loop, vm.handle)
    try:
        with ControlClient(path, timeout=DEADLINE) as client:
            assert client.request("status") == {"state": "running"}
    finally:
        server.close()


def test_a_live_socket_is_not_taken_over(server: ControlServer, loop: EventLoop) -> None:
    with pytest.raises(
        ConfigError, match="in use by another process: choose another path"
    ) as caught:
        ControlServer(server.path, loop, FakeVm().handle)
    assert caught.value.field == "api-sock"
    with ControlClient(server.path, timeout=DEADLINE) as client:  # the first one still serves
        assert client.request("status") == {"state": "running"}


def test_a_file_that_is_not_a_socket_is_left_alone(
    folder: Path, loop: EventLoop, vm: FakeVm
) -> None:
    path = folder / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a socket") as caught:
        ControlServer(path, loop, vm.handle)
    assert caught.value.field == "api-sock"
    assert path.read_text() == "keep me"


def test_a_folder_that_does_not_exist_is_a_config_error(
    folder: Path, loop: EventLoop, vm: FakeVm
) -> None:
    with pytest.raises(ConfigError, match="cannot listen on") as caught:
        ControlServer(folder / "missing" / "vm.sock", loop, vm.handle)
    assert caught.value.field == "api-sock"
