"""``kasou shutdown`` and ``ControlClient.shutdown``: the CLI against a real control socket
with a fake VM behind it that answers the way kasou's runner does (the button pressed, then
the VM's ending, or nothing within the wait, or kasou exiting before it can reply)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kasou.cli.app import app
from kasou.client import ControlClient
from kasou.client.control import RemoteError
from kasou.errors import GuestError
from kasou.event import EventLoop
from kasou.vmm.control import ControlServer, Deferred
from kasou.vmm.requests import Reply, Request, RequestKind

DEADLINE = 5.0


class FakeVm:
    """Answers ``shutdown`` with what ``ending`` returns (after the wait it was given)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.listening = True
        self.ending: Callable[[float], dict[str, Any] | None] = lambda wait: {
            "kind": "poweroff",
            "reason": "the guest powered off",
        }
        self.release = threading.Event()

    def handle(self, request: Request) -> Reply | Deferred:
        self.requests.append(request)
        assert request.kind is RequestKind.SHUTDOWN
        if not self.listening:
            raise GuestError("the guest has not enabled the ACPI power button: `kasou stop` ...")
        pressed = {"state": "running", "power_button": "pressed"}
        if request.wait <= 0:
            return Reply(True, pressed)

        def finish() -> Reply:
            ending = self.ending(request.wait)
            return Reply(True, {**pressed, "ending": ending, "seconds": 2.25})

        return finish


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def server(vm: FakeVm) -> Iterator[ControlServer]:
    folder = Path(tempfile.mkdtemp(prefix="kasou-sd-", dir="/tmp"))  # short socket path
    loop = EventLoop("kasou-test-shutdown")
    loop.start()
    serving = ControlServer(folder / "vm.sock", loop, vm.handle)
    yield serving
    serving.close()
    loop.stop()
    shutil.rmtree(folder, ignore_errors=True)


def shutdown(server: ControlServer, *options: str) -> Any:
    return CliRunner().invoke(app, ["shutdown", "--sock", str(server.path), *options])


def test_the_guest_powering_off_is_exit_0(server: ControlServer, vm: FakeVm) -> None:
    result = shutdown(server, "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "the guest powered off after 2.2 s"
    assert [request.wait for request in vm.requests] == [30.0]


def test_the_default_wait_is_60_seconds(server: ControlServer, vm: FakeVm) -> None:
    assert shutdown(server).exit_code == 0
    assert vm.requests[0].wait == 60.0


def test_a_guest_still_running_at_the_timeout_is_exit_1_and_points_at_stop(
    server: ControlServer, vm: FakeVm
) -> None:
    vm.ending = lambda wait: None
    result = shutdown(server, "--timeout", "5")
    assert result.exit_code == 1
    assert "did not power off within 5 s" in result.stderr
    assert f"kasou stop --sock {server.path}" in result.stderr


def test_a_vm_that_ends_another_way_is_exit_1(server: ControlServer, vm: FakeVm) -> None:
    vm.ending = lambda wait: {"kind": "reboot", "reason": "the guest reset the machine"}
    result = shutdown(server)
    assert result.exit_code == 1
    assert "ended without powering off: the guest reset the machine" in result.stderr


def test_a_guest_without_the_power_button_is_a_one_line_error(
    server: ControlServer, vm: FakeVm
) -> None:
    vm.listening = False
    result = shutdown(server)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("kasou: error: the guest has not enabled the ACPI power button")
    assert "kasou stop" in line


def test_kasou_exiting_before_it_replies_counts_as_the_vm_ending(
    server: ControlServer, vm: FakeVm
) -> None:
    # kasou closes its control socket as it exits, possibly before the waiting reply is out.
    def exit_first(wait: float) -> dict[str, Any] | None:
        server.close()
        vm.release.wait(DEADLINE)
        return None

    vm.ending = exit_first
    with ControlClient(server.path, timeout=DEADLINE) as client:
        result = client.shutdown(wait=10)
    vm.release.set()
    assert result["ending"]["kind"] == "closed"
    assert result["power_button"] == "pressed"


def test_the_sdk_without_waiting_returns_once_pressed(server: ControlServer, vm: FakeVm) -> None:
    with ControlClient(server.path, timeout=DEADLINE) as client:
        assert client.shutdown(wait=0) == {"state": "running", "power_button": "pressed"}
        vm.listening = False
        with pytest.raises(RemoteError, match="power button") as refused:
            client.shutdown(wait=0)
    assert refused.value.type == "GuestError"


@pytest.mark.parametrize("timeout", ["0", "-1", "90000"])
def test_the_timeout_must_be_a_sensible_number_of_seconds(
    server: ControlServer, vm: FakeVm, timeout: str
) -> None:
    result = shutdown(server, "--timeout", timeout)
    assert result.exit_code == 2
    assert "--timeout must be above 0 seconds" in result.stderr
    assert vm.requests == []  # nothing was pressed
