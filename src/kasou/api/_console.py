"""``WS /v1/vms/{name}/console``: a VM's serial console over a WebSocket.

The bridge joins the WebSocket to the VM's console socket (``STATE/vms/NAME/console.sock``,
served by the VM process, ``kasou run --console sock:PATH``): bytes from the socket go out as
binary frames, and every frame from the client (binary, or text sent as UTF-8) goes to the
UART's input. What the client sees starts when it connects; the history is in ``/logs``.
When either side goes, the other is closed: the WebSocket with 1000 when the VM ended, the
socket when the client left.

It does not buffer for slow clients (the VM process drops what a slow reader cannot take,
so the vCPU never waits) or interpret the bytes (escape sequences pass through).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["bridge_console"]

log = logging.getLogger("kasou.api")

_READ_SIZE = 64 << 10

# WebSocket close codes (RFC 6455 §7.4.1).
_NORMAL = 1000
_GOING_AWAY = 1001
_UNAVAILABLE = 1011


async def _socket_to_client(reader: asyncio.StreamReader, websocket: WebSocket) -> None:
    while data := await reader.read(_READ_SIZE):
        await websocket.send_bytes(data)


async def _client_to_socket(websocket: WebSocket, writer: asyncio.StreamWriter) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            data = (message.get("text") or "").encode()
        if data:
            writer.write(data)
            await writer.drain()


async def bridge_console(websocket: WebSocket, console_sock: Path) -> None:
    """Accept ``websocket`` and join it to ``console_sock`` until either side goes."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(console_sock))
    except OSError as error:
        await websocket.accept()
        await websocket.close(_UNAVAILABLE, f"the VM's console is not there: {error.strerror}")
        return
    await websocket.accept()
    tasks = [
        asyncio.create_task(_socket_to_client(reader, websocket)),
        asyncio.create_task(_client_to_socket(websocket, writer)),
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        vm_ended = tasks[0] in done
        for task in done:
            failure = task.exception()
            if failure is not None and not isinstance(failure, WebSocketDisconnect | OSError):
                log.warning("console bridge for %s failed: %r", console_sock, failure)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if vm_ended:
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(_NORMAL, "the console closed (the VM stopped)")
    else:
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(_GOING_AWAY)
