"""The synchronous client: ``Client`` with its ``vms`` and ``files`` faces, the event stream and
the console.

Every plain request is a ``_calls.Call`` run by ``Client._run``; the event stream (SSE) and the
console (a WebSocket) hold a connection open and close it when their ``with`` block ends.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import websockets.exceptions
import websockets.sync.client

from kasou.sdk import _calls
from kasou.sdk._backups import Backups, migrate_call
from kasou.sdk._calls import Call
from kasou.sdk._endpoint import Endpoint, resolve, unavailable
from kasou.sdk._errors import error_for
from kasou.sdk._sse import SseParser, event_from
from kasou.spec import Event, ExecResult, Operation, VmInfo, VmSpec

if TYPE_CHECKING:
    from kasou.sdk._exec import ExecStream

__all__ = ["Client", "Console", "EventStream", "Files", "Vms"]

T = TypeVar("T")

# Console frames may carry a burst of output; kasoud sends chunks far below this.
_MAX_FRAME = 1 << 20


class Client:
    """A connection to kasoud: over its Unix socket (``socket``, else $KASOU_HOST, else
    /run/kasou/kasoud.sock) or over TCP (``base_url="https://host:port"`` with ``token``).

    ``with kasou.Client() as client: client.vms.create(name="web", start=True)``

    ``transport`` replaces httpx's (a proxy, a test double); the console's WebSocket does not
    go through it.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = resolve(socket, base_url, token, verify)
        if transport is None and self.endpoint.socket is not None:
            transport = httpx.HTTPTransport(uds=self.endpoint.socket)
        self._http = httpx.Client(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=self.endpoint.headers(),
            timeout=timeout,
            verify=verify,
        )
        self.vms = Vms(self)
        self.backups = Backups(self)
        self.files = self.vms.files

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def host(self) -> dict[str, Any]:
        """How many VMs kasoud has, how many run, its version."""
        return self._run(_calls.host())

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        return self._run(_calls.metrics())

    def events(
        self, since: int = 0, *, vm: str | None = None, read_timeout: float | None = None
    ) -> EventStream:
        """Events newer than id ``since``, as they happen (until closed, or the stream ends).
        ``read_timeout``: raise ``DaemonUnavailable`` when kasoud sends nothing for that long
        (it sends keep-alives); None waits for ever."""
        return EventStream(self, since, vm, read_timeout)

    def event_log(
        self, since: int = 0, *, vm: str | None = None, limit: int | None = None
    ) -> builtins.list[Event]:
        """Recorded events newer than id ``since``, without waiting for more."""
        return self._run(_calls.event_log(since, vm, limit))

    def operation(self, operation_id: str) -> Operation:
        """A long piece of work (a snapshot) and how far it got."""
        return self._run(_calls.operation(operation_id))

    def _run(self, call: Call[T]) -> T:
        try:
            response = self._http.request(
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


class Files:
    """Files in a running VM's guest (through its agent)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def read(self, name: str, path: str) -> bytes:
        return self._client._run(_calls.read_file(name, path))

    def write(self, name: str, path: str, data: bytes | str) -> None:
        content = data.encode() if isinstance(data, str) else bytes(data)
        self._client._run(_calls.write_file(name, path, content))


class Vms:
    """The VMs kasoud manages: declare, change, drive and remove them."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.files = Files(client)

    def create(self, spec: VmSpec | None = None, *, start: bool = False, **fields: Any) -> VmInfo:
        """Declare a VM from a ``VmSpec`` or its fields (``name=``, ``kernel=``, ...); with
        ``start`` it is started too."""
        return self._client._run(_calls.create(spec, start, fields))

    def list(self, labels: dict[str, str] | None = None) -> builtins.list[VmInfo]:
        """Every VM, or those carrying all of ``labels``."""
        return self._client._run(_calls.list_vms(labels))

    def get(self, name: str) -> VmInfo:
        return self._client._run(_calls.get(name))

    def update(self, name: str, **changes: Any) -> VmInfo:
        """Change labels, restart policy, limits (live too), vCPUs, memory or command line."""
        return self._client._run(_calls.update(name, changes))

    def delete(self, name: str, force: bool = False) -> None:
        """Remove a VM; a running one only with ``force`` (it is stopped first)."""
        self._client._run(_calls.delete(name, force))

    def start(self, name: str) -> VmInfo:
        return self._client._run(_calls.action(name, "start"))

    def stop(self, name: str) -> VmInfo:
        return self._client._run(_calls.action(name, "stop"))

    def shutdown(self, name: str, timeout: float = 30.0) -> VmInfo:
        """Press the ACPI power button and wait up to ``timeout`` for the guest to power off."""
        return self._client._run(_calls.shutdown(name, timeout))

    def pause(self, name: str) -> VmInfo:
        return self._client._run(_calls.action(name, "pause"))

    def resume(self, name: str) -> VmInfo:
        return self._client._run(_calls.action(name, "resume"))

    def restart(self, name: str) -> VmInfo:
        return self._client._run(_calls.action(name, "restart"))

    def exec(
        self, name: str, argv: builtins.list[str], stdin: str = "", timeout: float = 60.0
    ) -> ExecResult:
        """Run ``argv`` in the guest (through its agent) and return its status and output."""
        return self._client._run(_calls.exec_(name, argv, stdin, timeout))

    def exec_stream(
        self, name: str, argv: builtins.list[str], stdin: str = "", timeout: float = 60.0
    ) -> ExecStream:
        """Run ``argv`` in the guest and read its output as it comes: ``with
        client.vms.exec_stream(name, argv) as run: for chunk in run: ...``, then
        ``run.exit_code``."""
        from kasou.sdk._exec import ExecStream

        return ExecStream(self._client, name, argv, stdin, timeout)

    def logs(self, name: str, tail: int | None = None) -> str:
        """The console log, or its last ``tail`` bytes."""
        return self._client._run(_calls.logs(name, tail))

    def request(self, name: str, kind: str, **args: Any) -> dict[str, Any]:
        """Any control-socket request (limits, balloon, devices, status, rate-limit, ...)."""
        return self._client._run(_calls.request(name, kind, args))

    def snapshot(self, name: str, path: str) -> Operation:
        """Start a snapshot of the VM into folder ``path``; follow it with
        ``client.operation(op.id)``."""
        return self._client._run(_calls.snapshot(name, path))

    def migrate(self, name: str, url: str, downtime: float = 0.3) -> Operation:
        """Start sending the running VM to ``url``, where ``kasou run --incoming`` (or a VM
        with ``incoming``) listens; the operation's progress is the share of memory sent."""
        return self._client._run(migrate_call(name, url, downtime))

    def move(
        self,
        name: str,
        to: Client,
        *,
        listen: str,
        connect: str | None = None,
        downtime: float = 0.3,
        progress: Callable[[Operation], None] | None = None,
        timeout: float = 3600.0,
    ) -> VmInfo:
        """Move the running VM to the kasoud ``to`` talks to, live: a VM of the same name,
        size, limits, labels and restart policy is made there, waiting on ``listen``
        (``tcp://HOST:PORT`` or ``unix:PATH`` on that host), the VM migrates into it
        (``connect``: where this kasoud reaches ``listen``, if not the same URL), and its
        record here is removed. Returns the VM as ``to`` sees it. Any failure leaves the VM
        running here and nothing there; a name taken there is ``Conflict`` before anything
        starts. Disks named by path must be at the same path there (shared storage);
        scratch disks travel with the VM. ``progress`` gets the migration's operation as
        it goes."""
        from kasou.sdk._move import move

        return move(
            self._client,
            to,
            name,
            listen=listen,
            connect=connect,
            downtime=downtime,
            progress=progress,
            timeout=timeout,
        )

    def console(self, name: str, open_timeout: float = 10.0) -> Console:
        """The VM's serial console, both ways: ``with client.vms.console("web") as con:``."""
        return Console(self._client.endpoint, name, open_timeout)


class EventStream:
    """Events as kasoud sends them (server-sent events); iterate, and close when done (or use
    it in a ``with`` block)."""

    def __init__(
        self, client: Client, since: int, vm: str | None, read_timeout: float | None
    ) -> None:
        self._client = client
        self._parser = SseParser()
        params = [("since", str(int(since)))]
        if vm is not None:
            params.append(("vm", vm))
        timeout = httpx.Timeout(client._http.timeout.connect, read=read_timeout)
        http = client._http
        try:
            request = http.build_request("GET", "/v1/events", params=tuple(params), timeout=timeout)
            self._response = http.send(request, stream=True)
        except httpx.TransportError as error:
            raise unavailable(client.endpoint, error) from error
        if self._response.is_error:
            try:
                body = self._response.read()
            finally:
                self._response.close()
            raise error_for(self._response.status_code, self._response.reason_phrase, body)
        self._lines = self._response.iter_lines()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while True:
            try:
                line = next(self._lines)
            except StopIteration:
                self.close()
                raise
            except httpx.TransportError as error:
                self.close()
                raise unavailable(self._client.endpoint, error) from error
            message = self._parser.feed(line)
            if message is not None and (event := event_from(message)) is not None:
                return event

    @property
    def last_id(self) -> int:
        """The id of the last event read (0 before the first): resume from it with
        ``client.events(since=stream.last_id)``."""
        return int(self._parser.last_id) if self._parser.last_id.isdigit() else 0

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_console(
    endpoint: Endpoint, name: str, open_timeout: float
) -> websockets.sync.client.ClientConnection:
    """A WebSocket to ``/v1/vms/NAME/console``; refusals become the SDK's errors."""
    uri = endpoint.ws_url(_calls.vm_path(name, "console"))
    options: dict[str, Any] = {
        "additional_headers": endpoint.headers(),
        "open_timeout": open_timeout,
        "max_size": _MAX_FRAME,
        "compression": None,  # console bytes are small and latency matters
        "legacy": True,  # a plain connection that this class closes (websockets 15+ asks)
    }
    try:
        if endpoint.socket is not None:
            connection = websockets.sync.client.unix_connect(endpoint.socket, uri, **options)
        else:
            connection = websockets.sync.client.connect(uri, ssl=endpoint.ssl_context(), **options)
    except websockets.exceptions.InvalidStatus as refused:
        answer = refused.response
        raise error_for(
            answer.status_code, answer.reason_phrase, bytes(answer.body or b"")
        ) from None
    except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as error:
        raise unavailable(endpoint, error) from error
    assert isinstance(connection, websockets.sync.client.ClientConnection)
    return connection


class Console:
    """A VM's serial console: ``send`` bytes to its input, ``recv`` its output as it comes."""

    def __init__(self, endpoint: Endpoint, name: str, open_timeout: float = 10.0) -> None:
        self._connection = open_console(endpoint, name, open_timeout)
        self._pending = b""

    def send(self, data: bytes | str) -> None:
        """Type ``data`` on the console (a str is sent as UTF-8)."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        try:
            self._connection.send(payload)
        except websockets.exceptions.ConnectionClosed as closed:
            raise BrokenPipeError(f"the console is closed ({closed})") from None

    def recv(self, timeout: float | None = None) -> bytes:
        """The next output; b"" once the console is closed (the VM stopped, kasoud went
        away). Raises ``TimeoutError`` when nothing comes within ``timeout`` seconds."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        try:
            frame = self._connection.recv(timeout=timeout)
        except websockets.exceptions.ConnectionClosed:
            return b""
        return frame.encode() if isinstance(frame, str) else bytes(frame)

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Output up to and including ``marker``; what follows it stays for the next read.
        Raises ``TimeoutError`` (with what came so far) when it does not come in time, and
        ``EOFError`` when the console closes first."""
        import time

        deadline = time.monotonic() + timeout
        seen = b""
        while (end := seen.find(marker)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                self._pending = seen
                raise TimeoutError(f"{marker!r} did not come within {timeout:g} s: {seen[-200:]!r}")
            try:
                chunk = self.recv(left)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError(f"the console closed before {marker!r}: {seen[-200:]!r}")
            seen += chunk
        end += len(marker)
        self._pending = seen[end:]
        return seen[:end]

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
