"""The REST API's routes: each one translates an HTTP request into one ``Daemon`` call and
its answer into JSON (``kasou.spec`` models, so the OpenAPI schema is theirs).

Daemon calls block (a VM's process is forked, a control socket answers), so their routes are
plain ``def`` functions, which FastAPI runs in its thread pool; the event stream and the
console are ``async`` because they wait on sockets for as long as a client stays.

Not here: the rules of a VM's lifecycle (``kasou.daemon``), the error mapping
(``_problems``), the body limit and authentication (``_middleware``).
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Query, Request, WebSocket
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from kasou.api import _exec, _files
from kasou.api._backups import backup_routes
from kasou.api._console import bridge_console
from kasou.api._events import event_stream
from kasou.api._metrics import CONTENT_TYPE, new_latency_histogram, render
from kasou.api._middleware import BearerAuth, BodyLimit, RequestTimer
from kasou.api._operations import Operations
from kasou.api._problems import PROBLEM_MEDIA_TYPE, install_handlers, problem_response
from kasou.daemon import Daemon
from kasou.errors import GuestError, HostError, NotFoundError, StateError
from kasou.spec import (
    NAME_PATTERN,
    Event,
    ExecRequest,
    ExecResult,
    Operation,
    Problem,
    ProblemType,
    VmInfo,
    VmSpec,
    VmState,
    VmUpdate,
)

__all__ = ["create_app"]

WEB_DIR = Path(__file__).parent / "web"
_LOG_TAIL_MAX = 16 << 20
_SHUTDOWN_TIMEOUT_MAX = 3600.0  # an hour: a guest that takes longer is stuck


class Action(enum.StrEnum):
    """``POST /v1/vms/{name}/{action}``: the lifecycle actions, each a ``Daemon`` method."""

    START = "start"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    PAUSE = "pause"
    RESUME = "resume"
    RESTART = "restart"


class RequestKind(enum.StrEnum):
    """Control-socket requests passed through to a running VM (``kasou.vmm.requests``).
    Lifecycle requests (pause, stop, ...) are left out: they go through the daemon, which
    tracks the VM's state; snapshots have their own route, which returns an operation."""

    STATUS = "status"
    DEVICES = "devices"
    BALLOON = "balloon"
    RECLAIM = "reclaim"
    RATE_LIMIT = "rate-limit"
    LIMITS = "limits"
    MIGRATION = "migration"


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, Field(min_length=1, max_length=4096)]


class HostInfo(BaseModel):
    vms: int
    running: int
    version: str


class FileWritten(BaseModel):
    path: str
    size: int


Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="the VM's name")]

_PROBLEM = {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**_PROBLEM, "description": description}
    for status, description in {
        401: "no or a wrong bearer token (TCP listener)",
        404: "no such VM or operation",
        409: "a name already taken, or an action the VM's state does not allow",
        413: "the request body is over the limit",
        422: "the request does not validate",
        500: "a bug in kasou (logged by kasoud)",
        502: "the guest or its agent failed the request",
    }.items()
}


def _version() -> str:
    try:
        return importlib.metadata.version("kasou")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _labels(values: list[str]) -> dict[str, str] | None:
    """``["env=prod", "tier"]`` -> ``{"env": "prod", "tier": ""}``; none -> None."""
    if not values:
        return None
    labels: dict[str, str] = {}
    for value in values:
        key, _, wanted = value.partition("=")
        labels[key] = wanted
    return labels


def _read_tail(path: Path, tail: int) -> bytes:
    try:
        with path.open("rb") as log:
            size = os.fstat(log.fileno()).st_size
            log.seek(max(0, size - tail))
            return log.read(tail)
    except FileNotFoundError:
        return b""


def _running_api_sock(daemon: Daemon, name: str, action: str) -> Path:
    """The control socket of ``name``, which must be running (its agent answers only then)."""
    vm = daemon.get(name)
    if vm.state is not VmState.RUNNING:
        raise StateError(name, vm.state.value, action, VmState.RUNNING.value)
    return daemon.paths(name).api_sock


def _vm_routes(router: APIRouter, daemon: Daemon, operations: Operations) -> None:
    @router.get("/v1/vms", response_model=list[VmInfo], tags=["vms"])
    def list_vms(
        label: Annotated[list[str], Query(description="KEY=VALUE; all must match")] = [],  # noqa: B006
    ) -> list[VmInfo]:
        return daemon.list(_labels(label))

    @router.post("/v1/vms", status_code=201, response_model=VmInfo, tags=["vms"])
    def create_vm(spec: VmSpec, start: bool = False) -> VmInfo:
        return daemon.create(spec, start=start)

    @router.get("/v1/vms/{name}", response_model=VmInfo, tags=["vms"])
    def get_vm(name: Name) -> VmInfo:
        return daemon.get(name)

    @router.patch("/v1/vms/{name}", response_model=VmInfo, tags=["vms"])
    def update_vm(name: Name, update: VmUpdate) -> VmInfo:
        return daemon.update(name, update)

    @router.delete("/v1/vms/{name}", status_code=204, response_class=Response, tags=["vms"])
    def delete_vm(name: Name, force: bool = False) -> Response:
        daemon.delete(name, force=force)
        return Response(status_code=204)

    @router.get(
        "/v1/vms/{name}/logs",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "the console log"}},
        tags=["vms"],
    )
    def logs(
        name: Name,
        tail: Annotated[int, Query(ge=0, le=_LOG_TAIL_MAX, description="last bytes")] = (
            _LOG_TAIL_MAX
        ),
    ) -> Response:
        data = _read_tail(daemon.paths(name).console_log, tail)
        return Response(data, media_type="text/plain; charset=utf-8")

    @router.post(
        "/v1/vms/{name}/exec",
        response_model=ExecResult,
        responses={
            200: {
                "content": {_exec.MEDIA_TYPE: {}},
                "description": "with stream=true: one JSON object a line (api/_exec.py)",
            }
        },
        tags=["guest"],
    )
    def exec_in_guest(
        name: Name,
        request: ExecRequest,
        stream: Annotated[bool, Query(description="output as it comes, as NDJSON")] = False,
    ) -> ExecResult | StreamingResponse:
        if not stream:
            return daemon.exec(name, request)
        run = _exec.ExecStream(_running_api_sock(daemon, name, "exec"), request)
        return StreamingResponse(
            run.lines(), media_type=_exec.MEDIA_TYPE, headers={"cache-control": "no-store"}
        )

    @router.get(
        "/v1/vms/{name}/files",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}, "description": "bytes"}},
        tags=["guest"],
    )
    def read_file(
        name: Name, path: Annotated[str, Query(min_length=1, max_length=4096)]
    ) -> StreamingResponse:
        api_sock = _running_api_sock(daemon, name, "read a file from")
        try:
            content: IO[bytes] = _files.read_guest_file(api_sock, path)
        except HostError as error:  # no agent answering: the guest's side
            raise GuestError(str(error)) from error
        return StreamingResponse(
            iter(lambda: content.read(1 << 16), b""),
            media_type="application/octet-stream",
            background=BackgroundTask(content.close),
        )

    @router.put(
        "/v1/vms/{name}/files",
        response_model=FileWritten,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
        tags=["guest"],
    )
    async def write_file(
        name: Name, path: Annotated[str, Query(min_length=1, max_length=4096)], request: Request
    ) -> FileWritten:
        import tempfile

        import anyio.to_thread

        api_sock = await anyio.to_thread.run_sync(
            _running_api_sock, daemon, name, "write a file into"
        )
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as content:
            async for piece in request.stream():  # counted by BodyLimit
                await anyio.to_thread.run_sync(content.write, piece)
            content.seek(0)
            try:
                size = await anyio.to_thread.run_sync(
                    _files.write_guest_file, api_sock, path, content
                )
            except HostError as error:
                raise GuestError(str(error)) from error
        return FileWritten(path=path, size=size)

    @router.post("/v1/vms/{name}/request/{kind}", tags=["guest"])
    def control_request(
        name: Name, kind: RequestKind, args: Annotated[dict[str, Any] | None, Body()] = None
    ) -> dict[str, Any]:
        return daemon.request(name, kind.value, **(args or {}))

    @router.post(
        "/v1/vms/{name}/snapshots", status_code=202, response_model=Operation, tags=["guest"]
    )
    def snapshot(name: Name, request: SnapshotRequest) -> Operation:
        daemon.get(name)
        return operations.start("snapshot", name, lambda: daemon.snapshot(name, request.path))

    @router.get("/v1/operations/{id}", response_model=Operation, tags=["operations"])
    def get_operation(id: Annotated[str, PathParam(max_length=64)]) -> Operation:
        return operations.get(id)

    @router.post("/v1/vms/{name}/{action}", response_model=VmInfo, tags=["vms"])
    def act(
        name: Name,
        action: Action,
        timeout: Annotated[
            float | None,
            Query(
                ge=0,
                le=_SHUTDOWN_TIMEOUT_MAX,
                description="shutdown only: seconds the guest gets to power off before it "
                "is stopped (default 30)",
            ),
        ] = None,
    ) -> VmInfo:
        # Declared after the fixed paths (exec, snapshots): Starlette tries routes in order.
        # created|stopped|failed --start--> running, running --pause--> paused, ... : the
        # table and its errors are the daemon's.
        if action is Action.SHUTDOWN and timeout is not None:
            return daemon.shutdown(name, timeout=timeout)
        method = getattr(daemon, action.value)
        result: VmInfo = method(name)
        return result

    @router.websocket("/v1/vms/{name}/console")
    async def console(websocket: WebSocket, name: str) -> None:
        import anyio.to_thread

        try:
            paths = await anyio.to_thread.run_sync(daemon.paths, name)
            await anyio.to_thread.run_sync(daemon.get, name)
        except NotFoundError as error:
            await websocket.close(4404, str(error)[:120])
            return
        await bridge_console(websocket, paths.console_sock)


def _host_routes(router: APIRouter, daemon: Daemon, app: FastAPI) -> None:
    @router.get(
        "/v1/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "SSE"}},
        tags=["events"],
    )
    def events(
        request: Request, since: Annotated[int, Query(ge=0, le=(1 << 63) - 1)] = 0
    ) -> StreamingResponse:
        resume = request.headers.get("last-event-id", "")
        if resume.isdigit():
            since = max(since, int(resume))
        return StreamingResponse(
            event_stream(daemon, since),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    @router.get("/v1/events/log", response_model=list[Event], tags=["events"])
    def event_log(
        since: Annotated[int, Query(ge=0, le=(1 << 63) - 1)] = 0,
        vm: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> list[Event]:
        return daemon.events(since=since, vm=vm, limit=limit)

    @router.get("/v1/host", response_model=HostInfo, tags=["host"])
    def host() -> HostInfo:
        vms = daemon.list()
        running = sum(1 for vm in vms if vm.state is VmState.RUNNING)
        return HostInfo(vms=len(vms), running=running, version=_version())

    latency = new_latency_histogram()
    app.add_middleware(RequestTimer, histogram=latency)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
        tags=["host"],
    )
    def metrics() -> Response:
        return Response(render(daemon, latency), media_type=CONTENT_TYPE)


def _web_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return problem_response(
                ProblemType.NOT_FOUND,
                404,
                f"the web console is not installed ({WEB_DIR} has no index.html)",
            )
        return FileResponse(page, headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR, check_dir=False), name="static")


def create_app(daemon: Daemon, token: str | None = None) -> FastAPI:
    """The API on ``daemon``. With ``token`` every request needs it as a bearer token (the TCP
    listener); without, none does (the Unix socket, guarded by its file mode)."""
    app = FastAPI(
        title="kasoud",
        version=_version(),
        description="kasou's host daemon: VMs declared, run, watched and reached.",
        responses=_ERRORS,
    )
    install_handlers(app)
    router = APIRouter()
    operations = Operations()
    backup_routes(router, daemon, operations)  # before /v1/vms/{name}/{action}
    _vm_routes(router, daemon, operations)
    _host_routes(router, daemon, app)
    app.include_router(router)
    _web_routes(app)
    # Added last, so outermost: a request without the token is turned away before its body
    # is read or counted.
    app.add_middleware(BodyLimit)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    app.state.daemon = daemon
    return app
