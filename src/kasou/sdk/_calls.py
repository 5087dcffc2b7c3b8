"""Every plain request the SDK makes, as data: method, route, query, body and how to read the
answer. The sync and the async client execute the same ``Call`` objects, so the two cannot
drift apart; only streams (events, the console) are written twice.

Routes and bodies follow the REST API's table (``kasou.api``); bodies are ``kasou.spec``
models, checked here before they are sent so that a bad field fails the same way whether the
SDK or kasoud finds it (``InvalidSpec``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from kasou.errors import DaemonError
from kasou.sdk._errors import NotFound, invalid_spec
from kasou.spec import (
    NAME_PATTERN,
    PROBLEM_BASE,
    Event,
    ExecRequest,
    ExecResult,
    Operation,
    Problem,
    ProblemType,
    VmInfo,
    VmSpec,
    VmUpdate,
)

__all__ = ["ACTIONS", "Call", "vm_path"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

ACTIONS = ("start", "stop", "shutdown", "pause", "resume", "restart")
_VM_LIST = TypeAdapter(list[VmInfo])
_EVENT_LIST = TypeAdapter(list[Event])
# Requests the daemon answers at once get the client's timeout; these wait on the guest.
_SLACK = 10.0
_DAEMON_SHUTDOWN = 30.0  # Daemon.shutdown's default wait


@dataclasses.dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: tuple[tuple[str, str], ...] = ()
    json: Any = None
    content: bytes | None = None
    timeout: float | None = None  # None: the client's own


def vm_path(name: str, rest: str = "") -> str:
    """``/v1/vms/NAME[/rest]``. A name no VM can have is refused here: it would otherwise
    reach another route (``..``) or be mangled on the way."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise NotFound(
            Problem(
                type=PROBLEM_BASE + ProblemType.NOT_FOUND.value,
                title="Not found",
                status=404,
                detail=f"no VM {name!r}: VM names are lower-case letters, digits and '-'",
            )
        )
    return f"/v1/vms/{name}{'/' + rest if rest else ''}"


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    def read(response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as error:
            raise _unreadable(response, error) from error

    return read


def _adapter(adapter: TypeAdapter[T]) -> Callable[[httpx.Response], T]:
    def read(response: httpx.Response) -> T:
        try:
            return adapter.validate_json(response.content)
        except ValidationError as error:
            raise _unreadable(response, error) from error

    return read


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError as error:
        raise _unreadable(response, error) from error
    if not isinstance(value, dict):
        raise _unreadable(response, TypeError(f"a JSON {type(value).__name__}, not an object"))
    return value


def _nothing(response: httpx.Response) -> None:
    return None


def _text(response: httpx.Response) -> str:
    return response.text


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _unreadable(response: httpx.Response, error: Exception) -> DaemonError:
    return DaemonError(
        f"kasoud's answer to {response.request.method} {response.request.url.path} is not what "
        f"this client expects ({error}): is the SDK older than kasoud?"
    )


def create(spec: VmSpec | None, start: bool, fields: Mapping[str, Any]) -> Call[VmInfo]:
    if spec is None:
        try:
            spec = VmSpec.model_validate(dict(fields))
        except ValidationError as error:
            raise invalid_spec(error) from None
    elif fields:
        raise TypeError("give a VmSpec or its fields as keywords, not both")
    return Call(
        "POST",
        "/v1/vms",
        _model(VmInfo),
        params=(("start", "true" if start else "false"),),
        json=spec.model_dump(mode="json"),
    )


def list_vms(labels: Mapping[str, str] | None) -> Call[list[VmInfo]]:
    params = tuple(("label", f"{key}={value}") for key, value in (labels or {}).items())
    return Call("GET", "/v1/vms", _adapter(_VM_LIST), params=params)


def get(name: str) -> Call[VmInfo]:
    return Call("GET", vm_path(name), _model(VmInfo))


def update(name: str, changes: Mapping[str, Any]) -> Call[VmInfo]:
    try:
        body = VmUpdate.model_validate(dict(changes))
    except ValidationError as error:
        raise invalid_spec(error) from None
    return Call(
        "PATCH",
        vm_path(name),
        _model(VmInfo),
        json=body.model_dump(mode="json", exclude_unset=True),
    )


def delete(name: str, force: bool) -> Call[None]:
    return Call(
        "DELETE", vm_path(name), _nothing, params=(("force", "true" if force else "false"),)
    )


def action(name: str, verb: str) -> Call[VmInfo]:
    if verb not in ACTIONS:
        raise ValueError(f"{verb!r} is not one of {', '.join(ACTIONS)}")
    return Call("POST", vm_path(name, verb), _model(VmInfo))


def shutdown(name: str, timeout: float) -> Call[VmInfo]:
    # kasoud may wait its own 30 s for the guest whatever ``timeout`` asks (a kasoud that
    # does not read the parameter): the answer is awaited for the longer of the two.
    return Call(
        "POST",
        vm_path(name, "shutdown"),
        _model(VmInfo),
        params=(("timeout", f"{timeout:g}"),),
        timeout=max(timeout, _DAEMON_SHUTDOWN) + _SLACK,
    )


def exec_(name: str, argv: list[str], stdin: str, timeout: float) -> Call[ExecResult]:
    try:
        body = ExecRequest(argv=argv, stdin=stdin, timeout=timeout)
    except ValidationError as error:
        raise invalid_spec(error) from None
    return Call(
        "POST",
        vm_path(name, "exec"),
        _model(ExecResult),
        json=body.model_dump(mode="json"),
        timeout=timeout + _SLACK,
    )


def logs(name: str, tail: int | None) -> Call[str]:
    params = () if tail is None else (("tail", str(int(tail))),)
    return Call("GET", vm_path(name, "logs"), _text, params=params)


def read_file(name: str, path: str) -> Call[bytes]:
    return Call("GET", vm_path(name, "files"), _bytes, params=(("path", path),))


def write_file(name: str, path: str, data: bytes) -> Call[None]:
    return Call("PUT", vm_path(name, "files"), _nothing, params=(("path", path),), content=data)


def request(name: str, kind: str, args: Mapping[str, Any]) -> Call[dict[str, Any]]:
    return Call(
        "POST", vm_path(name, f"request/{quote(kind, safe='')}"), _json_object, json=dict(args)
    )


def snapshot(name: str, path: str) -> Call[Operation]:
    return Call("POST", vm_path(name, "snapshots"), _model(Operation), json={"path": path})


def operation(operation_id: str) -> Call[Operation]:
    return Call("GET", f"/v1/operations/{quote(operation_id, safe='')}", _model(Operation))


def host() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/host", _json_object)


def metrics() -> Call[str]:
    return Call("GET", "/metrics", _text)


def event_log(since: int, vm: str | None, limit: int | None) -> Call[list[Event]]:
    params = [("since", str(int(since)))]
    if vm is not None:
        params.append(("vm", vm))
    if limit is not None:
        params.append(("limit", str(int(limit))))
    return Call("GET", "/v1/events/log", _adapter(_EVENT_LIST), params=tuple(params))
