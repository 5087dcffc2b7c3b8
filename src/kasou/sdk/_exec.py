"""Streamed exec: ``client.vms.exec_stream(name, argv)`` and its async twin, the output of a
command in the guest as it comes.

kasoud answers ``POST /v1/vms/NAME/exec?stream=true`` with one JSON object a line
(``kasou.api._exec`` has the table): ``{"stdout": ...}`` and ``{"stderr": ...}`` pieces, then
``{"exit_code": N}``, or ``{"error": ...}`` when the run failed under way. Each piece becomes an
``ExecChunk``; the status is ``exit_code`` once the stream is read to its end, and an error
line raises ``GuestFailure``. Leaving the ``with`` block early closes the connection, and
kasoud's agent connection with it: the command is killed in the guest.

::

    with client.vms.exec_stream("web", ["sh", "-c", "make 2>&1"]) as run:
        for chunk in run:
            print(chunk.data, end="")
    print("status", run.exit_code)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NamedTuple

import httpx

from kasou.errors import DaemonError
from kasou.sdk import _calls
from kasou.sdk._endpoint import unavailable
from kasou.sdk._errors import GuestFailure, error_for
from kasou.spec import PROBLEM_BASE, ExecResult, Problem, ProblemType

if TYPE_CHECKING:
    from kasou.sdk._async import AsyncClient
    from kasou.sdk._client import Client

__all__ = ["AsyncExecStream", "ExecChunk", "ExecStream"]

_LINE_MAX = 4 << 20  # kasoud sends agent frames (64 KiB at most) one a line


class ExecChunk(NamedTuple):
    """A piece of a command's output, decoded as UTF-8 (invalid bytes become U+FFFD)."""

    stream: Literal["stdout", "stderr"]
    data: str


class _Lines:
    """What the stream's lines say: chunks, then the status. Shared by both clients."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.exit_code: int | None = None

    def read(self, line: str) -> ExecChunk | None:
        if not line.strip():
            return None
        if self.exit_code is not None:
            raise self._odd(f"a line after the exit status: {line[:80]!r}")
        if len(line) > _LINE_MAX:
            raise self._odd(f"a line of {len(line)} characters")
        try:
            value = json.loads(line)
        except ValueError:
            raise self._odd(f"not JSON: {line[:80]!r}") from None
        if not isinstance(value, dict) or len(value) != 1:
            raise self._odd(f"not a one-key object: {line[:80]!r}")
        ((key, data),) = value.items()
        if key in ("stdout", "stderr") and isinstance(data, str):
            return ExecChunk(key, data)
        if key == "exit_code" and isinstance(data, int) and not isinstance(data, bool):
            self.exit_code = data
            return None
        if key == "error":
            raise GuestFailure(
                Problem(
                    type=PROBLEM_BASE + ProblemType.GUEST.value,
                    title="The guest failed the request",
                    status=502,
                    detail=f"{self.name}: exec: {data}",
                )
            )
        raise self._odd(f"an unknown line: {line[:80]!r}")

    def finish(self) -> int:
        if self.exit_code is None:
            raise DaemonError(
                f"{self.name}: exec: the stream ended without the command's status: did "
                "kasoud stop?"
            )
        return self.exit_code

    def _odd(self, what: str) -> DaemonError:
        return DaemonError(
            f"{self.name}: exec: kasoud's stream holds {what}: is the SDK older than kasoud?"
        )


def _collect(chunks: list[ExecChunk], exit_code: int) -> ExecResult:
    return ExecResult(
        exit_code=exit_code,
        stdout="".join(chunk.data for chunk in chunks if chunk.stream == "stdout"),
        stderr="".join(chunk.data for chunk in chunks if chunk.stream == "stderr"),
    )


def _call(name: str, argv: list[str], stdin: str, timeout: float) -> _calls.Call[ExecResult]:
    return dataclasses.replace(
        _calls.exec_(name, argv, stdin, timeout), params=(("stream", "true"),)
    )


class ExecStream:
    """A command's output as it comes: iterate for ``ExecChunk``s; ``exit_code`` once done."""

    def __init__(
        self, client: Client, name: str, argv: list[str], stdin: str, timeout: float
    ) -> None:
        call = _call(name, argv, stdin, timeout)
        self._lines = _Lines(name)
        self._client = client
        http = client._http
        try:
            request = http.build_request(
                call.method, call.path, params=call.params, json=call.json, timeout=call.timeout
            )
            self._response = http.send(request, stream=True)
        except httpx.TransportError as error:
            raise unavailable(client.endpoint, error) from error
        if self._response.is_error:
            try:
                body = self._response.read()
            finally:
                self._response.close()
            raise error_for(self._response.status_code, self._response.reason_phrase, body)
        self._text = self._response.iter_lines()

    @property
    def exit_code(self) -> int | None:
        """The command's status, once the stream has been read to its end."""
        return self._lines.exit_code

    def __iter__(self) -> Iterator[ExecChunk]:
        try:
            for line in self._text:
                chunk = self._lines.read(line)
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as error:
            raise unavailable(self._client.endpoint, error) from error
        finally:
            self.close()
        self._lines.finish()

    def result(self) -> ExecResult:
        """Read to the end: the status and the whole output, as ``vms.exec`` returns them."""
        chunks = list(self)
        return _collect(chunks, self._lines.finish())

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> ExecStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncExecStream:
    """``ExecStream`` for asyncio: ``async with client.vms.exec_stream(...) as run: async for
    chunk in run: ...``."""

    def __init__(
        self, client: AsyncClient, name: str, argv: list[str], stdin: str, timeout: float
    ) -> None:
        self._call = _call(name, argv, stdin, timeout)
        self._lines = _Lines(name)
        self._client = client
        self._response: httpx.Response | None = None

    async def open(self) -> AsyncExecStream:
        call, http = self._call, self._client._http
        try:
            request = http.build_request(
                call.method, call.path, params=call.params, json=call.json, timeout=call.timeout
            )
            response = await http.send(request, stream=True)
        except httpx.TransportError as error:
            raise unavailable(self._client.endpoint, error) from error
        if response.is_error:
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            raise error_for(response.status_code, response.reason_phrase, body)
        self._response = response
        return self

    @property
    def exit_code(self) -> int | None:
        return self._lines.exit_code

    async def __aiter__(self) -> AsyncIterator[ExecChunk]:
        if self._response is None:
            await self.open()
        assert self._response is not None
        try:
            async for line in self._response.aiter_lines():
                chunk = self._lines.read(line)
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as error:
            raise unavailable(self._client.endpoint, error) from error
        finally:
            await self.aclose()
        self._lines.finish()

    async def result(self) -> ExecResult:
        chunks = [chunk async for chunk in self]
        return _collect(chunks, self._lines.finish())

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncExecStream:
        return await self.open()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
