"""Where kasoud is (its Unix socket, or an http(s) URL with a bearer token) and what a failure
to reach it means to the user.

Shared by the sync and the async client; no I/O here.
"""

from __future__ import annotations

import dataclasses
import os
import ssl

import httpx

from kasou.errors import ConfigError
from kasou.sdk._errors import DaemonUnavailable

__all__ = ["DEFAULT_SOCKET", "Endpoint", "resolve", "unavailable"]

DEFAULT_SOCKET = "/run/kasou/kasoud.sock"
# The host part of URLs sent over the Unix socket: kasoud ignores it, HTTP needs one.
_SOCKET_BASE = "http://kasoud"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    socket: str | None  # kasoud's Unix socket, or None for TCP
    base_url: str  # http://kasoud over the socket, else the URL given
    token: str | None
    verify: bool | str  # TLS: verify the server (True), not (False), or against this CA file

    @property
    def where(self) -> str:
        """How the user named it, for messages."""
        return self.socket if self.socket is not None else self.base_url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ws_url(self, path: str) -> str:
        """The WebSocket URL of ``path`` (ws:// or wss://, as the base is http or https)."""
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of a wss:// connection (httpx builds its own from ``verify``)."""
        if not self.base_url.startswith("https://"):
            return None
        if self.verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        cafile = self.verify if isinstance(self.verify, str) else None
        return ssl.create_default_context(cafile=cafile)


def resolve(
    socket: str | os.PathLike[str] | None,
    base_url: str | None,
    token: str | None,
    verify: bool | str = True,
) -> Endpoint:
    """The endpoint from the arguments, else $KASOU_HOST (a socket path or a URL), else the
    default socket. The token, when not given, comes from $KASOU_TOKEN."""
    if socket is not None and base_url is not None:
        raise ConfigError("base_url", "give either socket= or base_url=, not both")
    where = base_url or (os.fspath(socket) if socket is not None else None)
    where = where or os.environ.get("KASOU_HOST") or DEFAULT_SOCKET
    if token is None:
        token = os.environ.get("KASOU_TOKEN") or None
    if where.startswith(("http://", "https://")):
        return Endpoint(socket=None, base_url=where.rstrip("/"), token=token, verify=verify)
    if "://" in where:
        raise ConfigError(
            "host", f"{where!r}: give kasoud's socket path, or an http:// or https:// URL"
        )
    return Endpoint(
        socket=where.removeprefix("unix:"), base_url=_SOCKET_BASE, token=token, verify=verify
    )


def _refused_for_permission(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, PermissionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unavailable(endpoint: Endpoint, error: Exception) -> DaemonUnavailable:
    """What an httpx or websockets transport failure means, in one line."""
    where = endpoint.where
    if isinstance(error, httpx.TimeoutException | TimeoutError):
        return DaemonUnavailable(f"kasoud on {where} did not answer in time ({error or 'timeout'})")
    if isinstance(
        error, httpx.ConnectError | ConnectionRefusedError | FileNotFoundError | PermissionError
    ):
        if endpoint.socket is None:
            return DaemonUnavailable(
                f"kasoud does not answer at {where} ({error}): is it running with --tcp?"
            )
        if _refused_for_permission(error):
            return DaemonUnavailable(
                f"cannot connect to kasoud on {where}: permission denied (run as root or as "
                "a user the socket allows)"
            )
        return DaemonUnavailable(f"kasoud is not running on {where}: start it with `kasoud`")
    return DaemonUnavailable(f"the connection to kasoud on {where} broke: {error}")
