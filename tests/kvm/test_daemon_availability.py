"""kasoud's availability: VMs outlive a kasoud restart (an upgrade), what happened to them
while it was away is seen when it comes back, and the crash-loop count is not reset by a
daemon restart.

Waits are on the daemon's event log or on pidfds, never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.client.control import ControlClient
from kasou.daemon import Daemon, RestartTiming
from kasou.guestkit import cmdline
from kasou.spec import RestartPolicy, VmSpec, VmState

from ._kasoud import Kasoud, alive, guest_spec, remove_tmp, short_tmp
from .conftest import wait_gone

TIMING = RestartTiming(first=0.05, cap=0.4)


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmp()
    yield path
    remove_tmp(path)


def _wait_state(daemon: Daemon, name: str, state: VmState, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while daemon.get(name).state is not state:
        left = deadline - time.monotonic()
        assert left > 0, f"{name} is {daemon.get(name).state}, never {state}"
        events = daemon.wait_events(seen, left)
        seen = events[-1].id if events else seen


def _wait_restarts(daemon: Daemon, name: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while daemon.get(name).restarts < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{name} restarted {daemon.get(name).restarts} times, not {count}"
        events = daemon.wait_events(seen, left)
        seen = events[-1].id if events else seen


def _wait_event(kasoud: Kasoud, vm: str, *kinds: str, timeout: float = 30.0) -> None:
    """Follow the event stream until ``vm`` has had events of ``kinds``, in that order."""
    wanted = list(kinds)
    with kasoud.api.stream("GET", "/v1/events", timeout=timeout) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["vm"] == vm and event["kind"] == wanted[0]:
                wanted.pop(0)
                if not wanted:
                    return
    raise AssertionError(f"the event stream ended before {vm} had {wanted}")


def test_the_crash_loop_count_survives_a_daemon_restart(guest_elf: Path) -> None:
    state_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="kd"))
    spec = VmSpec(
        name="crash",
        kernel=str(guest_elf),
        memory="16M",
        cmdline="console=ttyS0 " + cmdline("triple"),  # a guest crash: status 1
        restart=RestartPolicy.ON_FAILURE,
    )
    try:
        daemon = Daemon.open(state_dir, timing=TIMING)
        daemon.create(spec, start=True)
        _wait_restarts(daemon, "crash", 2)
        daemon.close()  # mid-loop: the record holds the restarts so far

        daemon = Daemon.open(state_dir, timing=TIMING)
        try:
            _wait_state(daemon, "crash", VmState.FAILED)
            info = daemon.get("crash")
            # The limit counts restarts before and after the daemon's restart together: a
            # count kept only in memory would have allowed TIMING.limit more.
            assert info.restarts == TIMING.limit
            assert "crash loop" in info.message
            kinds = [e.kind for e in daemon.events(vm="crash")]
            assert kinds.count("restarted") == TIMING.limit
            # The exited events carry the state each end led to, never "running".
            exited = [e.state for e in daemon.events(vm="crash") if e.kind == "exited"]
            assert exited and VmState.RUNNING not in exited
            assert exited[-1] is VmState.FAILED
        finally:
            daemon.close(stop_vms=True)
    finally:
        subprocess.run(["rm", "-rf", str(state_dir)], check=False)


def test_vms_run_on_through_a_kasoud_upgrade(root: Path, guest_elf: Path) -> None:
    old = Kasoud(root)
    try:
        for name in ("a", "b"):
            assert old.api.post("/v1/vms?start=true", json=guest_spec(name)).status_code == 201
        assert old.api.post("/v1/vms/b/pause").json()["state"] == "paused"
        assert old.api.post("/v1/vms", json=guest_spec("c")).status_code == 201
        before = {vm["name"]: (vm["pid"], vm["state"]) for vm in old.api.get("/v1/vms").json()}
    finally:
        assert old.terminate() == 0  # SIGTERM without --shutdown-vms: the VMs run on
    assert before["a"][1] == "running" and before["c"] == (None, "created")
    assert alive(before["a"][0]) and alive(before["b"][0])

    new = Kasoud(root)  # the upgraded kasoud, same state folder and socket
    try:
        after = {vm["name"]: (vm["pid"], vm["state"]) for vm in new.api.get("/v1/vms").json()}
        assert after == before
        assert new.api.post("/v1/vms/a/request/status").json()["state"] == "running"
        assert new.api.post("/v1/vms/b/request/status").json()["state"] == "paused"
        assert new.api.post("/v1/vms/b/resume").json()["state"] == "running"
        kinds = [e["kind"] for e in new.api.get("/v1/events/log").json()]
        assert kinds.count("reattached") == 2
        new.remove_all()
    finally:
        new.terminate()
    for pid, _ in (before["a"], before["b"]):
        wait_gone(pid, timeout=0)  # a zombie is gone: the pidfd is readable at once


def test_vms_that_ended_while_kasoud_was_away(root: Path, guest_elf: Path) -> None:
    old = Kasoud(root)
    try:
        specs = {
            "clean": guest_spec("clean"),  # stopped through its own socket: status 0
            "killed": guest_spec("killed"),  # SIGKILL, policy never: failed
            "again": guest_spec("again", restart="on-failure"),  # SIGKILL: restarted
        }
        pids = {}
        for name, spec in specs.items():
            reply = old.api.post("/v1/vms?start=true", json=spec)
            assert reply.status_code == 201, reply.text
            pids[name] = reply.json()["pid"]
    finally:
        assert old.terminate() == 0
    with ControlClient(root / "s" / "vms" / "clean" / "api.sock") as client:
        client.request("stop")
    os.kill(pids["killed"], signal.SIGKILL)
    os.kill(pids["again"], signal.SIGKILL)
    for pid in pids.values():
        wait_gone(pid)

    new = Kasoud(root)
    try:
        vms = {vm["name"]: vm for vm in new.api.get("/v1/vms").json()}
        assert (vms["clean"]["state"], vms["clean"]["exit_status"]) == ("stopped", 0)
        assert vms["killed"]["state"] == "failed" and vms["killed"]["pid"] is None
        assert "while the daemon was away" in vms["killed"]["message"]
        # on-failure: a backoff, then a new process.
        _wait_event(new, "again", "restarted", "running")
        again = new.api.get("/v1/vms/again").json()
        assert again["state"] == "running" and again["restarts"] == 1
        assert again["pid"] not in (None, pids["again"]) and alive(again["pid"])
        exited = [
            e["state"]
            for e in new.api.get("/v1/events/log").json()
            if e["kind"] == "exited" and e["vm"] == "again"
        ]
        assert exited == ["backoff"]
        new.remove_all()
    finally:
        new.terminate()
