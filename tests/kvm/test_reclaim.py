"""Memory reclaim on a running VM: ``kasou.vmm.runner.run`` with a balloon and a reclaim
policy, the host's reading made up by the test (the real host is never squeezed), seen only
through the control socket: the ``reclaim`` request, and the balloon's target in the
``balloon`` and ``devices`` requests. The guest kit does not drive a balloon, so what is
checked is what kasou asks of the guest (the target in config space), not what it gives."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.client import ControlClient
from kasou.errors import KasouError
from kasou.guestkit import cmdline
from kasou.vmm import ExitKind, VmConfig
from kasou.vmm.config import ConsoleConfig
from kasou.vmm.reclaim import HostMemory, ReclaimConfig
from kasou.vmm.runner import run
from kasou.vmm.vcpu import GuestExit, install_kick_handler

MIB = 1 << 20
GIB = 1 << 30
PRESSED = HostMemory(16 * GIB, 512 * MIB, 2.5)  # MemAvailable under 10 % of MemTotal
CALM = HostMemory(16 * GIB, 12 * GIB, 0.0)


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Host:
    """The host as the test says it is: under pressure while ``pressed``."""

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self) -> HostMemory:
        return PRESSED if self.pressed else CALM


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder with a short path: Unix socket paths stop at 108 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kasou-reclaim-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_host_pressure_raises_the_balloon_to_max_in_steps_and_calm_brings_it_back(
    guest_elf: Path, folder: Path
) -> None:
    install_kick_handler()  # run() on another thread cannot install it
    sock = folder / "vm.sock"
    config = VmConfig(
        kernel=guest_elf,
        cmdline=cmdline("wait"),
        memory=128 * MIB,
        console=ConsoleConfig("file", folder / "console.log"),
        api_sock=sock,
        balloon=True,
        reclaim=ReclaimConfig(limit=64 * MIB, step=16 * MIB, interval=0.02, calm=2),
    )
    host = Host()
    endings: list[GuestExit] = []
    runner = threading.Thread(target=lambda: endings.append(run(config, host_memory=host)))
    runner.start()
    try:
        _wait("the control socket", sock.exists)
        with ControlClient(sock) as client:
            _wait("the VM to run", lambda: client.request("status")["state"] == "running")
            # The user's own target is the floor: reclaim stands on it.
            reply = client.request("balloon", target="8M")
            assert (reply["target"], reply["user_target"]) == (8 * MIB, 8 * MIB)
            _wait("a first reading", lambda: client.reclaim()["host"] is not None)
            calm = client.reclaim()
            assert calm["host"]["pressure"] is None
            assert (calm["target"], calm["taken"], calm["raises"]) == (8 * MIB, 0, 0)

            host.pressed = True
            _wait("the target to reach max", lambda: client.reclaim()["target"] == 64 * MIB)
            report = client.reclaim()
            assert report["host"]["mem_available"] == 512 * MIB
            assert report["host"]["pressure"].startswith("MemAvailable 512 MiB < min-free")
            assert [move["to"] for move in report["history"]] == [m * MIB for m in (24, 40, 56, 64)]
            assert report["taken"] == 56 * MIB
            _seen_by_the_device(client, 64 * MIB)

            host.pressed = False
            _wait("the target to come back", lambda: client.reclaim()["target"] == 8 * MIB)
            report = client.reclaim()
            moves = [move["to"] for move in report["history"]]
            assert moves[4:] == [m * MIB for m in (48, 32, 16, 8)]
            assert all(
                "no pressure for 2 readings" in move["why"] for move in report["history"][4:]
            )
            assert (report["taken"], report["lowers"]) == (0, 4)
            _seen_by_the_device(client, 8 * MIB)

            # A new policy, live: a lower max holds the balloon there under pressure.
            changed = client.reclaim(max="32M", step="32M")
            assert (changed["policy"]["max"], changed["policy"]["step"]) == (32 * MIB, 32 * MIB)
            host.pressed = True
            _wait("the new max", lambda: client.reclaim()["target"] == 32 * MIB)
            _seen_by_the_device(client, 32 * MIB)
            client.request("stop")
    finally:
        if runner.is_alive() and sock.exists():
            with contextlib.suppress(KasouError), ControlClient(sock) as client:
                client.request("stop")
        runner.join(30)
    assert not runner.is_alive()
    assert endings and endings[0].kind is ExitKind.STOPPED


def _seen_by_the_device(client: ControlClient, target: int) -> None:
    """The balloon's own view: the ``balloon`` request and its ``devices`` counters."""
    assert client.request("balloon")["target"] == target
    (device,) = [dev for dev in client.request("devices")["devices"] if dev["id"] == "balloon"]
    counters: dict[str, Any] = device["counters"]
    assert counters["target_pages"] == target // 4096
