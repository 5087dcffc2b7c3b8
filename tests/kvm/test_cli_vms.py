"""The Docker-like CLI (``kasou ps|create|start|logs|events|stop|rm``) and the SDK (sync and
async) against a live kasoud running guest-kit VMs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kasou
from kasou.guestkit import build_guest, cmdline
from kasou.sdk import ApiError, Conflict, InvalidState, NotFound
from kasou.spec import VmState

from ._kasoud import Kasoud, remove_tmp, running_kasoud, short_tmp
from .conftest import KASOU


@pytest.fixture
def kasoud() -> Iterator[Kasoud]:
    with running_kasoud() as daemon:
        yield daemon


def cli(daemon: Kasoud, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KASOU, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "KASOU_HOST": str(daemon.sock)},
        stdin=subprocess.DEVNULL,
    )


def ok(daemon: Kasoud, *args: str) -> str:
    result = cli(daemon, *args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("kasou: error: ")
    assert "Traceback" not in result.stderr
    return line


def guest_args(workload: str = "wait", **args: int) -> list[str]:
    return [
        "--kernel",
        str(build_guest()),
        "--cmdline",
        "console=ttyS0 " + cmdline(workload, **args),
        "--memory",
        "64M",
    ]


def test_a_vm_from_create_to_rm(kasoud: Kasoud) -> None:
    created = json.loads(ok(kasoud, "create", "g1", *guest_args(), "--label", "team=a", "--json"))
    assert (created["name"], created["state"]) == ("g1", "created")
    assert created["spec"]["labels"] == {"team": "a"}

    assert json.loads(ok(kasoud, "ps", "--json")) == []  # created, not running
    (listed,) = json.loads(ok(kasoud, "ps", "--all", "--json"))
    assert listed["name"] == "g1"

    assert ok(kasoud, "start", "g1").split() == ["g1", "running"]
    (running,) = json.loads(ok(kasoud, "ps", "--json"))
    assert running["state"] == "running" and running["pid"] > 0
    assert "g1" in ok(kasoud, "ps")  # the table too

    kasoud.wait_log("g1", "ready")
    assert "ready" in ok(kasoud, "logs", "g1")
    assert ok(kasoud, "logs", "--tail", "6", "g1") == "ready\n"
    assert json.loads(ok(kasoud, "status", "g1"))["state"] == "running"  # the VM's own view
    assert json.loads(ok(kasoud, "inspect", "g1"))["spec"]["memory"] == "64M"
    frame = ok(kasoud, "top", "--once")
    assert "g1" in frame and "running" in frame
    figures = json.loads(ok(kasoud, "top", "--json"))["g1"]
    assert figures["state"] == "running"
    assert figures["kasou_vm_cpu_seconds_total"] > 0 and figures["kasou_vm_memory_rss_bytes"] > 0

    assert ok(kasoud, "stop", "g1").split() == ["g1", "stopped"]
    lines = ok(kasoud, "events", "--since", "0", "--no-follow", "--json").splitlines()
    events = [json.loads(line) for line in lines]
    assert [event["id"] for event in events] == sorted(event["id"] for event in events)
    kinds = [event["kind"] for event in events if event["vm"] == "g1"]
    assert kinds[0] == "created"
    assert "started" in kinds and kinds.index("started") < len(kinds) - 1
    later = ok(kasoud, "events", "--since", str(events[-2]["id"]), "--no-follow", "--json")
    assert [json.loads(line)["id"] for line in later.splitlines()] == [events[-1]["id"]]

    assert ok(kasoud, "rm", "g1").split() == ["g1"]
    assert json.loads(ok(kasoud, "ps", "--all", "--json")) == []


def test_errors_are_one_line_and_exit_2(kasoud: Kasoud, tmp_path: Path) -> None:
    assert "g2" in one_line_error(cli(kasoud, "start", "g2"))  # no such VM
    ok(kasoud, "create", "g2", *guest_args(), "--start")
    line = one_line_error(cli(kasoud, "rm", "g2"))
    assert "running" in line  # a running VM needs -f
    assert "it is running, it must be paused" in one_line_error(cli(kasoud, "resume", "g2"))
    assert "memory" in one_line_error(cli(kasoud, "create", "g3", "--memory", "lots"))
    missing = tmp_path / "no-kernel"
    assert "kernel" in one_line_error(cli(kasoud, "create", "g3", "--kernel", str(missing)))
    assert ok(kasoud, "rm", "-f", "g2").split() == ["g2"]

    nowhere = short_tmp() / "k.sock"
    result = cli(kasoud, "ps", "--host", str(nowhere))
    assert one_line_error(result) == (
        f"kasou: error: kasoud is not running on {nowhere}: start it with `kasoud`"
    )
    remove_tmp(nowhere.parent)


def test_a_name_taken_is_a_conflict(kasoud: Kasoud) -> None:
    ok(kasoud, "create", "g4", *guest_args())
    line = one_line_error(cli(kasoud, "create", "g4", *guest_args()))
    assert "g4" in line
    with kasou.Client(kasoud.sock) as client, pytest.raises(Conflict):
        client.vms.create(name="g4", kernel=str(build_guest()))


def test_the_sync_sdk_drives_a_vm(kasoud: Kasoud) -> None:
    kernel = str(build_guest())
    with kasou.Client(kasoud.sock) as client:
        vm = client.vms.create(
            name="s1",
            kernel=kernel,
            cmdline="console=ttyS0 " + cmdline("echo", n=64),
            memory="64M",
            labels={"sdk": "sync"},
            start=True,
        )
        assert vm.state is VmState.RUNNING
        assert [item.name for item in client.vms.list(labels={"sdk": "sync"})] == ["s1"]
        assert client.vms.list(labels={"sdk": "other"}) == []
        with client.vms.console("s1") as console:
            kasoud.wait_log("s1", "echo: ready")
            console.send(b"hello\n")
            assert b"hello\n" in console.read_until(b"hello\n", timeout=30)
        assert "hello" in client.vms.logs("s1")
        with pytest.raises(InvalidState):
            client.vms.resume("s1")
        with pytest.raises(NotFound):
            client.vms.get("nosuch")
        assert client.vms.update("s1", labels={"sdk": "changed"}).spec.labels == {"sdk": "changed"}
        assert client.host()["vms"] == 1
        with client.events(since=0, vm="s1") as stream:
            kinds = []
            for event in stream:
                kinds.append(event.kind)
                if event.kind == "created":
                    break
        assert kinds == ["created"]
        client.vms.delete("s1", force=True)
        with pytest.raises(NotFound):
            client.vms.get("s1")


def test_the_async_sdk_drives_a_vm(kasoud: Kasoud) -> None:
    kernel = str(build_guest())

    async def drive() -> dict[str, Any]:
        async with kasou.AsyncClient(kasoud.sock) as client:
            vm = await client.vms.create(
                name="a1",
                kernel=kernel,
                cmdline="console=ttyS0 " + cmdline("echo", n=64),
                memory="64M",
            )
            started = await client.vms.start(vm.name)
            async with client.vms.console("a1") as console:
                await asyncio.to_thread(kasoud.wait_log, "a1", "echo: ready")
                await console.send(b"ok\n")
                echoed = await console.read_until(b"ok\n", timeout=30)
            paused = await client.vms.pause("a1")
            resumed = await client.vms.resume("a1")
            kinds = []
            async with client.events(since=0, vm="a1") as stream:
                async for event in stream:
                    kinds.append(event.kind)
                    if event.state is VmState.RUNNING and "resumed" in kinds:
                        break
            stopped = await client.vms.stop("a1")
            await client.vms.delete("a1")
            try:
                await client.vms.get("a1")
            except ApiError as error:
                gone = type(error).__name__
            return {
                "states": [started.state, paused.state, resumed.state, stopped.state],
                "echoed": echoed,
                "kinds": kinds,
                "gone": gone,
            }

    result = asyncio.run(drive())
    assert result["states"] == [
        VmState.RUNNING,
        VmState.PAUSED,
        VmState.RUNNING,
        VmState.STOPPED,
    ]
    assert result["echoed"].endswith(b"ok\n")
    assert result["kinds"][0] == "created" and "paused" in result["kinds"]
    assert result["gone"] == "NotFound"


def test_console_and_logs_follow_a_vm_to_its_end(kasoud: Kasoud) -> None:
    ok(kasoud, "create", "c1", *guest_args("echo", n=3), "--start")
    kasoud.wait_log("c1", "echo: ready")
    follower = subprocess.Popen(
        [KASOU, "logs", "-f", "c1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KASOU_HOST": str(kasoud.sock)},
    )
    try:
        assert follower.stdout is not None
        for line in follower.stdout:  # the log so far, then what comes
            if "echo: ready" in line:
                break
        else:
            raise AssertionError(f"logs -f ended early: {follower.communicate()}")
        # Piped input (not a terminal): typed into the guest, whose echo comes back; the
        # guest then ends, which closes the console and ends both commands.
        attached = subprocess.run(
            [KASOU, "console", "c1"],
            input="hi\n",
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "KASOU_HOST": str(kasoud.sock)},
            check=False,
        )
        assert attached.returncode == 0, attached.stderr
        assert "hi\n" in attached.stdout and "kasou-guest: done" in attached.stdout
        rest, _ = follower.communicate(timeout=30)
        assert follower.returncode == 0
        assert "hi\n" in rest and "kasou-guest: done" in rest
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
