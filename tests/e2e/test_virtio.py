"""The default guest on virtio: its root disk, data disks, overlays, network, vsock exec and
copy, the balloon. Each test is something a user of the guest would check by hand."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .conftest import KASOU, Launcher, RunningGuest


def kasou(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([KASOU, *args], capture_output=True, timeout=timeout, check=False)


def test_the_root_file_system_is_the_virtio_disk(launch: Launcher) -> None:
    guest = launch(root_disk=True)
    mounts = guest.output("cat", "/proc/mounts")
    assert "/dev/root / ext4 rw" in mounts, mounts
    major, minor = guest.output("cat", "/sys/block/vda/dev").split(":")
    assert int(guest.output("stat", "-c", "%d", "/")) == int(major) << 8 | int(minor)  # / is vda
    assert guest.output("cat", "/sys/block/vda/serial") == "kasou-root"
    devices = {device["id"]: device for device in guest.request("devices")["devices"]}
    assert devices["block0"]["active"] and devices["block0"]["counters"]["reads"] > 0
    assert devices["vsock"]["active"] and devices["rng"]["active"]
    # the entropy device feeds the kernel's hwrng
    assert guest.output("cat", "/sys/class/misc/hw_random/rng_current") == "virtio_rng.0"


def test_a_flushed_write_survives_kill_9_of_kasou(launch: Launcher, tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    with open(data, "wb") as file:
        file.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(data)], check=True)  # busybox has no mkfs.ext4
    guest = launch("--disk", f"{data},serial=data", root_disk=True)
    assert guest.output("cat", "/sys/block/vdb/serial") == "data"
    guest.output("mkdir", "-p", "/mnt")
    guest.output("mount", "/dev/vdb", "/mnt")
    guest.output("sh", "-c", "seq 1 100000 > /mnt/numbers && sync")
    expected = guest.output("md5sum", "/mnt/numbers").split()[0]
    guest.process.send_signal(signal.SIGKILL)
    guest.wait()
    guest.sock.unlink()  # kill -9 leaves it; a kasou started on that path would replace it
    again = launch("--disk", f"{data},serial=data", root_disk=True)
    again.output("mkdir", "-p", "/mnt")
    again.output("mount", "/dev/vdb", "/mnt")
    assert again.output("md5sum", "/mnt/numbers").split()[0] == expected


def test_two_vms_share_one_base_through_qcow2_overlays(launch: Launcher, tmp_path: Path) -> None:
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as file:
        file.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(base)], check=True)
    before = base.read_bytes()
    overlays = []
    for name in ("a", "b"):
        overlay = tmp_path / f"{name}.qcow2"
        made = kasou("disk", "create", "--backing", str(base), str(overlay))
        assert made.returncode == 0, made.stderr
        overlays.append(overlay)
    guests = [launch("--disk", str(overlay), root_disk=True) for overlay in overlays]
    for name, guest in zip(("a", "b"), guests, strict=True):
        guest.output("mkdir", "-p", "/mnt")
        guest.output("mount", "/dev/vdb", "/mnt")
        guest.output("sh", "-c", f"echo {name} > /mnt/who && sync")
    for name, guest in zip(("a", "b"), guests, strict=True):
        assert guest.output("cat", "/mnt/who") == name
        guest.output("umount", "/mnt")
        guest.trigger("poweroff")
        assert guest.wait() == 0
    assert base.read_bytes() == before  # the base is never written
    for overlay in overlays:
        check = subprocess.run(
            ["qemu-img", "check", str(overlay)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "No errors were found" in check.stdout


def test_ping_and_tcp_through_a_tap(launch: Launcher) -> None:
    tap = f"kt{os.getpid() % 10000}"
    guest = launch("--net", f"tap={tap}", root_disk=True, cmdline="kasou.ip=10.77.0.2/24")
    guest.output("true")  # the VM is built (its TAP exists) once the agent answers
    subprocess.run(["ip", "addr", "add", "10.77.0.1/24", "dev", tap], check=True)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    result = guest.run("ping", "-c", "3", "-W", "5", "10.77.0.1")
    assert result["status"] == 0, result
    received = bytearray()
    with socket.create_server(("10.77.0.1", 5077)) as server:
        server.settimeout(120)

        def serve() -> None:
            connection, _ = server.accept()
            with connection:
                while chunk := connection.recv(1 << 16):
                    received.extend(chunk)

        thread = threading.Thread(target=serve)
        thread.start()
        sent = guest.run(
            "sh", "-c", "dd if=/dev/zero bs=64k count=160 2>/dev/null | nc 10.77.0.1 5077"
        )
        thread.join(120)
        assert sent["status"] == 0, sent
        assert len(received) == 160 * 65536 and not any(received)
    counters = {d["id"]: d for d in guest.request("devices")["devices"]}["net0"]["counters"]
    assert counters["tx_packets"] > 0 and counters["rx_packets"] > 0


def test_exec_streams_100_mb_and_returns_the_status(launch: Launcher, tmp_path: Path) -> None:
    guest = launch(root_disk=True)
    guest.output("true")  # booted
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        result = subprocess.run(
            [
                KASOU,
                "exec",
                "--sock",
                str(guest.sock),
                "--",
                "sh",
                "-c",
                "head -c 100000000 /dev/zero; echo oops >&2; exit 7",
            ],
            stdout=sink,
            check=False,
            stderr=subprocess.PIPE,
            timeout=600,
        )
    assert result.returncode == 7
    assert out.stat().st_size == 100_000_000
    assert b"oops" in result.stderr


def test_exec_forwards_stdin(launch: Launcher) -> None:
    guest = launch(root_disk=True)
    guest.output("true")
    result = subprocess.run(
        [KASOU, "exec", "--sock", str(guest.sock), "--", "md5sum"],
        input=b"x" * 1_000_000,
        check=False,
        capture_output=True,
        timeout=300,
    )
    import hashlib

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.md5(b"x" * 1_000_000).hexdigest()


def test_cp_copies_a_directory_both_ways(launch: Launcher, tmp_path: Path) -> None:
    guest = launch(root_disk=True)
    guest.output("true")
    tree = tmp_path / "tree"
    (tree / "sub" / "empty").mkdir(parents=True)
    (tree / "a.txt").write_text("hello\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (tree / "sub" / "b.bin").chmod(0o751)
    into = kasou("cp", "--sock", str(guest.sock), str(tree), ":/root/")
    assert into.returncode == 0, into.stderr
    assert guest.output("cat", "/root/tree/a.txt") == "hello"
    assert guest.output("stat", "-c", "%a", "/root/tree/sub/b.bin") == "751"
    back = tmp_path / "back"
    back.mkdir()
    out = kasou("cp", "--sock", str(guest.sock), ":/root/tree", str(back))
    assert out.returncode == 0, out.stderr
    assert (back / "tree" / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()
    assert (back / "tree" / "sub" / "empty").is_dir()
    shutil.rmtree(back)


def _free_kib(guest: RunningGuest) -> int:
    """MemFree: the balloon's pages leave it (MemTotal stays, with DEFLATE_ON_OOM offered)."""
    for line in guest.output("cat", "/proc/meminfo").splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1])
    raise AssertionError("no MemFree")


def _wait(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # the guest works at its own pace: polled, with a deadline
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_memory_the_guest_frees_goes_back_to_the_host(launch: Launcher) -> None:
    guest = launch("--balloon", root_disk=True, memory="512M")
    guest.output("true")
    baseline = guest.vmm_rss_total()
    fill = "mkdir -p /run/fill && mount -t tmpfs -o size=400m tmpfs /run/fill"
    guest.output("sh", "-c", f"{fill} && dd if=/dev/zero of=/run/fill/f bs=1M count=300")
    touched = guest.vmm_rss_total()
    assert touched > baseline + (250 << 20)
    guest.output("sh", "-c", "rm /run/fill/f && umount /run/fill")
    # Free page reporting hands the freed pages back; kasou discards them (RSS drops).
    _wait(lambda: guest.vmm_rss_total() < touched - (200 << 20), "kasou's RSS did not drop")
    counters = guest.request("balloon")["counters"]
    assert counters["reported_pages"] > 0


def test_balloon_inflation_takes_memory_from_the_guest(launch: Launcher) -> None:
    guest = launch("--balloon", root_disk=True, memory="512M")
    guest.output("true")
    free_before = _free_kib(guest)
    rss_before = guest.vmm_rss_total()
    reply = guest.request("balloon", target="256M")
    assert reply["target"] == 256 << 20
    _wait(lambda: guest.request("balloon")["actual"] >= 256 << 20, "no inflation")
    assert _free_kib(guest) <= free_before - 250 * 1024
    assert guest.vmm_rss_total() < rss_before + (16 << 20)  # the pages taken are not resident
    guest.request("balloon", target=0)
    _wait(lambda: guest.request("balloon")["actual"] == 0, "no deflation")
    assert _free_kib(guest) >= free_before - 32 * 1024
    _wait(lambda: guest.request("balloon")["stats"].get("total_memory", 0) > 0, "no statistics")


def test_a_vsock_connection_from_the_host_reaches_the_guest_agent(launch: Launcher) -> None:
    guest = launch(root_disk=True)
    guest.output("true")
    uds = Path(guest.request("status")["vsock"]["uds"])
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(str(uds))
        client.sendall(b"CONNECT 1024\n")
        line = b""
        while not line.endswith(b"\n"):
            line += client.recv(1)
        assert line.startswith(b"OK "), line
