"""ASGI middleware in front of every route: the request body limit, bearer-token
authentication and the request-latency histogram.

They are plain ASGI callables rather than Starlette's ``BaseHTTPMiddleware`` so that a
request body is never read ahead of the route and WebSockets pass through untouched.

Not here: what a route does with the body, or which problem type an error becomes beyond the
two these answer themselves (413 too-large, 401 unauthorized).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Histogram
from starlette.exceptions import HTTPException

from kasou.api._problems import PROBLEM_MEDIA_TYPE, problem_body
from kasou.spec import ProblemType

__all__ = ["BODY_LIMIT", "FILES_BODY_LIMIT", "BodyLimit", "BearerAuth", "RequestTimer"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_LIMIT = 1 << 20
"""Bytes a request body may have: a VM spec is a few hundred."""

FILES_BODY_LIMIT = 256 << 20
"""Bytes a file sent into a guest (``PUT /v1/vms/{name}/files``) may have."""


async def _send_problem(
    send: Send, kind: ProblemType, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    import json

    body = json.dumps(problem_body(kind, status, detail)).encode()
    raw_headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _limit_for(scope: Scope) -> int:
    path: str = scope.get("path", "")
    if scope.get("method") == "PUT" and path.startswith("/v1/vms/") and path.endswith("/files"):
        return FILES_BODY_LIMIT
    return BODY_LIMIT


class BodyLimit:
    """413 too-large for a body over the route's limit. A declared Content-Length over it is
    refused before a byte is read; the bytes that arrive are counted too, since a client may
    send chunked or lie about the length."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _limit_for(scope)
        too_large = f"the request body is over the limit of {limit} bytes: send less"
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the server refuses a malformed length itself
                if declared > limit:
                    await _send_problem(
                        send, ProblemType.TOO_LARGE, 413, too_large, {"connection": "close"}
                    )
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read: FastAPI passes HTTPException on
                    # and the problem handlers turn it into 413 too-large.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)


def _is_web_page(scope: Scope) -> bool:
    """The web console's page and static files: public (they hold no data), so that a
    browser without the token still gets the page that says how to give it."""
    path = str(scope.get("path", ""))
    return (
        scope["type"] == "http"
        and scope.get("method") in ("GET", "HEAD")
        and (path == "/" or path.startswith("/static/"))
    )


class BearerAuth:
    """401 unauthorized unless the request carries ``Authorization: Bearer TOKEN`` (or, for a
    browser's WebSocket, which cannot set headers, ``?token=TOKEN``). Compared in constant
    time (hmac.compare_digest)."""

    def __init__(self, app: App, token: str) -> None:
        self.app = app
        self._token = token.encode()

    def _presented(self, scope: Scope) -> bytes | None:
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, credentials = bytes(value).partition(b" ")
                credentials = bytes(credentials)
                if scheme.lower() == b"bearer":
                    return credentials.strip()
        # A browser's WebSocket and EventSource cannot set headers: they send ?token=.
        if scope["type"] == "websocket" or scope.get("path") == "/v1/events":
            from urllib.parse import parse_qs

            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "token" in query:
                token: str = query["token"][0]
                return token.encode("latin-1")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if _is_web_page(scope):
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        if presented is not None and hmac.compare_digest(presented, self._token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accepting: the server answers the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        detail = (
            "wrong bearer token" if presented is not None else "this listener needs a bearer token"
        ) + ": send 'Authorization: Bearer TOKEN' with the token in kasoud's --token-file"
        await _send_problem(
            send, ProblemType.UNAUTHORIZED, 401, detail, {"www-authenticate": "Bearer"}
        )


class RequestTimer:
    """Observes each HTTP request's duration in ``histogram``, labelled by its route's path
    template (``/v1/vms/{name}``), so VM names do not multiply the series."""

    def __init__(self, app: App, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(method=scope.get("method", ""), route=template).observe(
                time.perf_counter() - start
            )
