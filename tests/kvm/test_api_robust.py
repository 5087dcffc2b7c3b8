"""kasoud against bad clients, with raw sockets: a request that stalls half-way (head or
body, at once or a byte at a time), clients that leave in the middle of an event stream or a
console, and 200 requests at once. None of them may hold a connection for good, stop kasoud
or disturb a VM.

kasoud runs with ``--read-timeout 1`` so a stalled request is cut within seconds; the
waits are on the sockets (a ``recv`` that returns when kasoud closes), never on sleeps.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ._kasoud import Kasoud, guest_spec, remove_tmp, short_tmp

READ_TIMEOUT = 1.0
CUT_WITHIN = READ_TIMEOUT + 4.0  # the timer's second, and a loaded host's slack


def _kasoud(*extra: str) -> Iterator[Kasoud]:
    root = short_tmp()
    daemon = Kasoud(root, *extra)
    try:
        yield daemon
        assert daemon.process.poll() is None, "kasoud ended"
        daemon.remove_all()
    finally:
        assert daemon.terminate() == 0, daemon.log.read_text()
        remove_tmp(root)


@pytest.fixture
def kasoud(guest_elf: Path) -> Iterator[Kasoud]:
    yield from _kasoud("--read-timeout", f"{READ_TIMEOUT:g}")


@pytest.fixture
def busy_kasoud(guest_elf: Path) -> Iterator[Kasoud]:
    """kasoud with its default read timeout: under a crowd of client threads in this test
    process, one may take longer than a second between connecting and sending (the GIL),
    which the short timeout would rightly cut."""
    yield from _kasoud()


def _connect(kasoud: Kasoud) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CUT_WITHIN)
    sock.connect(str(kasoud.sock))
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    """What kasoud sends until it closes the connection (socket.timeout if it does not)."""
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fds_settle(kasoud: Kasoud, at_most: int, timeout: float = 10.0) -> None:
    """Wait until kasoud holds no more than ``at_most`` descriptors (connections it closed
    are released by its event loop a moment after the client left)."""
    deadline = time.monotonic() + timeout
    while (count := _open_fds(kasoud.process.pid)) > at_most:
        assert time.monotonic() < deadline, f"kasoud holds {count} fds, more than {at_most}"
        # Each request is answered after kasoud's loop has run: a cheap pause on its side.
        assert kasoud.api.get("/v1/host").status_code == 200


def _still_serves(kasoud: Kasoud) -> None:
    assert kasoud.process.poll() is None
    assert kasoud.api.get("/v1/host").status_code == 200


def test_a_connection_that_sends_nothing_is_closed(kasoud: Kasoud) -> None:
    with _connect(kasoud) as sock:
        started = time.monotonic()
        reply = _until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert READ_TIMEOUT * 0.9 <= time.monotonic() - started < CUT_WITHIN
    _still_serves(kasoud)


def test_half_a_request_head_is_cut_off(kasoud: Kasoud) -> None:
    with _connect(kasoud) as sock:
        sock.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: kasoud\r\nAccept: app")
        reply = _until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    _still_serves(kasoud)


def test_a_head_sent_a_byte_at_a_time_is_cut_off(kasoud: Kasoud) -> None:
    """A trickle does not extend the time a head may take (slowloris)."""
    head = b"GET /v1/vms HTTP/1.1\r\nHost: kasoud\r\nX-Slow: " + b"a" * 1000
    with _connect(kasoud) as sock:
        sock.settimeout(0.1)  # the pace of the trickle: a byte per wait for kasoud's answer
        started = time.monotonic()
        reply = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            break  # kasoud answered (408) or closed
        elapsed = time.monotonic() - started
    assert elapsed < CUT_WITHIN, "the trickling client was never cut off"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 ")
    _still_serves(kasoud)


def test_half_a_body_is_cut_off_and_nothing_is_made(kasoud: Kasoud) -> None:
    body = b'{"name": "half", "kernel": "/nonexistent", "memory": "16M"}'
    with _connect(kasoud) as sock:
        sock.sendall(
            b"POST /v1/vms HTTP/1.1\r\nHost: kasoud\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body[:20]
        )
        _until_closed(sock)  # no answer is owed: the request never arrived
    _still_serves(kasoud)
    assert kasoud.api.get("/v1/vms").json() == []


def test_a_body_that_keeps_coming_is_not_cut_off(kasoud: Kasoud) -> None:
    """The body timeout is for silence, not for a slow upload: a body sent in pieces, each
    within the timeout, is read whole (here it is refused for what it says, 422)."""
    body = b'{"name": "BAD NAME", "kernel": "/k", "memory": "16M", "x": "' + b"y" * 64 + b'"}'
    with _connect(kasoud) as sock:
        sock.sendall(
            b"POST /v1/vms HTTP/1.1\r\nHost: kasoud\r\ncontent-type: application/json\r\n"
            b"connection: close\r\n" + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        deadline = time.monotonic() + 2 * READ_TIMEOUT + 1  # longer than one timeout
        pieces = [body[i : i + 4] for i in range(0, len(body), 4)]
        sock.settimeout(READ_TIMEOUT / 4)
        for piece in pieces:
            sock.sendall(piece)
            if time.monotonic() < deadline:
                with pytest.raises(TimeoutError):
                    sock.recv(1)  # kasoud waits for the rest: nothing comes back yet
        sock.settimeout(CUT_WITHIN)
        reply = _until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 422 ")


def test_clients_that_leave_event_streams_free_what_they_held(busy_kasoud: Kasoud) -> None:
    kasoud = busy_kasoud
    _still_serves(kasoud)
    before = _open_fds(kasoud.process.pid)
    streams = []
    for _ in range(60):  # more than the thread pool's 40 workers
        sock = _connect(kasoud)
        sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: kasoud\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        streams.append(sock)
    _still_serves(kasoud)  # 60 open streams do not starve other requests
    for sock in streams:
        sock.close()  # mid-stream, without a word
    _fds_settle(kasoud, before + 2)
    _concurrent_requests(kasoud, 200)


def test_a_client_that_leaves_a_console_disturbs_nothing(kasoud: Kasoud) -> None:
    reply = kasoud.api.post("/v1/vms", params={"start": True}, json=guest_spec("con"))
    assert reply.status_code == 201, reply.text
    pid = reply.json()["pid"]
    before = _open_fds(kasoud.process.pid)
    for _ in range(20):
        sock = _connect(kasoud)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /v1/vms/con/console HTTP/1.1\r\nHost: kasoud\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
            + key
            + b"\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"\x82\xfe")  # half a frame header, then gone
        sock.close()
    _fds_settle(kasoud, before + 2)
    vm = kasoud.api.get("/v1/vms/con").json()
    assert (vm["state"], vm["pid"]) == ("running", pid)
    assert kasoud.api.post("/v1/vms/con/request/status").json()["state"] == "running"
    from websockets.sync.client import unix_connect

    with unix_connect(str(kasoud.sock), "ws://kasoud/v1/vms/con/console") as ws:
        ws.send(b"\r")  # the console still takes input
    _still_serves(kasoud)


def _concurrent_requests(kasoud: Kasoud, count: int) -> None:
    def one(index: int) -> int:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(kasoud.sock)),
            base_url="http://kasoud",
            timeout=60.0,
        ) as client:
            path = "/v1/vms" if index % 2 else "/v1/host"
            return client.get(path).status_code

    with ThreadPoolExecutor(max_workers=count) as pool:
        statuses = list(pool.map(one, range(count)))
    assert statuses == [200] * count


def test_two_hundred_requests_at_once(busy_kasoud: Kasoud) -> None:
    _concurrent_requests(busy_kasoud, 200)
    _still_serves(busy_kasoud)
