"""The REST API on a live kasoud (a subprocess on a Unix socket), driving guest-kit VMs on
/dev/kvm: the lifecycle a user sees, the event stream, metrics, the console WebSocket, bad
input answered with the right problem, the TCP listener's token, and kasoud's own process
behaviour (one per socket, VMs outliving it)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasou.spec import PROBLEM_BASE

from ._kasoud import Kasoud, alive, free_port, guest_spec, remove_tmp, short_tmp

pytestmark = pytest.mark.kvm

TOKEN = "kvm-tier-token-0123456789"


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmp()
    yield path
    remove_tmp(path)


@pytest.fixture
def kasoud(root: Path) -> Iterator[Kasoud]:
    daemon = Kasoud(root)
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.remove_all()
        status = daemon.terminate()
    assert status == 0, daemon.log.read_text()
    assert not daemon.sock.exists()


def problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + kind, body
    return body


def read_events(stream: httpx.Response) -> Iterator[dict[str, Any]]:
    """The events of an SSE stream as they arrive (``id:`` checked against the data)."""
    event_id = None
    for line in stream.iter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            assert event["id"] == event_id
            yield event


def test_vm_lifecycle(kasoud: Kasoud) -> None:
    api = kasoud.api
    created = api.post("/v1/vms", json=guest_spec("web", labels={"tier": "front"}))
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "created"
    assert [vm["name"] for vm in api.get("/v1/vms", params={"label": "tier=front"}).json()] == [
        "web"
    ]
    assert api.get("/v1/vms", params={"label": "tier=back"}).json() == []

    started = api.post("/v1/vms/web/start")
    assert started.status_code == 200, started.text
    info = api.get("/v1/vms/web").json()
    assert info["state"] == "running"
    assert alive(info["pid"])
    assert "ready" in kasoud.wait_log("web", "ready")
    assert api.get("/v1/host").json()["running"] == 1

    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert 'kasou_vm_cpu_seconds_total{vm="web"}' in metrics.text
    assert 'kasou_vm_exits_total{reason="io",vm="web"}' in metrics.text  # its console lines
    assert 'kasou_host_vms{state="running"} 1.0' in metrics.text

    history = api.get("/v1/events/log", params={"vm": "web"}).json()
    assert [e["state"] for e in history if e["kind"] != "created"][-1] == "running"
    last = history[-1]["id"]

    # Live: the stream is open before the VM stops, and shows it stopping.
    with (
        httpx.Client(
            transport=httpx.HTTPTransport(uds=str(kasoud.sock)), base_url="http://kasoud"
        ) as watcher,
        watcher.stream("GET", "/v1/events", params={"since": last}, timeout=30.0) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        stopped = api.post("/v1/vms/web/stop")
        assert stopped.status_code == 200, stopped.text
        seen = []
        for event in read_events(stream):
            assert event["id"] > last
            seen.append(event["state"])
            if event["vm"] == "web" and event["state"] == "stopped":
                break
    assert "stopped" in seen
    assert api.get("/v1/vms/web").json()["state"] == "stopped"
    assert not alive(info["pid"])
    assert 'vm="web"' not in api.get("/metrics").text  # no series for a stopped VM

    assert api.delete("/v1/vms/web").status_code == 204
    problem(api.get("/v1/vms/web"), 404, "not-found")


def test_console_websocket_both_ways(kasoud: Kasoud) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import unix_connect

    message = b"hi-ws"
    spec = guest_spec("echo", "echo", n=len(message))
    assert kasoud.api.post("/v1/vms", params={"start": True}, json=spec).status_code == 201
    kasoud.wait_log("echo", "echo: ready")
    with unix_connect(str(kasoud.sock), "ws://kasoud/v1/vms/echo/console") as ws:
        ws.send(message)  # binary frame, into the UART
        received = b""
        while message not in received:
            frame = ws.recv(timeout=30)
            assert isinstance(frame, bytes)
            received += frame
        # The guest ends after echoing; the bridge closes the WebSocket with it.
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=30)
    assert ws.close_code == 1000


def test_console_of_missing_vm_is_refused(kasoud: Kasoud) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import unix_connect

    with (
        pytest.raises((InvalidStatus, ConnectionClosed)),
        unix_connect(str(kasoud.sock), "ws://kasoud/v1/vms/ghost/console") as ws,
    ):
        ws.recv(timeout=10)


def test_bad_input_answers_4xx_and_disturbs_nothing(kasoud: Kasoud, root: Path) -> None:
    api = kasoud.api
    assert api.post("/v1/vms", json=guest_spec("keep")).status_code == 201
    assert api.post("/v1/vms/keep/start").status_code == 200

    body = problem(
        api.post("/v1/vms", json={**guest_spec("a"), "memroy": "1G"}), 422, "invalid-spec"
    )
    assert "memroy" in body["detail"]
    body = problem(
        api.post("/v1/vms", json={**guest_spec("a"), "kernel": str(root / "nope")}),
        422,
        "invalid-spec",
    )
    assert "kernel" in body["detail"]
    problem(api.post("/v1/vms", json={**guest_spec("a"), "memory": "4096G"}), 422, "invalid-spec")
    problem(api.post("/v1/vms", json=guest_spec("keep")), 409, "conflict")
    problem(api.get("/v1/vms/ghost"), 404, "not-found")
    problem(api.post("/v1/vms/ghost/stop"), 404, "not-found")
    problem(api.post("/v1/vms/keep/resume"), 409, "invalid-state")
    problem(api.delete("/v1/vms/keep"), 409, "invalid-state")
    problem(api.get("/v1/vms/keep/files", params={"path": "/etc/hostname"}), 502, "guest")
    oversized = b'{"name": "big", "cmdline": "' + b"x" * (2 << 20) + b'"}'
    problem(
        api.post("/v1/vms", content=oversized, headers={"content-type": "application/json"}),
        413,
        "too-large",
    )

    # Still answering, and nothing was created or disturbed.
    assert [vm["name"] for vm in api.get("/v1/vms").json()] == ["keep"]
    assert api.get("/v1/vms/keep").json()["state"] == "running"
    assert api.get("/v1/vms/keep/logs").status_code == 200


def test_tcp_listener_needs_the_token(root: Path) -> None:
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    daemon = Kasoud(root, "--tcp", f"127.0.0.1:{port}", "--token-file", str(token_file))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as tcp:
            refused = tcp.post("/v1/vms", json=guest_spec("intruder"), params={"start": True})
            problem(refused, 401, "unauthorized")
            problem(
                tcp.get("/v1/vms", headers={"authorization": "Bearer wrong"}), 401, "unauthorized"
            )
            assert daemon.api.get("/v1/vms").json() == []  # nothing was created
            assert daemon.api.get("/v1/events/log").json() == []  # nor tried
            allowed = tcp.post(
                "/v1/vms",
                json=guest_spec("friend"),
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            assert allowed.status_code == 201, allowed.text
        assert [vm["name"] for vm in daemon.api.get("/v1/vms").json()] == ["friend"]
    finally:
        daemon.remove_all()
        assert daemon.terminate() == 0


def test_tcp_without_token_file_is_refused(root: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kasou.cli.daemon",
            "--state-dir",
            str(root / "s"),
            "--socket",
            str(root / "k.sock"),
            "--tcp",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--token-file" in result.stderr
    assert not (root / "k.sock").exists()


def test_one_kasoud_per_socket_and_vms_outlive_it(kasoud: Kasoud, root: Path) -> None:
    api = kasoud.api
    assert (
        api.post("/v1/vms", json=guest_spec("lasting"), params={"start": True}).status_code == 201
    )
    pid = api.get("/v1/vms/lasting").json()["pid"]

    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "kasou.cli.daemon",
            "--state-dir",
            str(root / "other"),
            "--socket",
            str(kasoud.sock),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 2
    assert f"kasoud already runs on {kasoud.sock}" in second.stderr
    assert api.get("/v1/host").status_code == 200  # the first one is untouched

    assert kasoud.terminate() == 0
    assert not kasoud.sock.exists()
    assert alive(pid)  # SIGTERM stops kasoud, not its VMs

    again = Kasoud(root, state=kasoud.state)
    kasoud.api = again.api
    kasoud.process = again.process
    info = again.api.get("/v1/vms/lasting").json()
    assert (info["state"], info["pid"]) == ("running", pid)


def test_sigterm_with_shutdown_vms_stops_them(root: Path) -> None:
    daemon = Kasoud(root, "--shutdown-vms", "--shutdown-deadline", "5")
    try:
        spec = guest_spec("brief", acpi=False)
        assert daemon.api.post("/v1/vms", json=spec, params={"start": True}).status_code == 201
        pid = daemon.api.get("/v1/vms/brief").json()["pid"]
        with (
            httpx.Client(
                transport=httpx.HTTPTransport(uds=str(daemon.sock)), base_url="http://kasoud"
            ) as watcher,
            watcher.stream("GET", "/v1/events", timeout=30.0) as stream,
        ):
            # An open event stream does not hold kasoud up past its grace period.
            assert daemon.terminate() == 0
            # ... and the stream ends (cut off, or closed cleanly), rather than timing out.
            try:
                for _ in stream.iter_lines():
                    pass
            except (httpx.RemoteProtocolError, httpx.ReadError):
                pass
        assert not alive(pid)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_tcp_listener_with_tls(root: Path) -> None:
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=kasoud", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (root / "token").write_text(TOKEN)
    port = free_port()
    daemon = Kasoud(
        root,
        *("--tcp", f"127.0.0.1:{port}", "--token-file", str(root / "token")),
        *("--tls-cert", str(cert), "--tls-key", str(key)),
    )
    try:
        auth = {"authorization": f"Bearer {TOKEN}"}
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(cert)),
        ) as tls:
            assert tls.get("/v1/host", headers=auth).json()["vms"] == 0
            problem(tls.get("/v1/host"), 401, "unauthorized")
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}") as plain,
            pytest.raises(httpx.TransportError),
        ):
            plain.get("/v1/host", headers=auth)  # plain HTTP is not answered
    finally:
        assert daemon.terminate() == 0
