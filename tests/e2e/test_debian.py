"""Debian 12 as users bring it: the image `kasou image build --distro debian-12` makes (GPT,
ext4 root, Debian's stock cloud kernel and initramfs-tools initramfs, systemd, cloud-init),
booted firmware-less with `kasou run --image`, a NoCloud seed from `--cloud-init`, a static
address on a TAP, and `kasou shutdown` pressing the ACPI power button. One boot to systemd's
multi-user target serves those checks: it takes minutes in the nested host. The vCPUs the
stock kernel finds through ACPI are checked on a boot of their own, early in the kernel: the
nested host has one vCPU, and a two-vCPU guest going further there stalls on its lock
holders (shared/ENVIRONMENT.md)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import KASOU, RunningGuest

BOOT_TIMEOUT = 100.0  # each request's own limit; the boot may take longer
BOOT_DEADLINE = 900.0
GUEST_IP, HOST_IP = "10.78.0.2", "10.78.0.1"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKasouKasouKasouKasouKasouKasouKasouKasou0 e2e@kasou"

USER_DATA = f"""#cloud-config
users:
  - name: alice
    shell: /bin/bash
    ssh_authorized_keys:
      - {KEY}
write_files:
  - path: /etc/kasou-e2e
    content: written by cloud-init
runcmd:
  - [sh, -c, "echo ran > /var/tmp/kasou-runcmd"]
"""

NETWORK_CONFIG = f"""version: 2
ethernets:
  uplink:
    match:
      macaddress: "52:54:00:12:34:56"
    addresses: [{GUEST_IP}/24]
"""


@pytest.fixture(scope="module")
def debian_image() -> Any:
    from kasou.image import debian_image as find

    return find(build=False)


@pytest.fixture(scope="module")
def debian(debian_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGuest]:
    scratch = tmp_path_factory.mktemp("debian")
    user_data, network = scratch / "user-data.yaml", scratch / "network-config.yaml"
    user_data.write_text(USER_DATA)
    network.write_text(NETWORK_CONFIG)
    tap = f"kd{os.getpid() % 10000}"
    sock, console = (
        Path("/run") / f"kasou-debian-{os.getpid()}.sock",
        Path(os.environ.get("KASOU_E2E_CONSOLE_DIR", scratch)) / "debian-console.log",
    )
    before = _digest(debian_image.disk)
    command = [
        KASOU, "run", "--image", str(debian_image.disk),
        "--cloud-init", f"user-data={user_data},network-config={network}",
        "--net", f"tap={tap},mac=52:54:00:12:34:56",
        "--vcpus", "1", "--memory", "1G",
        "--console", f"file:{console}", "--api-sock", str(sock),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    guest = RunningGuest(process, sock, console, 1 << 30)
    try:
        # the control socket answers while the VM is being built; the TAP exists once it is
        built = Path("/sys/class/net") / tap
        _wait_for(lambda: built.exists() or process.poll() is not None, 120, f"TAP {tap}")
        assert process.poll() is None, process.communicate()
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        _wait_for(lambda: _agent_ready(guest), BOOT_DEADLINE, "the guest agent")
        # cloud-init's first boot runs long under TCG: ask systemd until it has settled
        states: list[str] = []
        _wait_for(lambda: _settled(guest, states), BOOT_DEADLINE, "systemd to settle", every=2)
        guest.boot_seconds = time.monotonic() - started  # type: ignore[attr-defined]
        guest.system_state = states[-1]  # type: ignore[attr-defined]
        yield guest
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.communicate()
        print(f"\nconsole:\n{console.read_text(errors='replace')[-3000:]}")
    assert _digest(debian_image.disk) == before, "the image changed: --image must use an overlay"
    assert not sock.exists()


def _settled(guest: RunningGuest, states: list[str]) -> bool:
    """systemd's state once it is neither initializing nor starting."""
    states.append(str(guest.run("systemctl", "is-system-running")["stdout"]).strip())
    return states[-1] not in ("initializing", "starting")


def _agent_ready(guest: RunningGuest) -> bool:
    assert guest.process.poll() is None, guest.process.communicate()
    return bool(guest.request("status")["agent"]["ready"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(done: Any, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # waiting on another process, with a deadline
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def test_the_stock_kernel_sees_every_vcpu_and_the_ioapic(debian_image: Any, tmp_path: Path) -> None:
    """Debian's kernel has no MP-table parser: without ACPI's MADT it would boot on one CPU
    and skip the IOAPIC. Watched until its second CPU is up, early in the kernel's boot (a
    two-vCPU guest going further stalls in the one-vCPU nested host)."""
    console = tmp_path / "console.log"
    command = [
        KASOU, "run", "--image", str(debian_image.disk), "--vcpus", "2", "--memory", "1G",
        "--cmdline", "console=ttyS0 panic=-1", "--console", f"file:{console}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for(
            lambda: b"smp: Brought up" in _read(console) or process.poll() is not None,
            300,
            "the second CPU",
        )
        log = _read(console).decode(errors="replace")
        assert "smp: Brought up 1 node, 2 CPUs" in log, log[-3000:]
        assert "ACPI: Using ACPI (MADT) for SMP configuration information" in log
        assert "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23" in log
        assert "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)" in log
    finally:
        process.terminate()
        assert process.wait(60) == 0  # SIGTERM stops the VM: status 0
        process.communicate()


def test_debian_reaches_multi_user_with_systemd(debian: RunningGuest) -> None:
    state = debian.system_state  # type: ignore[attr-defined]
    failed = debian.run("systemctl", "--failed", "--no-legend", "--plain")["stdout"]
    # "degraded" is accepted only with the failing units named (and explained in the README)
    assert state == "running" or (state == "degraded" and failed.strip()), (state, failed)
    assert debian.output("systemctl", "is-active", "multi-user.target") == "active"
    assert debian.output("cat", "/proc/1/comm") == "systemd"
    print(f"boot to multi-user: {debian.boot_seconds:.1f} s; failed units: {failed!r}")  # type: ignore[attr-defined]


def test_stock_kernel_and_its_initramfs_root_on_virtio_through_the_overlay(
    debian: RunningGuest, debian_image: Any
) -> None:
    assert debian.output("uname", "-r").endswith("-cloud-amd64")
    source = debian.output("findmnt", "-n", "-o", "SOURCE", "/")
    assert source == "/dev/vda1", source
    assert debian_image.root_uuid in debian.output("cat", "/proc/cmdline")
    assert "virtio_blk" in debian.output("cat", "/proc/modules")  # loaded from the initramfs


def test_acpi_tables_as_the_stock_kernel_reads_them(debian: RunningGuest) -> None:
    dmesg = debian.output("dmesg")
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "FACS"):
        assert f"ACPI: {table} 0x" in dmesg, table
    assert "IOAPIC[0]: apic_id 1, version 17, address 0xfec00000, GSI 0-23" in dmesg
    assert "MP tables are not detected" not in dmesg
    assert debian.output("nproc") == "1"


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def test_cloud_init_ran_the_user_data(debian: RunningGuest) -> None:
    result = debian.run("cloud-init", "status", "--wait", timeout=BOOT_TIMEOUT)
    assert "done" in str(result["stdout"]), result
    assert debian.output("cat", "/var/tmp/kasou-runcmd") == "ran"
    assert debian.output("cat", "/etc/kasou-e2e") == "written by cloud-init"
    assert debian.output("getent", "passwd", "alice").startswith("alice:")
    assert KEY in debian.output("cat", "/home/alice/.ssh/authorized_keys")
    assert debian.output("cloud-init", "query", "platform") == "nocloud"


def test_the_network_is_up(debian: RunningGuest) -> None:
    """The address from cloud-init's network-config, and a TCP connection from the guest to
    the host's end of the TAP (bash's /dev/tcp: the image has no ping or nc)."""
    assert f"inet {GUEST_IP}/24" in debian.output("ip", "-4", "addr")
    with socket.create_server((HOST_IP, 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]
        sent = debian.run("bash", "-c", f"echo hello over the tap > /dev/tcp/{HOST_IP}/{port}")
        assert sent["status"] == 0, sent
        connection, (peer, _) = server.accept()
        with connection:
            connection.settimeout(60)
            assert peer == GUEST_IP
            assert connection.makefile("rb").read() == b"hello over the tap\n"


def test_kasou_shutdown_ends_debian_cleanly(debian: RunningGuest) -> None:
    # last: it ends the shared guest
    result = subprocess.run(
        [KASOU, "shutdown", "--sock", str(debian.sock), "--timeout", "120"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert debian.process.wait(60) == 0
    console = debian.console_text()
    assert "reboot: Power down" in console, console[-2000:]
