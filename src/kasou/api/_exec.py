"""``POST /v1/vms/{name}/exec?stream=true``: a command in the guest with its output sent as it
comes, one JSON object a line (``application/x-ndjson``)::

    {"stdout": "text"}        a piece of the command's stdout, as the agent sent it
    {"stderr": "text"}        the same for stderr
    {"exit_code": 0}          the last line: its status (128 + N after signal N)
    {"error": "message"}      the last line instead, when the run failed once under way
                              (the timeout passed and it was killed, the VM went away)

Output is UTF-8 decoded per stream with an incremental decoder, so a character cut between
two agent frames comes out whole; bytes that are not UTF-8 become U+FFFD (the same as the
plain exec's answer). Failures before the first line (the VM not running, no agent) are the
usual problem+json answers: the connection to the agent is made before the response starts.

The command runs on a connection of its own to the guest agent over the VM's vsock socket
(``kasou.client.agent``: SPAWN frames, stdin with flow control), in a thread; the lines go to
the HTTP response through a small queue, so a client that reads slowly holds the agent back
rather than making kasoud buffer. A client that goes away closes the agent connection, and the
agent kills the command (``kasou.agent.protocol``: commands die with their connection).

Not here: the plain exec that answers at the end (the daemon's, over the control socket).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from kasou.client.agent import AgentSession, AgentUnavailableError, connect_vsock
from kasou.errors import GuestError, HostError, KasouError
from kasou.spec import ExecRequest

__all__ = ["MEDIA_TYPE", "ExecStream"]

MEDIA_TYPE = "application/x-ndjson"
_AGENT_WAIT = 10.0  # an agent still starting (a VM just started) gets this long to listen
_QUEUED = 64  # lines waiting for the client; past this the agent's output waits
_DONE = object()


class _Cancelled(Exception):
    """The HTTP client went away: the command is abandoned."""


def _connect(vsock: Path, wait: float) -> tuple[socket.socket, AgentSession]:
    """A ready session on the guest agent, trying again while nothing listens yet."""
    deadline = time.monotonic() + wait
    pause = 0.05
    while True:
        try:
            sock = connect_vsock(vsock, timeout=max(1.0, deadline - time.monotonic()))
            break
        except AgentUnavailableError:
            if time.monotonic() + pause > deadline:
                raise
        # The VMM answers a port nobody listens on by hanging up: polling is the only way.
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
    session = AgentSession(sock)
    try:
        session.wait_ready(max(1.0, deadline - time.monotonic()))
    except BaseException:
        session.close()
        raise
    return sock, session


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode() + b"\n"


class ExecStream:
    """One streamed command: connected to the agent on creation (raising ``GuestError`` when
    there is none), run by iterating ``lines()``."""

    def __init__(self, api_sock: Path, request: ExecRequest) -> None:
        self._request = request
        try:
            self._socket, self._session = _connect(Path(f"{api_sock}.vsock"), _AGENT_WAIT)
        except HostError as error:  # no agent answering: the guest's side of things
            raise GuestError(str(error)) from error
        self._lines: queue.Queue[bytes | object] = queue.Queue(_QUEUED)
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kasou-exec-stream", daemon=True)

    def _sink(self, stream: Literal["stdout", "stderr"]) -> Any:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def write(data: bytes) -> None:
            if self._cancelled.is_set():
                raise _Cancelled
            text = decoder.decode(data)
            if text:
                self._lines.put(_line({stream: text}))

        return write

    def _run(self) -> None:
        request = self._request
        try:
            status = self._session.exec(
                request.argv,
                stdin=io.BytesIO(request.stdin.encode()),
                stdout=self._sink("stdout"),
                stderr=self._sink("stderr"),
                timeout=request.timeout,
                forward_signals=False,  # not the main thread: nothing to forward anyway
            )
            last = _line({"exit_code": status})
        except _Cancelled:
            last = b""
        except (KasouError, OSError) as error:
            last = _line({"error": str(error)})
        finally:
            self._session.close()
        if not self._cancelled.is_set():
            self._lines.put(last)
        self._lines.put(_DONE)

    async def lines(self) -> AsyncIterator[bytes]:
        """The response body. Cancelled (the client went away), it stops the command."""
        import anyio.to_thread

        self._thread.start()
        try:
            while True:
                # abandon_on_cancel: a get blocked when the client leaves gets _DONE later.
                item = await anyio.to_thread.run_sync(self._lines.get, abandon_on_cancel=True)
                if item is _DONE:
                    return
                assert isinstance(item, bytes)
                yield item
        finally:
            if self._thread.is_alive():
                self._cancel()

    def _cancel(self) -> None:
        """Stop the command: the agent kills it when its connection closes. Shutting the
        socket down (not closing it: the session's thread still polls it) wakes that thread."""
        self._cancelled.set()
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        # Unblock a thread waiting for room in the queue; it sees the flag next.
        with contextlib.suppress(queue.Empty):
            while True:
                self._lines.get_nowait()
