"""kasoud and VMs that end: acting on a VM whose process is ending is an invalid state (409),
not a server error; the events say the state each end led to; a shutdown takes its own
timeout; ``kasoud --shutdown-vms`` presses the power button of ACPI VMs, stops the others at
once and keeps its deadline.

The guest kit does not power off on the ACPI button, so its VMs show the deadline at work.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasou.daemon import SqliteStore
from kasou.spec import PROBLEM_BASE

from ._kasoud import Kasoud, guest_spec, remove_tmp, short_tmp
from .conftest import wait_gone


@pytest.fixture
def root(guest_elf: Path) -> Iterator[Path]:
    path = short_tmp()
    yield path
    remove_tmp(path)


@pytest.fixture
def kasoud(root: Path) -> Iterator[Kasoud]:
    daemon = Kasoud(root)
    try:
        yield daemon
        daemon.remove_all()
    finally:
        assert daemon.terminate() == 0, daemon.log.read_text()


def _invalid_state(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 409, response.text
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + "invalid-state"
    return body


def _events_until(kasoud: Kasoud, vm: str, kind: str, timeout: float = 30.0) -> list[Any]:
    """``vm``'s events from the stream, up to and with the first of ``kind``."""
    seen = []
    with kasoud.api.stream("GET", "/v1/events", timeout=timeout) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if event["vm"] == vm:
                    seen.append(event)
                    if event["kind"] == kind:
                        return seen
    raise AssertionError(f"the stream ended before {vm} had {kind}: {seen}")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "pause", None),
        ("POST", "request/status", None),
        ("POST", "exec", {"argv": ["true"]}),
    ],
)
def test_acting_on_a_vm_that_just_ended_is_an_invalid_state(
    kasoud: Kasoud, method: str, path: str, body: dict[str, Any] | None
) -> None:
    reply = kasoud.api.post("/v1/vms", params={"start": True}, json=guest_spec("gone"))
    assert reply.status_code == 201, reply.text
    pid = reply.json()["pid"]
    deadline = time.monotonic() + 30
    while kasoud.api.post("/v1/vms/gone/request/status").json()["state"] != "running":
        assert time.monotonic() < deadline, "the VM never got past booting"
    # The VM ends by itself, as far as kasoud knows: the request below lands while kasoud
    # has not seen the end yet, or just after; either way the answer is the VM's state.
    os.kill(pid, signal.SIGKILL)
    _invalid_state(kasoud.api.request(method, f"/v1/vms/gone/{path}", json=body))
    wait_gone(pid)
    events = _events_until(kasoud, "gone", "failed")
    exited = [e for e in events if e["kind"] == "exited"]
    assert [e["state"] for e in exited] == ["failed"]  # the state it moved to
    vm = kasoud.api.get("/v1/vms/gone").json()
    assert (vm["state"], vm["pid"]) == ("failed", None)
    _invalid_state(kasoud.api.post("/v1/vms/gone/pause"))


def test_shutdown_takes_a_timeout(kasoud: Kasoud) -> None:
    reply = kasoud.api.post("/v1/vms", params={"start": True}, json=guest_spec("deaf"))
    assert reply.status_code == 201, reply.text
    for bad in ("-1", "3601", "soon"):
        reply = kasoud.api.post("/v1/vms/deaf/shutdown", params={"timeout": bad})
        assert reply.status_code == 422, reply.text
    started = time.monotonic()
    # The guest kit ignores the power button: stopped once the timeout is over, well before
    # the default 30 s.
    reply = kasoud.api.post("/v1/vms/deaf/shutdown", params={"timeout": "0.5"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["state"] == "stopped"
    assert 0.5 <= time.monotonic() - started < 10.0
    kinds = [e["kind"] for e in kasoud.api.get("/v1/events/log", params={"vm": "deaf"}).json()]
    assert "shutting-down" in kinds


def test_kasoud_shutdown_vms_keeps_its_deadline(root: Path) -> None:
    deadline = 3.0
    daemon = Kasoud(root, "--shutdown-vms", "--shutdown-deadline", f"{deadline:g}")
    try:
        pids = {}
        for name, acpi in (("a1", True), ("a2", True), ("plain", False)):
            reply = daemon.api.post(
                "/v1/vms", params={"start": True}, json=guest_spec(name, acpi=acpi)
            )
            assert reply.status_code == 201, reply.text
            pids[name] = reply.json()["pid"]
        signalled = time.time()
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=deadline + 10) == 0
        took = time.monotonic() - started
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        daemon.api.close()
    assert took < deadline + 1.5, f"kasoud took {took:.1f} s for a {deadline:g} s deadline"
    for pid in pids.values():
        wait_gone(pid, timeout=0)

    store = SqliteStore(daemon.state / "kasou.db")
    try:
        records = {record.name: record for record in store.list()}
        events = store.events(limit=10000)
    finally:
        store.close()
    assert all(record.state.value == "stopped" for record in records.values())

    def kinds(vm: str) -> list[str]:
        return [e.kind for e in events if e.vm == vm and e.time >= signalled]

    for name in ("a1", "a2"):  # the button, ignored, then stop near the deadline
        assert kinds(name)[:1] == ["shutting-down"] and kinds(name)[-1] == "stopped"
    assert kinds("plain")[:1] == ["stopping"]  # no ACPI: stopped at once, not at the deadline
    stopped = {e.vm: e.time - signalled for e in events if e.kind == "stopped"}
    assert stopped["plain"] < deadline / 2
    assert stopped["a1"] > deadline / 2 and stopped["a2"] > deadline / 2
    assert max(stopped.values()) < deadline + 0.5
