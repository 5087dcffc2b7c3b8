"""The SDK's exceptions: one class per problem type the API answers with, and the failures to
reach kasoud at all.

::

    DaemonError (kasou.errors)
    ├── ApiError              kasoud answered with a problem (``.problem``, ``.status``)
    │   ├── NotFound          not-found        (404)
    │   ├── Conflict          conflict         (409: a name already taken)
    │   ├── InvalidSpec       invalid-spec     (422: the spec or the request's arguments)
    │   ├── InvalidState      invalid-state    (409: the action does not fit the VM's state)
    │   ├── TooLarge          too-large        (413)
    │   ├── Unauthorized      unauthorized     (401: no or a wrong token)
    │   ├── GuestFailure      guest            (502: the guest or its agent failed)
    │   └── ServerError       internal         (500: a bug in kasoud)
    └── DaemonUnavailable     no answer: kasoud is not running, the connection broke, a timeout

The class comes from the problem's ``type`` (RFC 9457 §3.1.1), which a client may rely on;
only an answer without a kasou type falls back on the HTTP status. This module does no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from kasou.errors import DaemonError
from kasou.spec import PROBLEM_BASE, Problem, ProblemType

__all__ = [
    "ApiError",
    "Conflict",
    "DaemonUnavailable",
    "GuestFailure",
    "InvalidSpec",
    "InvalidState",
    "NotFound",
    "ServerError",
    "TooLarge",
    "Unauthorized",
    "error_for",
    "invalid_spec",
]


class ApiError(DaemonError):
    """kasoud refused a request; ``problem`` is its problem+json answer."""

    kind: ProblemType | None = None

    def __init__(self, problem: Problem) -> None:
        text = f"{problem.title}: {problem.detail}" if problem.detail else problem.title
        super().__init__(" ".join(text.split()))  # one line, whatever the server wrote
        self.problem = problem
        self.status = problem.status


class NotFound(ApiError):
    kind = ProblemType.NOT_FOUND


class Conflict(ApiError):
    kind = ProblemType.CONFLICT


class InvalidSpec(ApiError):
    kind = ProblemType.INVALID_SPEC


class InvalidState(ApiError):
    kind = ProblemType.INVALID_STATE


class TooLarge(ApiError):
    kind = ProblemType.TOO_LARGE


class Unauthorized(ApiError):
    kind = ProblemType.UNAUTHORIZED


class GuestFailure(ApiError):
    kind = ProblemType.GUEST


class ServerError(ApiError):
    kind = ProblemType.INTERNAL


class DaemonUnavailable(DaemonError):
    """kasoud could not be reached or did not answer; the message says where and what to do."""


_BY_TYPE: dict[ProblemType, type[ApiError]] = {
    cls.kind: cls
    for cls in (
        NotFound,
        Conflict,
        InvalidSpec,
        InvalidState,
        TooLarge,
        Unauthorized,
        GuestFailure,
        ServerError,
    )
    if cls.kind is not None
}

# Answers without a kasou problem type (a proxy in between, an older kasoud): by status.
_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    404: NotFound,
    413: TooLarge,
    422: InvalidSpec,
}


def _problem(status: int, reason: str, body: bytes) -> Problem:
    """The problem in ``body``, or one made up from the status when the body is not one."""
    try:
        value: Any = json.loads(body)
        return Problem.model_validate(value)
    except (ValueError, ValidationError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return Problem(
        type="about:blank", title=reason or f"HTTP {status}", status=status, detail=text[:500]
    )


def error_for(status: int, reason: str, body: bytes) -> ApiError:
    """The exception for an error answer (status >= 400) with this body."""
    problem = _problem(status, reason, body)
    cls: type[ApiError] | None = None
    if problem.type.startswith(PROBLEM_BASE):
        try:
            cls = _BY_TYPE[ProblemType(problem.type.removeprefix(PROBLEM_BASE))]
        except ValueError:  # a type this SDK does not know yet
            cls = None
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(problem)


def invalid_spec(error: ValidationError) -> InvalidSpec:
    """A spec or an update refused before it was sent: the same error kasoud would give."""
    parts = [
        f"{'.'.join(str(part) for part in item['loc']) or 'spec'}: {item['msg']}"
        for item in error.errors()[:10]
    ]
    return InvalidSpec(
        Problem(
            type=PROBLEM_BASE + ProblemType.INVALID_SPEC.value,
            title="Invalid request",
            status=422,
            detail="; ".join(parts),
        )
    )
