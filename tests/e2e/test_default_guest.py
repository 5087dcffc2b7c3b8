"""The default Linux guest under kasou, as a user sees it."""

from __future__ import annotations

import time

import pytest

from .conftest import Launcher


@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_guest_boots_to_its_agent_and_sees_its_vcpus(launch: Launcher, vcpus: int) -> None:
    guest = launch(vcpus=vcpus)
    assert guest.output("nproc") == str(vcpus)
    assert guest.output("uname", "-s") == "Linux"
    status = guest.request("status")
    assert status["agent"]["ready"] is True
    assert status["vcpus"] == vcpus


def test_the_guests_clock_is_right(launch: Launcher) -> None:
    guest = launch()
    guest_seconds = int(guest.output("date", "+%s"))
    assert abs(guest_seconds - time.time()) < 10


def test_poweroff_in_the_guest_ends_kasou_with_status_0(launch: Launcher) -> None:
    guest = launch()
    guest.output("true")  # booted
    guest.trigger("poweroff")
    assert guest.wait() == 0


def test_reboot_ends_kasou_when_told_to_exit(launch: Launcher) -> None:
    guest = launch("--on-reboot", "exit")
    guest.output("true")
    guest.trigger("reboot")
    assert guest.wait() == 0
    assert "reboot: Restarting system" in guest.console_text()


def test_reboot_restarts_the_guest_when_told_to(launch: Launcher) -> None:
    guest = launch("--on-reboot", "restart")
    first_boot = guest.output("cat", "/proc/sys/kernel/random/boot_id")
    guest.trigger("reboot")
    deadline = time.monotonic() + 120
    while guest.request("status").get("boots", 1) < 2:  # wait for the second boot
        assert time.monotonic() < deadline, "the guest did not boot again"
        time.sleep(0.2)
    second_boot = guest.output("cat", "/proc/sys/kernel/random/boot_id")
    assert second_boot != first_boot
    assert guest.process.poll() is None


def test_a_debian_stock_kernel_boots_to_its_console_and_an_initramfs_shell(
    launch: Launcher,
) -> None:
    from kasou.nested import stock_bzimage

    guest = launch(kernel=stock_bzimage(), memory="512M", cmdline="console=ttyS0 reboot=k panic=-1")
    release = guest.output("uname", "-r")
    assert release.endswith("-amd64")
    assert "Linux version " in guest.console_text()
    assert "BusyBox" in guest.console_text()  # the shell on the console
