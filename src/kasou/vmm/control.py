"""The control socket of a running VM: JSON lines over a Unix stream socket.

Protocol (one request per line, one reply line per request, UTF-8)::

    -> {"request": "status"}
    <- {"ok": true, "result": {"state": "running", "vcpus": 2, ...}}
    -> {"request": "pause"}
    <- {"ok": false, "error": {"type": "LifecycleError", "message": "cannot pause: ..."}}

Requests are those of ``vmm/requests.py``. A request that takes long (``exec``) is answered
from a worker thread, so the event loop keeps serving the VM meanwhile; a client gets its
replies in the order it sent the requests. A line longer than 64 KiB or a client that sends
bytes that are not JSON gets an error reply (or is disconnected for an overlong line); it
never disturbs the VM. The server runs on the VM's event loop; the socket file is removed
when the server closes, and a stale one left by a dead kasou is replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from kasou.errors import ConfigError, KasouError
from kasou.event import EventLoop
from kasou.event.unix import listen_unix
from kasou.vmm.requests import Reply, Request, parse_request

__all__ = ["ControlServer", "Deferred", "Handler"]

Deferred = Callable[[], Reply]  # work a handler leaves for a worker thread
Handler = Callable[[Request], "Reply | Deferred"]

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_CLIENTS = 32


class ControlServer:
    """Serves ``Request``s from ``path`` on ``loop`` by calling ``handle``."""

    def __init__(self, path: Path, loop: EventLoop, handle: Handler) -> None:
        self.path = path
        self._loop = loop
        self._handle = handle
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        # A worker may finish after ``close`` (kasou exiting while it waited), when the loop
        # may be stopped: it hands the client back to the loop only while this says open.
        self._close_lock = threading.Lock()
        self._closed = False
        self._listener = listen_unix(path, "api-sock")
        loop.add_reader(self._listener.fileno(), self._on_accept)

    def _on_accept(self, events: int) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if len(self._clients) >= MAX_CLIENTS:
            client.close()
            return
        client.setblocking(False)
        self._clients[client.fileno()] = (client, bytearray())
        fd = client.fileno()
        self._loop.add_reader(fd, lambda events: self._on_data(fd))

    def _on_data(self, fd: int) -> None:
        client, buffer = self._clients[fd]
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        buffer += data
        self._serve_lines(fd)

    def _serve_lines(self, fd: int) -> None:
        client, buffer = self._clients[fd]
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            if len(line) > MAX_LINE:
                break  # refused below, whether it came in one read or in several
            buffer[:] = rest
            if not line.strip():
                continue
            answer = self._serve(line)
            if isinstance(answer, Reply):
                self._reply(client, answer)
                continue
            # Long work: stop reading this client until the worker has replied, so replies
            # keep the order of requests.
            self._loop.remove(fd)
            worker = threading.Thread(
                target=self._finish, args=(fd, client, answer), name="kasou-control", daemon=True
            )
            worker.start()
            return
        if len(buffer) > MAX_LINE:
            self._reply(client, Reply(False, error_type="ConfigError", error="request too long"))
            self._drop(fd)

    def _finish(self, fd: int, client: socket.socket, work: Deferred) -> None:
        try:
            reply = work()
        except Exception as error:  # answered even if it is a bug: the client waits for it
            if not isinstance(error, KasouError):
                log.exception("control request failed")
            reply = Reply(False, error_type=type(error).__name__, error=str(error))
        self._reply(client, reply)
        with self._close_lock:
            if not self._closed:
                self._loop.call_soon(lambda: self._resume(fd, client))

    def _resume(self, fd: int, client: socket.socket) -> None:
        if self._clients.get(fd, (None,))[0] is not client:
            return  # closed meanwhile
        self._loop.add_reader(fd, lambda events: self._on_data(fd))
        self._serve_lines(fd)

    def _serve(self, line: bytes) -> Reply | Deferred:
        try:
            request = parse_request(json.loads(line))
        except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
            return Reply(False, error_type="ConfigError", error=f"not a JSON request: {error}")
        except ConfigError as error:
            return Reply(False, error_type="ConfigError", error=str(error))
        try:
            return self._handle(request)
        except KasouError as error:
            return Reply(False, error_type=type(error).__name__, error=str(error))
        except Exception as error:  # a kasou bug: answer, log, keep serving
            log.exception("control request %s failed", request.kind.value)
            return Reply(False, error_type="InternalError", error=f"internal error: {error!r}")

    def _reply(self, client: socket.socket, reply: Reply) -> None:
        payload = (json.dumps(reply.to_json()) + "\n").encode()
        try:
            client.setblocking(True)
            client.settimeout(5.0)
            client.sendall(payload)
            client.setblocking(False)
        except OSError:
            pass  # the client left; its fd is dropped on its next event

    def _drop(self, fd: int) -> None:
        entry = self._clients.pop(fd, None)
        if entry is not None:
            self._loop.remove(fd)
            entry[0].close()

    def close(self) -> None:
        with self._close_lock:
            self._closed = True
        for fd in list(self._clients):
            self._drop(fd)
        self._loop.remove(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
