"""The asynchronous client: ``AsyncClient``, the twin of ``Client`` with the same names, each
method awaitable, the event stream an async iterator and the console an async context.

Plain requests are the same ``_calls.Call`` objects the sync client runs.
"""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import websockets.asyncio.client
import websockets.exceptions

from kasou.sdk import _calls
from kasou.sdk._backups import AsyncBackups, migrate_call
from kasou.sdk._calls import Call
from kasou.sdk._endpoint import Endpoint, resolve, unavailable
from kasou.sdk._errors import error_for
from kasou.sdk._sse import SseParser, event_from
from kasou.spec import Event, ExecResult, Operation, VmInfo, VmSpec

if TYPE_CHECKING:
    from kasou.sdk._exec import AsyncExecStream

__all__ = ["AsyncClient", "AsyncConsole", "AsyncEventStream", "AsyncFiles", "AsyncVms"]

T = TypeVar("T")

_MAX_FRAME = 1 << 20


class AsyncClient:
    """``Client`` for asyncio: ``async with kasou.AsyncClient() as client: await
    client.vms.list()``."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint = resolve(socket, base_url, token, verify)
        if transport is None and self.endpoint.socket is not None:
            transport = httpx.AsyncHTTPTransport(uds=self.endpoint.socket)
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=self.endpoint.headers(),
            timeout=timeout,
            verify=verify,
        )
        self.vms = AsyncVms(self)
        self.backups = AsyncBackups(self)
        self.files = self.vms.files

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def host(self) -> dict[str, Any]:
        return await self._run(_calls.host())

    async def metrics(self) -> str:
        return await self._run(_calls.metrics())

    def events(
        self, since: int = 0, *, vm: str | None = None, read_timeout: float | None = None
    ) -> AsyncEventStream:
        """``async for event in client.events(since):`` (``async with`` closes it)."""
        return AsyncEventStream(self, since, vm, read_timeout)

    async def event_log(
        self, since: int = 0, *, vm: str | None = None, limit: int | None = None
    ) -> builtins.list[Event]:
        return await self._run(_calls.event_log(since, vm, limit))

    async def operation(self, operation_id: str) -> Operation:
        return await self._run(_calls.operation(operation_id))

    async def _run(self, call: Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                content=call.content,
                timeout=self._http.timeout if call.timeout is None else call.timeout,
            )
        except httpx.TransportError as error:
            raise unavailable(self.endpoint, error) from error
        if response.is_error:
            raise error_for(response.status_code, response.reason_phrase, response.content)
        return call.read(response)


class AsyncFiles:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def read(self, name: str, path: str) -> bytes:
        return await self._client._run(_calls.read_file(name, path))

    async def write(self, name: str, path: str, data: bytes | str) -> None:
        content = data.encode() if isinstance(data, str) else bytes(data)
        await self._client._run(_calls.write_file(name, path, content))


class AsyncVms:
    """``Vms`` for asyncio."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self.files = AsyncFiles(client)

    async def create(
        self, spec: VmSpec | None = None, *, start: bool = False, **fields: Any
    ) -> VmInfo:
        return await self._client._run(_calls.create(spec, start, fields))

    async def list(self, labels: dict[str, str] | None = None) -> builtins.list[VmInfo]:
        return await self._client._run(_calls.list_vms(labels))

    async def get(self, name: str) -> VmInfo:
        return await self._client._run(_calls.get(name))

    async def update(self, name: str, **changes: Any) -> VmInfo:
        return await self._client._run(_calls.update(name, changes))

    async def delete(self, name: str, force: bool = False) -> None:
        await self._client._run(_calls.delete(name, force))

    async def start(self, name: str) -> VmInfo:
        return await self._client._run(_calls.action(name, "start"))

    async def stop(self, name: str) -> VmInfo:
        return await self._client._run(_calls.action(name, "stop"))

    async def shutdown(self, name: str, timeout: float = 30.0) -> VmInfo:
        return await self._client._run(_calls.shutdown(name, timeout))

    async def pause(self, name: str) -> VmInfo:
        return await self._client._run(_calls.action(name, "pause"))

    async def resume(self, name: str) -> VmInfo:
        return await self._client._run(_calls.action(name, "resume"))

    async def restart(self, name: str) -> VmInfo:
        return await self._client._run(_calls.action(name, "restart"))

    async def exec(
        self, name: str, argv: builtins.list[str], stdin: str = "", timeout: float = 60.0
    ) -> ExecResult:
        return await self._client._run(_calls.exec_(name, argv, stdin, timeout))

    def exec_stream(
        self, name: str, argv: builtins.list[str], stdin: str = "", timeout: float = 60.0
    ) -> AsyncExecStream:
        """``Vms.exec_stream`` for asyncio: ``async with client.vms.exec_stream(name, argv)
        as run: async for chunk in run: ...``."""
        from kasou.sdk._exec import AsyncExecStream

        return AsyncExecStream(self._client, name, argv, stdin, timeout)

    async def logs(self, name: str, tail: int | None = None) -> str:
        return await self._client._run(_calls.logs(name, tail))

    async def request(self, name: str, kind: str, **args: Any) -> dict[str, Any]:
        return await self._client._run(_calls.request(name, kind, args))

    async def snapshot(self, name: str, path: str) -> Operation:
        return await self._client._run(_calls.snapshot(name, path))

    async def migrate(self, name: str, url: str, downtime: float = 0.3) -> Operation:
        return await self._client._run(migrate_call(name, url, downtime))

    async def move(
        self,
        name: str,
        to: AsyncClient,
        *,
        listen: str,
        connect: str | None = None,
        downtime: float = 0.3,
        progress: Callable[[Operation], None] | None = None,
        timeout: float = 3600.0,
    ) -> VmInfo:
        """``Vms.move`` for asyncio."""
        from kasou.sdk._move import amove

        return await amove(
            self._client,
            to,
            name,
            listen=listen,
            connect=connect,
            downtime=downtime,
            progress=progress,
            timeout=timeout,
        )

    def console(self, name: str, open_timeout: float = 10.0) -> AsyncConsole:
        """``async with client.vms.console("web") as con: await con.send(b"ls\\n")``."""
        return AsyncConsole(self._client.endpoint, name, open_timeout)


class AsyncEventStream:
    """``EventStream`` for asyncio: connects on the first ``__anext__``."""

    def __init__(
        self, client: AsyncClient, since: int, vm: str | None, read_timeout: float | None
    ) -> None:
        self._client = client
        self._parser = SseParser()
        self._params = [("since", str(int(since)))]
        if vm is not None:
            self._params.append(("vm", vm))
        self._timeout = httpx.Timeout(client._http.timeout.connect, read=read_timeout)
        self._response: httpx.Response | None = None
        self._lines: Any = None
        self._closed = False

    async def _open(self) -> None:
        http = self._client._http
        request = http.build_request(
            "GET", "/v1/events", params=tuple(self._params), timeout=self._timeout
        )
        try:
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
        self._lines = response.aiter_lines()

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        if self._response is None:
            await self._open()
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                await self.aclose()
                raise
            except httpx.TransportError as error:
                await self.aclose()
                raise unavailable(self._client.endpoint, error) from error
            message = self._parser.feed(line)
            if message is not None and (event := event_from(message)) is not None:
                return event

    @property
    def last_id(self) -> int:
        return int(self._parser.last_id) if self._parser.last_id.isdigit() else 0

    async def aclose(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncConsole:
    """``Console`` for asyncio; opened by ``async with`` (or ``await console.open()``)."""

    def __init__(self, endpoint: Endpoint, name: str, open_timeout: float = 10.0) -> None:
        self._endpoint = endpoint
        self._uri = endpoint.ws_url(_calls.vm_path(name, "console"))
        self._open_timeout = open_timeout
        self._connection: websockets.asyncio.client.ClientConnection | None = None
        self._pending = b""

    async def open(self) -> AsyncConsole:
        endpoint = self._endpoint
        options: dict[str, Any] = {
            "additional_headers": endpoint.headers(),
            "open_timeout": self._open_timeout,
            "max_size": _MAX_FRAME,
            "compression": None,
        }
        try:
            if endpoint.socket is not None:
                self._connection = await websockets.asyncio.client.unix_connect(
                    endpoint.socket, self._uri, **options
                )
            else:
                self._connection = await websockets.asyncio.client.connect(
                    self._uri, ssl=endpoint.ssl_context(), **options
                )
        except websockets.exceptions.InvalidStatus as refused:
            answer = refused.response
            raise error_for(
                answer.status_code, answer.reason_phrase, bytes(answer.body or b"")
            ) from None
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as error:
            raise unavailable(endpoint, error) from error
        return self

    def _open_connection(self) -> websockets.asyncio.client.ClientConnection:
        if self._connection is None:
            raise RuntimeError("the console is not open: use `async with client.vms.console()`")
        return self._connection

    async def send(self, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else bytes(data)
        try:
            await self._open_connection().send(payload)
        except websockets.exceptions.ConnectionClosed as closed:
            raise BrokenPipeError(f"the console is closed ({closed})") from None

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next output; b"" once the console is closed; ``TimeoutError`` after
        ``timeout`` seconds without any."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        try:
            frame = await asyncio.wait_for(self._open_connection().recv(), timeout)
        except websockets.exceptions.ConnectionClosed:
            return b""
        return frame.encode() if isinstance(frame, str) else bytes(frame)

    async def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Output up to and including ``marker`` (see ``Console.read_until``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = b""
        while (end := seen.find(marker)) < 0:
            left = deadline - loop.time()
            if left <= 0:
                self._pending = seen
                raise TimeoutError(f"{marker!r} did not come within {timeout:g} s: {seen[-200:]!r}")
            try:
                chunk = await self.recv(left)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError(f"the console closed before {marker!r}: {seen[-200:]!r}")
            seen += chunk
        end += len(marker)
        self._pending = seen[end:]
        return seen[:end]

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def __aenter__(self) -> AsyncConsole:
        return await self.open()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
