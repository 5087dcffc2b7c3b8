"""kasoud's HTTP/1.1 connections: uvicorn's h11 protocol with a request-read timeout.

uvicorn times out a connection that idles between requests (``timeout_keep_alive``) but not
one that stalls inside a request: a client that sends half its headers, or half the body it
announced, and then nothing, would hold its connection (and a file descriptor) for good.
``ReadTimeoutProtocol`` closes such a connection:

- headers: the whole head of a request must arrive within ``read_timeout`` seconds of its
  first byte (or of the connection, for the first request). A trickle does not extend it
  (a "slowloris" client), and the client gets ``408 Request Timeout`` before the close.
- body: ``read_timeout`` seconds without a byte, while the body is incomplete. While the
  route is not reading (uvicorn paused the socket: the route is busy with what came), the
  wait is the route's, not the client's, and does not count.

An ended connection reaches the route as ``http.disconnect``, so a route waiting on the body
ends too. Requests whose head and body have all arrived (an event stream, a long ``shutdown``)
are not timed here. This module is imported only by ``kasou.cli.daemon``, after its arguments
are parsed (uvicorn is a heavy import).
"""

from __future__ import annotations

import asyncio
import enum
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DEFAULT_READ_TIMEOUT", "ReadTimeoutProtocol", "with_read_timeout"]

DEFAULT_READ_TIMEOUT = 10.0

log = logging.getLogger("kasou.kasoud")

# RFC 9110 §15.5.9: the server closes a connection it did not get a full request on.
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    b"content-length: 53\r\n\r\nthe request did not arrive in time: send it at once\r\n"
)


class _Phase(enum.Enum):
    HEAD = "head"  # a request's head is awaited or partly here
    BODY = "body"  # the head is here, the body is not all here


class ReadTimeoutProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection stalled inside a request (see the module)."""

    read_timeout: float = DEFAULT_READ_TIMEOUT

    _timer: asyncio.TimerHandle | None = None
    _phase: _Phase | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update(progress=False)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update(progress=False)  # a pipelined next request may be partly here

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _current_phase(self) -> _Phase | None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return _Phase.BODY
        if state is h11.IDLE:
            # Before the first request the connection itself is a request awaited; between
            # requests uvicorn's keep-alive timer rules until a byte of the next one comes.
            buffered, _ = self.conn.trailing_data
            if self.cycle is None or buffered:
                return _Phase.HEAD
        return None

    def _ours(self) -> bool:
        """False once the connection is closing or was handed to the WebSocket protocol."""
        return not self.transport.is_closing() and self.transport.get_protocol() is self

    def _update(self, progress: bool) -> None:
        phase = self._current_phase() if self._ours() else None
        if phase is None:
            self._cancel()
        elif phase is not self._phase or (phase is _Phase.BODY and progress):
            self._arm()
        self._phase = phase

    def _arm(self) -> None:
        self._cancel()
        self._timer = self.loop.call_later(self.read_timeout, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self._ours():
            return
        phase = self._current_phase()
        if phase is None:
            return
        if phase is _Phase.BODY and self.flow.read_paused:
            self._arm()  # the route is behind, not the client
            return
        log.info(
            "closing a connection whose request %s did not arrive within %g s",
            phase.value,
            self.read_timeout,
        )
        if phase is _Phase.HEAD:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def with_read_timeout(seconds: float) -> type[ReadTimeoutProtocol]:
    """``ReadTimeoutProtocol`` with ``read_timeout`` = ``seconds`` (uvicorn takes a class)."""
    return type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout": seconds})
