"""The REST API's HTTP mechanics: errors as problem+json, the body limit, the bearer token,
the schema, metrics and the event stream's framing.

The daemon here is a small in-memory fake (``FakeDaemon``): these tests are about what the
HTTP layer does with the daemon's answers and errors. The real daemon behind a live kasoud
is tested in tests/kvm/test_api.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kasou.api import create_app
from kasou.api._events import event_stream
from kasou.daemon import VmMetrics, VmPaths
from kasou.errors import ConflictError, NotFoundError, StateError
from kasou.spec import (
    PROBLEM_BASE,
    DesiredState,
    Event,
    VmInfo,
    VmSpec,
    VmState,
    VmUpdate,
)

TOKEN = "s3cret-token-for-the-tests"


class FakeDaemon:
    """The Daemon's surface that the routes call, with VMs in a dict and no processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms: dict[str, VmInfo] = {}
        self.event_log: list[Event] = []
        self.created = 0

    def _record(self, vm: str, kind: str, state: VmState | None = None) -> None:
        self.event_log.append(
            Event(id=len(self.event_log) + 1, time=time.time(), vm=vm, kind=kind, state=state)
        )

    def create(self, spec: VmSpec, start: bool = False) -> VmInfo:
        if spec.name in self.vms:
            raise ConflictError(f"a VM named {spec.name!r} exists already: pick another name")
        self.created += 1
        info = VmInfo(
            name=spec.name,
            spec=spec,
            state=VmState.CREATED,
            desired=DesiredState.STOPPED,
            created_at=time.time(),
        )
        self.vms[spec.name] = info
        self._record(spec.name, "created", VmState.CREATED)
        return info

    def list(self, labels: dict[str, str] | None = None) -> list[VmInfo]:
        wanted = labels or {}
        return [
            vm
            for vm in self.vms.values()
            if all(vm.spec.labels.get(k) == v for k, v in wanted.items())
        ]

    def get(self, name: str) -> VmInfo:
        if name == "explodes":
            raise RuntimeError("a bug")
        try:
            return self.vms[name]
        except KeyError:
            raise NotFoundError(f"no VM named {name!r}: see GET /v1/vms") from None

    def update(self, name: str, update: VmUpdate) -> VmInfo:
        vm = self.get(name)
        if update.labels is not None:
            vm = vm.model_copy(
                update={"spec": vm.spec.model_copy(update={"labels": update.labels})}
            )
        self.vms[name] = vm
        return vm

    def delete(self, name: str, force: bool = False) -> None:
        vm = self.get(name)
        if vm.state is VmState.RUNNING and not force:
            raise StateError(name, vm.state.value, "delete", "stopped (or use force)")
        del self.vms[name]

    def start(self, name: str) -> VmInfo:
        vm = self.get(name)
        if vm.state is VmState.RUNNING:
            raise StateError(name, vm.state.value, "start", "created, stopped or failed")
        vm = vm.model_copy(update={"state": VmState.RUNNING, "desired": DesiredState.RUNNING})
        self.vms[name] = vm
        self._record(name, "state", VmState.RUNNING)
        return vm

    def pause(self, name: str) -> VmInfo:
        vm = self.get(name)
        raise StateError(name, vm.state.value, "pause", "running")

    def paths(self, name: str) -> VmPaths:
        self.get(name)
        folder = self.root / name
        return VmPaths(
            dir=folder,
            api_sock=folder / "api.sock",
            console_sock=folder / "console.sock",
            console_log=folder / "console.log",
            stderr_log=folder / "stderr.log",
        )

    def events(self, since: int = 0, vm: str | None = None, limit: int = 1000) -> list[Event]:
        chosen = [e for e in self.event_log if e.id > since and (vm is None or e.vm == vm)]
        return chosen[:limit]

    def wait_events(self, since: int, timeout: float) -> list[Event]:
        return self.events(since)

    def metrics(self) -> list[VmMetrics]:
        return [
            VmMetrics(
                name=vm.name,
                pid=1234,
                cpu_seconds=1.5,
                memory_rss=10 << 20,
                memory_pss=8 << 20,
                guest_memory=256 << 20,
                restarts=2,
                exits={"io": 7},
                kvm_exits={"all": 40, "halt": 1},
                disk_bytes={"block0": {"read": 4096, "write": 512}},
            )
            for vm in self.vms.values()
            if vm.state is VmState.RUNNING
        ]


@pytest.fixture
def daemon(tmp_path: Path) -> FakeDaemon:
    return FakeDaemon(tmp_path)


@pytest.fixture
def client(daemon: FakeDaemon) -> Iterator[TestClient]:
    with TestClient(create_app(daemon), raise_server_exceptions=False) as client:  # type: ignore[arg-type]
        yield client


def _problem(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + kind
    assert body["status"] == status
    assert body["title"]
    return body


def test_create_get_and_list(client: TestClient) -> None:
    created = client.post("/v1/vms", json={"name": "web", "labels": {"env": "prod"}})
    assert created.status_code == 201
    assert created.json()["state"] == "created"
    client.post("/v1/vms", json={"name": "db"})
    assert client.get("/v1/vms/web").json()["spec"]["labels"] == {"env": "prod"}
    assert [vm["name"] for vm in client.get("/v1/vms").json()] == ["web", "db"]
    assert [vm["name"] for vm in client.get("/v1/vms?label=env=prod").json()] == ["web"]


def test_name_clash_is_conflict(client: TestClient) -> None:
    client.post("/v1/vms", json={"name": "web"})
    body = _problem(client.post("/v1/vms", json={"name": "web"}), 409, "conflict")
    assert "web" in body["detail"]


def test_missing_vm_is_not_found(client: TestClient) -> None:
    body = _problem(client.get("/v1/vms/ghost"), 404, "not-found")
    assert "ghost" in body["detail"]
    _problem(client.post("/v1/vms/ghost/start"), 404, "not-found")
    _problem(client.delete("/v1/vms/ghost"), 404, "not-found")


def test_unknown_field_names_the_field(client: TestClient, daemon: FakeDaemon) -> None:
    body = _problem(
        client.post("/v1/vms", json={"name": "web", "memroy": "1G"}), 422, "invalid-spec"
    )
    assert "body.memroy" in body["detail"]
    body = _problem(
        client.post("/v1/vms", json={"name": "web", "limits": {"cpus_quota": -1}}),
        422,
        "invalid-spec",
    )
    assert "body.limits.cpus_quota" in body["detail"]
    _problem(client.post("/v1/vms", json={"name": "Not A Name"}), 422, "invalid-spec")
    _problem(
        client.post("/v1/vms", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "invalid-spec",
    )
    assert daemon.created == 0


def test_action_in_wrong_state_is_invalid_state(client: TestClient) -> None:
    client.post("/v1/vms", json={"name": "web"})
    assert client.post("/v1/vms/web/start").json()["state"] == "running"
    body = _problem(client.post("/v1/vms/web/start"), 409, "invalid-state")
    assert "running" in body["detail"]
    _problem(client.delete("/v1/vms/web"), 409, "invalid-state")
    assert client.delete("/v1/vms/web?force=true").status_code == 204
    _problem(client.post("/v1/vms/web/frobnicate"), 422, "invalid-spec")


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    _problem(client.get("/v2/nothing"), 404, "not-found")
    response = client.put("/v1/vms")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


def test_bug_is_internal_and_daemon_answers_after(client: TestClient) -> None:
    body = _problem(client.get("/v1/vms/explodes"), 500, "internal")
    assert "a bug" not in body["detail"]  # the detail is logged, not shown
    assert client.get("/v1/vms").status_code == 200


def test_declared_oversized_body_is_refused(client: TestClient, daemon: FakeDaemon) -> None:
    big = b'{"name": "web", "cmdline": "' + b"x" * (1 << 20) + b'"}'
    _problem(
        client.post("/v1/vms", content=big, headers={"content-type": "application/json"}),
        413,
        "too-large",
    )
    assert daemon.created == 0


def test_streamed_oversized_body_is_counted(client: TestClient, daemon: FakeDaemon) -> None:
    # No Content-Length (chunked): the limit is enforced on the bytes as they arrive.
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "web", "cmdline": "'
        for _ in range(40):
            yield b"x" * 32768
        yield b'"}'

    _problem(
        client.post("/v1/vms", content=chunks(), headers={"content-type": "application/json"}),
        413,
        "too-large",
    )
    assert daemon.created == 0
    assert client.post("/v1/vms", json={"name": "web"}).status_code == 201


def test_token_required_when_configured(daemon: FakeDaemon) -> None:
    app = create_app(daemon, token=TOKEN)  # type: ignore[arg-type]
    with TestClient(app) as client:
        body = _problem(client.post("/v1/vms", json={"name": "web"}), 401, "unauthorized")
        assert "token" in body["detail"]
        wrong = {"authorization": "Bearer " + TOKEN[:-1] + "X"}
        _problem(client.post("/v1/vms", json={"name": "web"}, headers=wrong), 401, "unauthorized")
        _problem(client.get("/v1/vms", headers={"authorization": TOKEN}), 401, "unauthorized")
        assert daemon.created == 0
        right = {"authorization": f"Bearer {TOKEN}"}
        assert client.post("/v1/vms", json={"name": "web"}, headers=right).status_code == 201
        assert daemon.created == 1


def test_no_token_needed_without_one(client: TestClient) -> None:
    assert client.get("/v1/host").json()["vms"] == 0


def test_openapi_schema_is_valid(client: TestClient) -> None:
    import schemathesis

    schema = client.get("/openapi.json").json()
    schemathesis.openapi.from_dict(schema).validate()
    paths = schema["paths"]
    for path in (
        "/v1/vms",
        "/v1/vms/{name}",
        "/v1/vms/{name}/{action}",
        "/v1/vms/{name}/logs",
        "/v1/vms/{name}/exec",
        "/v1/vms/{name}/files",
        "/v1/events",
        "/v1/events/log",
        "/v1/host",
        "/metrics",
    ):
        assert path in paths, path
    created = paths["/v1/vms"]["post"]
    assert created["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/VmSpec"
    )
    assert "application/problem+json" in created["responses"]["409"]["content"]


def test_logs_tail(client: TestClient, daemon: FakeDaemon) -> None:
    client.post("/v1/vms", json={"name": "web"})
    log = daemon.paths("web").console_log
    assert client.get("/v1/vms/web/logs").text == ""  # never started: no log yet
    log.parent.mkdir(parents=True)
    log.write_bytes(b"booting\nready\n")
    response = client.get("/v1/vms/web/logs")
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "booting\nready\n"
    assert client.get("/v1/vms/web/logs?tail=6").text == "ready\n"


def test_metrics(client: TestClient) -> None:
    client.post("/v1/vms", json={"name": "web"})
    client.post("/v1/vms", json={"name": "db"})
    client.post("/v1/vms/web/start")
    text = client.get("/metrics").text
    assert 'kasou_vm_cpu_seconds_total{vm="web"} 1.5' in text
    assert 'kasou_vm_memory_pss_bytes{vm="web"}' in text
    assert 'kasou_vm_restarts_total{vm="web"} 2.0' in text
    assert 'kasou_vm_exits_total{reason="io",vm="web"} 7.0' in text
    assert 'kasou_vm_kvm_exits_total{reason="halt",vm="web"} 1.0' in text
    assert 'kasou_vm_disk_bytes_total{device="block0",direction="read",vm="web"} 4096.0' in text
    assert 'kasou_host_vms{state="running"} 1.0' in text
    assert 'kasou_host_vms{state="created"} 1.0' in text
    assert 'vm="db"' not in text  # not running: no per-VM series
    assert 'kasou_api_request_seconds_count{method="POST",route="/v1/vms"} 2.0' in text


def test_event_log(client: TestClient) -> None:
    client.post("/v1/vms", json={"name": "web"})
    client.post("/v1/vms/web/start")
    events = client.get("/v1/events/log?since=1").json()
    assert [(e["id"], e["kind"], e["state"]) for e in events] == [(2, "state", "running")]


def test_event_stream_frames(daemon: FakeDaemon) -> None:
    daemon.create(VmSpec(name="web"))
    daemon.start("web")

    async def first(count: int) -> list[bytes]:
        frames = []
        async for frame in event_stream(daemon, since=0):  # type: ignore[arg-type]
            frames.append(frame)
            if len(frames) == count:
                break
        return frames

    retry, created, started = asyncio.run(first(3))
    assert retry.startswith(b"retry: ")
    assert created.startswith(b"id: 1\ndata: {") and created.endswith(b"\n\n")
    event = Event.model_validate_json(started.split(b"data: ", 1)[1])
    assert (event.id, event.state) == (2, VmState.RUNNING)


def test_kasoud_socket_mode_stale_and_live(tmp_path: Path) -> None:
    import socket
    import stat

    from kasou.cli.daemon import bind_unix
    from kasou.errors import HostError

    path = tmp_path / "run" / "kasoud.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a kasoud that died leaves its socket file behind

    live = bind_unix(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with pytest.raises(HostError, match=f"kasoud already runs on {path}"):
            bind_unix(path)
        assert path.exists()  # the live one is left alone
    finally:
        live.close()

    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(HostError, match="is not a socket"):
        bind_unix(path)


def test_kasoud_print_openapi(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kasou.cli.daemon import main

    assert main(["--print-openapi"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["info"]["title"] == "kasoud"
    assert "/v1/vms/{name}/console" not in schema["paths"]  # WebSockets are not in OpenAPI
    assert "/v1/vms" in schema["paths"]
