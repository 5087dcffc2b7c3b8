"""The Python SDK of kasoud's REST API, on httpx: ``Client`` (sync) and ``AsyncClient``, with
the same methods, replies parsed into the API's own models (``kasou.spec``).

::

    with kasou.Client() as client:               # kasoud's socket, or $KASOU_HOST
        client.vms.create(name="web", kernel="/boot/vmlinux", start=True)
        print(client.vms.exec("web", ["uname", "-a"]).stdout)
        with client.vms.console("web") as console:
            console.send(b"ls\n")
            print(console.recv(timeout=5))
        for event in client.events(since=0):    # follows until closed
            ...
    with kasou.Sandbox(template) as box:         # a throw-away clone (_sandbox)
        print(box.exec("echo hi").stdout)

Errors are ``ApiError`` subclasses chosen by the problem's type (``NotFound``,
``InvalidState``, ...; the tree is in ``_errors``), or ``DaemonUnavailable`` when kasoud does
not answer. The control-socket client of a single ``kasou run`` stays in ``kasou.client``;
this package talks only to kasoud and never imports the daemon or the VMM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kasou.sdk._client import Client, Console, EventStream
from kasou.sdk._endpoint import DEFAULT_SOCKET
from kasou.sdk._errors import (
    ApiError,
    Conflict,
    DaemonUnavailable,
    GuestFailure,
    InvalidSpec,
    InvalidState,
    NotFound,
    ServerError,
    TooLarge,
    Unauthorized,
)

if TYPE_CHECKING:
    from kasou.sdk._async import AsyncClient, AsyncConsole, AsyncEventStream
    from kasou.sdk._exec import AsyncExecStream, ExecChunk, ExecStream
    from kasou.sdk._sandbox import AsyncSandbox, Sandbox, SandboxError

__all__ = [
    "DEFAULT_SOCKET",
    "ApiError",
    "AsyncClient",
    "AsyncConsole",
    "AsyncEventStream",
    "AsyncExecStream",
    "AsyncSandbox",
    "Client",
    "Conflict",
    "Console",
    "DaemonUnavailable",
    "EventStream",
    "ExecChunk",
    "ExecStream",
    "GuestFailure",
    "InvalidSpec",
    "InvalidState",
    "NotFound",
    "Sandbox",
    "SandboxError",
    "ServerError",
    "TooLarge",
    "Unauthorized",
]

# The async twin (and asyncio with it), streamed exec and the sandbox are imported on first
# use: `kasou ps` does not need them.
_LAZY = {
    "AsyncClient": "kasou.sdk._async",
    "AsyncConsole": "kasou.sdk._async",
    "AsyncEventStream": "kasou.sdk._async",
    "AsyncExecStream": "kasou.sdk._exec",
    "ExecChunk": "kasou.sdk._exec",
    "ExecStream": "kasou.sdk._exec",
    "AsyncSandbox": "kasou.sdk._sandbox",
    "Sandbox": "kasou.sdk._sandbox",
    "SandboxError": "kasou.sdk._sandbox",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
