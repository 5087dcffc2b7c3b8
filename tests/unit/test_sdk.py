"""The SDK of kasoud (kasou.sdk) without a daemon: how answers become models and exceptions,
how an event stream is read, and what a missing kasoud looks like.

Answers come from an ``httpx.MockTransport`` standing in for kasoud: what is under test is the
SDK's reading of them, not the transport. The SDK against a live kasoud is in
tests/kvm/test_cli_vms.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kasou.errors import DaemonError
from kasou.sdk import (
    ApiError,
    AsyncClient,
    Client,
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
from kasou.sdk._sse import SseMessage, SseParser
from kasou.spec import PROBLEM_BASE, ProblemType, VmState

Handler = Callable[[httpx.Request], httpx.Response]

VM = {
    "name": "web",
    "spec": {"name": "web", "memory": "64M", "labels": {"team": "a"}},
    "state": "running",
    "desired": "running",
    "pid": 1234,
    "created_at": 1.0,
    "started_at": 2.0,
}


def problem(kind: ProblemType | str, status: int, detail: str) -> httpx.Response:
    type_ = PROBLEM_BASE + kind.value if isinstance(kind, ProblemType) else kind
    body = {"type": type_, "title": "Something", "status": status, "detail": detail}
    return httpx.Response(
        status, content=json.dumps(body), headers={"content-type": "application/problem+json"}
    )


def client_for(handler: Handler, seen: list[httpx.Request] | None = None) -> Client:
    def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return handler(request)

    return Client("/kasoud.sock", transport=httpx.MockTransport(record))


@pytest.mark.parametrize(
    ("kind", "status", "cls"),
    [
        (ProblemType.NOT_FOUND, 404, NotFound),
        (ProblemType.CONFLICT, 409, Conflict),
        (ProblemType.INVALID_SPEC, 422, InvalidSpec),
        (ProblemType.INVALID_STATE, 409, InvalidState),
        (ProblemType.TOO_LARGE, 413, TooLarge),
        (ProblemType.UNAUTHORIZED, 401, Unauthorized),
        (ProblemType.GUEST, 502, GuestFailure),
        (ProblemType.INTERNAL, 500, ServerError),
    ],
)
def test_each_problem_type_raises_its_own_exception(
    kind: ProblemType, status: int, cls: type[ApiError]
) -> None:
    client = client_for(lambda request: problem(kind, status, "what went\nwrong"))
    with client, pytest.raises(cls) as raised:
        client.vms.get("web")
    error = raised.value
    assert type(error) is cls
    assert isinstance(error, DaemonError)  # front ends catch kasou's errors as one family
    assert error.problem.type == PROBLEM_BASE + kind.value
    assert error.status == status
    assert str(error) == "Something: what went wrong"  # one line, whatever the server wrote


def test_the_type_decides_not_the_status() -> None:
    # 409 is both conflict and invalid-state: only the type tells them apart.
    answer = problem(ProblemType.INVALID_STATE, 409, "cannot pause web: it is stopped")
    with client_for(lambda request: answer) as client, pytest.raises(InvalidState):
        client.vms.pause("web")


def test_answers_without_a_kasou_problem_fall_back_on_the_status() -> None:
    answers = iter(
        [
            httpx.Response(404, text="no such page"),  # a proxy's page, not a problem
            problem("about:blank", 405, "Method Not Allowed"),
            httpx.Response(503, text="<html>down</html>"),
            problem(PROBLEM_BASE + "from-the-future", 418, "a type this SDK does not know"),
        ]
    )
    with client_for(lambda request: next(answers)) as client:
        with pytest.raises(NotFound) as not_found:
            client.vms.get("web")
        assert not_found.value.problem.detail == "no such page"
        with pytest.raises(ApiError) as other:
            client.vms.get("web")
        assert type(other.value) is ApiError and other.value.status == 405
        with pytest.raises(ServerError):
            client.vms.get("web")
        with pytest.raises(ApiError) as unknown:
            client.vms.get("web")
        assert type(unknown.value) is ApiError
        assert "a type this SDK does not know" in str(unknown.value)


def test_replies_are_parsed_into_the_api_models() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/vms" and request.method == "GET":
            return httpx.Response(200, json=[VM])
        if request.url.path.endswith("/exec"):
            return httpx.Response(200, json={"exit_code": 3, "stdout": "out", "stderr": "err"})
        return httpx.Response(200, json=VM)

    with client_for(answer, seen) as client:
        (vm,) = client.vms.list(labels={"team": "a"})
        assert vm.state is VmState.RUNNING and vm.spec.labels == {"team": "a"}
        assert client.vms.start("web").pid == 1234
        result = client.vms.exec("web", ["false"], timeout=5)
        assert (result.exit_code, result.stdout, result.stderr) == (3, "out", "err")
    assert seen[0].url.params.get_list("label") == ["team=a"]
    assert (seen[1].method, seen[1].url.path) == ("POST", "/v1/vms/web/start")
    assert json.loads(seen[2].content) == {"argv": ["false"], "stdin": "", "timeout": 5.0}
    assert seen[2].headers["host"] == "kasoud"  # over the socket, any host will do


def test_a_reply_that_is_not_the_model_is_a_clear_error() -> None:
    client = client_for(lambda request: httpx.Response(200, json={"name": "web"}))
    with client, pytest.raises(DaemonError, match="is the SDK older than kasoud"):
        client.vms.get("web")


def test_a_bad_spec_is_refused_before_it_is_sent() -> None:
    seen: list[httpx.Request] = []
    with client_for(lambda request: httpx.Response(201, json=VM), seen) as client:
        with pytest.raises(InvalidSpec, match="memory"):
            client.vms.create(name="web", memory="lots")
        with pytest.raises(InvalidSpec, match="colour"):
            client.vms.create(name="web", colour="blue")  # unknown fields are refused
        with pytest.raises(InvalidSpec, match="vcpus"):
            client.vms.update("web", vcpus=0)
        with pytest.raises(NotFound, match="VM names are"):
            client.vms.get("../host")  # never reaches another route
        created = client.vms.create(name="web", memory="64M", start=True)
    assert created.name == "web"
    (request,) = seen
    assert request.url.params["start"] == "true"
    assert json.loads(request.content)["memory"] == "64M"


def test_only_the_changes_given_are_sent() -> None:
    seen: list[httpx.Request] = []
    with client_for(lambda request: httpx.Response(200, json=VM), seen) as client:
        client.vms.update("web", labels={"team": "b"})
    assert seen[0].method == "PATCH"
    assert json.loads(seen[0].content) == {"labels": {"team": "b"}}


def test_files_and_logs_travel_as_bytes_and_text() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.endswith("/files"):
            return httpx.Response(200, content=b"\x00\xffdata")
        if request.url.path.endswith("/logs"):
            return httpx.Response(200, text="boot\nready\n")
        return httpx.Response(204)

    with client_for(answer, seen) as client:
        assert client.files.read("web", "/etc/hostname") == b"\x00\xffdata"
        client.vms.files.write("web", "/tmp/x", b"\x01\x02")
        assert client.vms.logs("web", tail=6) == "boot\nready\n"
    assert seen[0].url.params["path"] == "/etc/hostname"
    assert (seen[1].method, seen[1].content) == ("PUT", b"\x01\x02")
    assert seen[2].url.params["tail"] == "6"


# ---- server-sent events


def feed(lines: list[str]) -> list[SseMessage]:
    parser = SseParser()
    return [message for line in lines if (message := parser.feed(line)) is not None]


def test_sse_messages_end_at_a_blank_line_and_join_their_data_lines() -> None:
    messages = feed(["id: 7", 'data: {"a":', "data:1}", "", "data: next", ""])
    assert messages == [
        SseMessage(event="message", data='{"a":\n1}', id="7"),
        SseMessage(event="message", data="next", id="7"),  # the last id carries over
    ]


def test_sse_comments_empty_messages_and_unknown_fields_dispatch_nothing() -> None:
    parser = SseParser()
    lines = [": keep-alive", "", "id: 3", "", "colour: red", "retry: 1500", "retry: soon"]
    assert [parser.feed(line) for line in lines] == [None] * len(lines)
    assert parser.last_id == "3"
    assert parser.retry == 1500  # only a number is taken


def test_sse_field_values_keep_all_but_one_leading_space() -> None:
    assert feed(["data:  two spaces", "event:named", ""]) == [
        SseMessage(event="named", data=" two spaces", id="")
    ]
    assert feed(["data", ""]) == [SseMessage(event="message", data="", id="")]  # no colon


def test_sse_ignores_an_id_with_nul() -> None:
    assert feed(["id: 1", "id: 2\0", "data: x", ""])[0].id == "1"


def event(id_: int, kind: str, vm: str = "web") -> str:
    return json.dumps({"id": id_, "time": 1.5, "vm": vm, "kind": kind, "state": "running"})


STREAM = (
    f": hello\r\nid: 4\r\ndata: {event(4, 'started')}\r\n\r\n"
    f"event: ping\ndata: {{}}\n\n"  # a named event kasou does not send: skipped
    f"id: 5\rdata: {event(5, 'running')}\r\r"  # CR alone ends lines too
)


def stream_handler(seen: list[httpx.Request]) -> Handler:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        chunks = [STREAM[i : i + 7].encode() for i in range(0, len(STREAM), 7)]
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=ByteChunks(chunks)
        )

    return answer


class ByteChunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that arrives in small pieces, split mid-line as a network splits it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for chunk in self.chunks:
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def test_the_event_stream_yields_events_in_order_and_resumes_from_last_id() -> None:
    seen: list[httpx.Request] = []
    with client_for(stream_handler(seen)) as client, client.events(since=3, vm="web") as stream:
        events = list(stream)
        assert stream.last_id == 5
    assert [(item.id, item.kind) for item in events] == [(4, "started"), (5, "running")]
    assert seen[0].url.params["since"] == "3" and seen[0].url.params["vm"] == "web"


def test_leaving_an_event_stream_early_closes_its_connection() -> None:
    bodies: list[ByteChunks] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(ByteChunks([STREAM.encode()]))
        return httpx.Response(200, stream=bodies[-1])

    with client_for(answer) as client:
        with client.events() as stream:
            assert next(stream).id == 4
        assert bodies[0].closed


def test_a_refused_event_stream_raises_the_problem() -> None:
    client = client_for(lambda request: problem(ProblemType.UNAUTHORIZED, 401, "no token"))
    with client, pytest.raises(Unauthorized):
        client.events()


# ---- the async twin


def test_the_async_client_maps_problems_and_reads_the_stream() -> None:
    seen: list[httpx.Request] = []
    sse = stream_handler(seen)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/events":
            return sse(request)
        if request.url.path == "/v1/vms/gone":
            return problem(ProblemType.NOT_FOUND, 404, "no VM gone")
        return httpx.Response(200, json=VM)

    async def drive() -> tuple[list[int], str]:
        client = AsyncClient("/kasoud.sock", transport=httpx.MockTransport(answer))
        async with client:
            vm = await client.vms.stop("web")
            with pytest.raises(NotFound):
                await client.vms.get("gone")
            async with client.events(since=0) as stream:
                ids = [item.id async for item in stream]
        return ids, vm.name

    ids, name = asyncio.run(drive())
    assert ids == [4, 5]
    assert name == "web"


# ---- no kasoud


def test_no_kasoud_on_the_socket_says_so_and_how_to_start_it(tmp_path: Path) -> None:
    socket = tmp_path / "kasoud.sock"
    with Client(socket) as client, pytest.raises(DaemonUnavailable) as raised:
        client.vms.list()
    assert str(raised.value) == f"kasoud is not running on {socket}: start it with `kasoud`"

    async def drive() -> None:
        async with AsyncClient(socket) as client:
            await client.host()

    with pytest.raises(DaemonUnavailable, match="start it with `kasoud`"):
        asyncio.run(drive())


def test_kasou_host_names_a_socket_or_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_HOST", "https://vmhost:8443/")
    monkeypatch.setenv("KASOU_TOKEN", "s3cret")
    with Client() as client:
        assert client.endpoint.base_url == "https://vmhost:8443"
        assert (
            client.endpoint.ws_url("/v1/vms/web/console") == "wss://vmhost:8443/v1/vms/web/console"
        )
        assert client.endpoint.headers() == {"Authorization": "Bearer s3cret"}
    monkeypatch.setenv("KASOU_HOST", "/tmp/k.sock")
    with Client(token="") as client:
        assert client.endpoint.socket == "/tmp/k.sock"
        assert client.endpoint.headers() == {}
        assert client.endpoint.ws_url("/x") == "ws://kasoud/x"


def test_importing_kasou_does_not_import_the_sdk() -> None:
    code = (
        "import sys, kasou\n"
        "assert 'httpx' not in sys.modules and 'kasou.sdk' not in sys.modules\n"
        "from kasou.sdk import Client\n"
        "assert kasou.Client is Client and kasou.AsyncClient.__module__ == 'kasou.sdk._async'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
