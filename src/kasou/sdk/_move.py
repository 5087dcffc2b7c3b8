"""Moving a running VM from one kasoud to another (``client.vms.move``), as ``virsh migrate``
does between two libvirtds: the client drives both daemons, neither knows the other.

::

    source kasoud (A)              this client                 destination kasoud (B)
    GET  vms/NAME  (running?) ◀──
                                  ──▶ GET vms/NAME             (404: the name is free)
                                  ──▶ POST vms?start           NAME, incoming=LISTEN: it
                                                               listens (created → running)
    POST vms/NAME/migrate ◀────── CONNECT (= LISTEN)
    GET  operations/ID ... ◀────── until done or failed
    DELETE vms/NAME   ◀────────── done: the VM ended here, B runs it
                                  ──▶ failed: stop, DELETE vms/NAME (B's half-made VM)

The steps are a generator of requests (``_steps``), driven by ``move`` with a ``Client``
pair or by ``amove`` with an ``AsyncClient`` pair, so the two cannot drift apart. A failure
before the source's migration completes leaves the VM running at A and nothing on B; the
destination's VM is removed only once the source says the migration failed (or it never
began), never while the VM might already run there.

The destination's record is the source's whole spec with ``incoming``: the VM arrives with
its devices (``kasou.vmm.migration``: disks named by path must exist at the same path on B,
shared storage; scratch disks are copied; TAP interfaces are opened by the same name), and
once it runs there B drops ``incoming``, so a restart there boots it from its kernel or
image, or as the default guest, like any VM (``boot_after_arrival`` says so for the default
guest, whose spec has no boot fields). B checks at create that the spec's files are there: a
missing one is an ``InvalidSpec`` before anything starts. A VM that was itself restored, or
one that arrived with nothing to boot from, moves with its name, size, ACPI flag, limits,
labels and restart policy only, and waits for a migration again when started there. This
module does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from kasou.errors import KasouError
from kasou.sdk import _calls
from kasou.sdk._backups import migrate_call
from kasou.sdk._calls import Call
from kasou.sdk._endpoint import Endpoint
from kasou.sdk._errors import (
    ApiError,
    Conflict,
    GuestFailure,
    InvalidSpec,
    InvalidState,
    NotFound,
    error_for,
    invalid_spec,
)
from kasou.spec import (
    PROBLEM_BASE,
    Operation,
    OperationState,
    Problem,
    ProblemType,
    VmInfo,
    VmSpec,
    VmState,
)

if TYPE_CHECKING:
    from kasou.sdk._async import AsyncClient
    from kasou.sdk._client import Client

__all__ = ["amove", "connect_url", "destination_spec", "move"]

Progress = Callable[[Operation], None]
_POLL = 0.1  # between looks at the migration's operation
_CANCEL_WAIT = 60.0  # after a cancel, for the source to say how the migration ended
_WILDCARDS = ("0.0.0.0", "::", "")


class _Side(enum.Enum):
    SOURCE = 0
    DESTINATION = 1


@dataclasses.dataclass(frozen=True)
class _Ask:
    """Send ``call`` to one side's kasoud; the answer (or its error) comes back."""

    side: _Side
    call: Call[Any]


@dataclasses.dataclass(frozen=True)
class _Pause:
    seconds: float


_Step = _Ask | _Pause
_Steps = Generator[_Step, Any, VmInfo]


def destination_spec(spec: VmSpec, listen: str) -> VmSpec:
    """The VM to declare on the destination, waiting on ``listen`` for the migration:
    ``spec`` whole, for the cold boots after it arrived (``boot_after_arrival``: from its
    boot fields, or as the default guest); or, for a restored VM or one that arrived with
    nothing to boot from, its name, size, ACPI flag, limits, labels and restart policy (what
    boots it comes with it, each time)."""
    try:
        if spec.restore is None and (
            spec.incoming is None or spec.describes_boot() or spec.boot_after_arrival
        ):
            whole = {**spec.model_dump(), "incoming": listen, "boot_after_arrival": True}
            return VmSpec.model_validate(whole)
        return VmSpec(
            name=spec.name,
            vcpus=spec.vcpus,
            memory=spec.memory,
            acpi=spec.acpi,
            limits=spec.limits,
            restart=spec.restart,
            labels=dict(spec.labels),
            incoming=listen,
        )
    except ValidationError as error:
        raise invalid_spec(error) from None


def connect_url(listen: str, destination: str | None) -> str:
    """Where the source connects: ``listen``, with a wildcard host (``tcp://0.0.0.0:P``)
    replaced by ``destination``'s host name (None: kasoud's Unix socket, on this host)."""
    if not listen.startswith("tcp://"):
        return listen
    host, _, port = listen[len("tcp://") :].rpartition(":")
    if host.strip("[]") not in _WILDCARDS:
        return listen
    name = urlsplit(destination).hostname if destination is not None else None
    if not name:
        name = "::1" if host.startswith("[") else "127.0.0.1"
    return f"tcp://[{name}]:{port}" if ":" in name else f"tcp://{name}:{port}"


def _problem(kind: ProblemType, status: int, title: str, detail: str) -> Problem:
    return Problem(type=PROBLEM_BASE + kind.value, title=title, status=status, detail=detail)


def _steps(
    name: str,
    where: str,
    listen: str,
    connect: str,
    downtime: float,
    progress: Progress | None,
    timeout: float,
) -> _Steps:
    """The move, as requests to either side (see the module's drawing)."""
    here: VmInfo = yield _Ask(_Side.SOURCE, _calls.get(name))
    if here.state is not VmState.RUNNING:
        raise InvalidState(
            _problem(
                ProblemType.INVALID_STATE,
                409,
                "Invalid state",
                f"{name} is {here.state.value}: only a running VM moves; start or resume it",
            )
        )
    spec = destination_spec(here.spec, listen)
    try:
        yield _Ask(_Side.DESTINATION, _calls.get(name))
    except NotFound:
        pass
    else:
        raise Conflict(
            _problem(
                ProblemType.CONFLICT,
                409,
                "Conflict",
                f"kasoud on {where} has a VM named {name!r} already: remove it there or move "
                "another VM; nothing was changed",
            )
        )
    try:
        there: VmInfo = yield _Ask(_Side.DESTINATION, _calls.create(spec, True, {}))
    except InvalidSpec as error:
        raise _failure(
            error.problem,
            f"kasoud on {where} refuses {name} as declared (a kernel, image or disk must be "
            f"at the same path on both hosts); nothing was changed, {name} runs on at the "
            "source",
        ) from None
    # While False, the destination's VM holds nothing and is removed on the way out.
    sent = False
    try:
        if there.state is not VmState.RUNNING:
            raise GuestFailure(
                _problem(
                    ProblemType.GUEST,
                    502,
                    "Move failed",
                    f"the VM made on {where} to receive {name} did not wait on {listen} "
                    f"({there.state.value}: {there.message or 'no reason given'}); "
                    f"{name} runs on at the source",
                )
            )
        operation: Operation = yield _Ask(_Side.SOURCE, migrate_call(name, connect, downtime))
        sent = True
        try:
            operation = yield from _follow(name, operation, progress, timeout)
        except BaseException:  # Ctrl-C, a timeout, the source gone: cancel, learn the end
            ended = yield from _cancel(name, operation.id)
            sent = ended is None or ended.state is not OperationState.FAILED
            raise
        if operation.state is OperationState.FAILED:
            sent = False  # the source says so: the VM runs on there
            raise _failure(operation.error, f"{name} runs on at the source")
    finally:
        if not sent:
            yield from _remove_destination(name)
    # Done: the VM ended at the source; its record goes, its events stay in the source's log.
    yield _Ask(_Side.SOURCE, _calls.delete(name, True))
    arrived: VmInfo = yield _Ask(_Side.DESTINATION, _calls.get(name))
    return arrived


def _failure(problem: Problem | None, then: str) -> ApiError:
    """The SDK's exception for the operation's problem, ``then`` added to what it says."""
    problem = problem or _problem(ProblemType.GUEST, 502, "Move failed", "the migration failed")
    detail = f"{problem.detail}; {then}" if problem.detail else then
    body = problem.model_copy(update={"detail": detail}).model_dump_json().encode()
    return error_for(problem.status, problem.title, body)


def _follow(
    name: str, operation: Operation, progress: Progress | None, timeout: float
) -> Generator[_Step, Any, Operation]:
    """Poll the source's migration until it ends (``TimeoutError`` after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while operation.state is OperationState.RUNNING:
        if progress is not None:
            progress(operation)
        if time.monotonic() > deadline:
            raise TimeoutError(f"moving {name} still runs after {timeout:g} s")
        yield _Pause(_POLL)
        operation = yield _Ask(_Side.SOURCE, _calls.operation(operation.id))
    if progress is not None:
        progress(operation)
    return operation


def _cancel(name: str, operation_id: str) -> Generator[_Step, Any, Operation | None]:
    """Ask the source to give up the migration; the operation once it ended (None: it is
    not known how it ended, so nothing may be removed)."""
    try:
        yield _Ask(_Side.SOURCE, _calls.request(name, "migrate-cancel", {}))
    except KasouError:
        pass  # too late (it ends anyway), or the source is gone: the operation tells
    deadline = time.monotonic() + _CANCEL_WAIT
    try:
        operation: Operation = yield _Ask(_Side.SOURCE, _calls.operation(operation_id))
        while operation.state is OperationState.RUNNING and time.monotonic() < deadline:
            yield _Pause(_POLL)
            operation = yield _Ask(_Side.SOURCE, _calls.operation(operation_id))
    except KasouError:
        return None
    return None if operation.state is OperationState.RUNNING else operation


def _remove_destination(name: str) -> Generator[_Step, Any, None]:
    """Remove the destination's half-made VM: stopped first (one still waiting for the
    migration ends cleanly, its listening socket removed), then deleted. Best effort: the
    error that led here is the one to report."""
    try:
        yield _Ask(_Side.DESTINATION, _calls.action(name, "stop"))
    except KasouError:
        pass  # it ended already (it could not listen, or the stream broke)
    try:
        yield _Ask(_Side.DESTINATION, _calls.delete(name, True))
    except KasouError:
        pass


class _Driver:
    """Runs ``_steps`` for a client pair: ``next`` takes the last answer (or the error the
    request raised) and gives the next step, None once the move returned ``result``."""

    def __init__(
        self, name: str, endpoint: Endpoint, listen: str, connect: str | None, **options: Any
    ) -> None:
        if connect is None:
            connect = connect_url(
                listen, None if endpoint.socket is not None else endpoint.base_url
            )
        self._steps = _steps(name, endpoint.where, listen, connect, **options)
        self.result: VmInfo | None = None

    def next(self, answer: Any, failure: BaseException | None) -> _Step | None:
        try:
            if failure is not None:
                return self._steps.throw(failure)
            return self._steps.send(answer)
        except StopIteration as done:
            self.result = done.value
            return None


def move(
    source: Client,
    to: Client,
    name: str,
    *,
    listen: str,
    connect: str | None = None,
    downtime: float = 0.3,
    progress: Progress | None = None,
    timeout: float = 3600.0,
) -> VmInfo:
    """``Vms.move`` with two sync clients."""
    driver = _Driver(
        name, to.endpoint, listen, connect, downtime=downtime, progress=progress, timeout=timeout
    )
    clients = {_Side.SOURCE: source, _Side.DESTINATION: to}
    answer: Any = None
    failure: BaseException | None = None
    while (step := driver.next(answer, failure)) is not None:
        answer, failure = None, None
        try:
            if isinstance(step, _Pause):
                time.sleep(step.seconds)
            else:
                answer = clients[step.side]._run(step.call)
        except BaseException as error:  # handed to the steps: they clean up and re-raise
            failure = error
    assert driver.result is not None
    return driver.result


async def amove(
    source: AsyncClient,
    to: AsyncClient,
    name: str,
    *,
    listen: str,
    connect: str | None = None,
    downtime: float = 0.3,
    progress: Progress | None = None,
    timeout: float = 3600.0,
) -> VmInfo:
    """``AsyncVms.move`` with two async clients."""
    driver = _Driver(
        name, to.endpoint, listen, connect, downtime=downtime, progress=progress, timeout=timeout
    )
    clients = {_Side.SOURCE: source, _Side.DESTINATION: to}
    answer: Any = None
    failure: BaseException | None = None
    while (step := driver.next(answer, failure)) is not None:
        answer, failure = None, None
        try:
            if isinstance(step, _Pause):
                await asyncio.sleep(step.seconds)
            else:
                answer = await clients[step.side]._run(step.call)
        except BaseException as error:  # handed to the steps: they clean up and re-raise
            failure = error
    assert driver.result is not None
    return driver.result
