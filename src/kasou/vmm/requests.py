"""The closed set of requests a running VM answers, and their replies.

Every front end (the control socket, the CLI, the SDK, tests) speaks these; none reaches into
the VM's internals. Later issues add snapshot, migrate and device requests here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kasou.errors import ConfigError

__all__ = ["Reply", "Request", "RequestKind", "parse_request"]


class RequestKind(enum.Enum):
    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


@dataclass(frozen=True)
class Request:
    kind: RequestKind


@dataclass(frozen=True)
class Reply:
    """``ok`` with a ``result``, or not ok with the error's type and message."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {"ok": True, "result": self.result}
        return {"ok": False, "error": {"type": self.error_type, "message": self.error}}


def parse_request(message: object) -> Request:
    """Validate a decoded JSON message (untrusted) into a ``Request``."""
    if not isinstance(message, dict) or not isinstance(message.get("request"), str):
        raise ConfigError("request", 'a request is a JSON object like {"request": "status"}')
    name = message["request"]
    try:
        kind = RequestKind(name)
    except ValueError:
        known = ", ".join(kind.value for kind in RequestKind)
        raise ConfigError("request", f"unknown request {name!r}: use one of {known}") from None
    extra = set(message) - {"request"}
    if extra:
        raise ConfigError("request", f"{name} takes no arguments (got {', '.join(sorted(extra))})")
    return Request(kind)
