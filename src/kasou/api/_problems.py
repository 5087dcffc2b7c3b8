"""Errors as problem+json answers (RFC 9457): which exception becomes which ``ProblemType``
and HTTP status, and the exception handlers that write them.

Every error the API gives has the same shape (``kasou.spec.Problem``) with a ``type`` under
``PROBLEM_BASE`` that a client switches on. The mapping lives here and nowhere else:

====================================  ======  ==============
what was raised                       status  type
====================================  ======  ==============
NotFoundError                         404     not-found
ConflictError                         409     conflict
SpecError, ConfigError, a body or     422     invalid-spec
query that fails validation
StateError, a VM that refused an      409     invalid-state
action in its state
GuestError (the guest or its agent)   502     guest
an unknown route                      404     not-found
a body over the limit                 413     too-large
no or a wrong bearer token            401     unauthorized
anything else                         500     internal (logged with its traceback)
====================================  ======  ==============

It does not decide which errors a route raises (the daemon does) or check tokens
(``_middleware``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kasou.client.control import RemoteError, RemoteLifecycleError
from kasou.errors import (
    ConfigError,
    ConflictError,
    GuestError,
    KasouError,
    NotFoundError,
    SpecError,
    StateError,
)
from kasou.spec import PROBLEM_BASE, Problem, ProblemType

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "install_handlers",
    "problem_body",
    "problem_for",
    "problem_response",
]

log = logging.getLogger("kasou.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
_DETAIL_MAX = 2000  # characters of a validation error's detail (it echoes parts of the body)

_TITLES = {
    ProblemType.NOT_FOUND: "Not found",
    ProblemType.CONFLICT: "Name already taken",
    ProblemType.INVALID_SPEC: "Invalid request",
    ProblemType.INVALID_STATE: "Not allowed in the current state",
    ProblemType.TOO_LARGE: "Request body too large",
    ProblemType.UNAUTHORIZED: "Unauthorized",
    ProblemType.GUEST: "The guest failed the request",
    ProblemType.INTERNAL: "Internal error",
}

# HTTP statuses without a kasou problem type (405, 406 ...) keep RFC 9457's "about:blank".
_STATUS_TYPES = {
    401: ProblemType.UNAUTHORIZED,
    404: ProblemType.NOT_FOUND,
    413: ProblemType.TOO_LARGE,
    422: ProblemType.INVALID_SPEC,
}


def problem_body(
    kind: ProblemType | None, status: int, detail: str, title: str = ""
) -> dict[str, Any]:
    """The JSON of a problem; ``kind`` None gives type ``about:blank``."""
    problem = Problem(
        type=PROBLEM_BASE + kind.value if kind is not None else "about:blank",
        title=title or (_TITLES[kind] if kind is not None else "Error"),
        status=status,
        detail=detail,
    )
    return problem.model_dump(exclude_none=True)


def problem_response(
    kind: ProblemType | None,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        problem_body(kind, status, detail),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def problem_for(error: KasouError) -> tuple[ProblemType, int]:
    """The problem type and status of an error kasou raised on purpose."""
    if isinstance(error, NotFoundError):
        return ProblemType.NOT_FOUND, 404
    if isinstance(error, ConflictError):
        return ProblemType.CONFLICT, 409
    if isinstance(error, SpecError | ConfigError):
        return ProblemType.INVALID_SPEC, 422
    if isinstance(error, StateError | RemoteLifecycleError):
        return ProblemType.INVALID_STATE, 409
    if isinstance(error, RemoteError) and error.type == "ConfigError":
        return ProblemType.INVALID_SPEC, 422  # the VM refused a request's arguments
    if isinstance(error, GuestError):
        return ProblemType.GUEST, 502
    return ProblemType.INTERNAL, 500


def _location(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("body", "limits", "cpus_quota")`` -> ``body.limits.cpus_quota``."""
    return ".".join(str(part) for part in loc) or "request"


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:10]:
        parts.append(f"{_location(item.get('loc', ()))}: {item.get('msg', 'invalid')}")
    detail = "; ".join(parts) or "the request is invalid"
    return detail if len(detail) <= _DETAIL_MAX else detail[: _DETAIL_MAX - 3] + "..."


async def _on_kasou_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, KasouError)
    kind, status = problem_for(error)
    if status >= 500 and kind is ProblemType.INTERNAL:
        log.error("%s %s failed: %s", request.method, request.url.path, error, exc_info=error)
    return problem_response(kind, status, str(error))


async def _on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return problem_response(ProblemType.INVALID_SPEC, 422, _validation_detail(error))


async def _on_http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    kind = _STATUS_TYPES.get(error.status_code)
    detail = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}: see /openapi.json"
    return problem_response(
        kind, error.status_code, detail, headers=dict(error.headers or {}) or None
    )


async def _on_unknown_error(request: Request, error: Exception) -> JSONResponse:
    # A bug in kasou: logged with its traceback; the daemon answers the next request.
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return problem_response(
        ProblemType.INTERNAL,
        500,
        f"internal error ({type(error).__name__}); kasoud logged the details",
    )


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KasouError, _on_kasou_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unknown_error)
