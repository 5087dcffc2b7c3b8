"""Snapshot, restore, clone and live migration of the default Linux guest, as a user runs
them: ``kasou snapshot create``, ``kasou run --restore``, ``kasou run --incoming`` and
``kasou migrate`` between kasou processes.

The guest has its root on a virtio disk (a qcow2 overlay kasou made), a virtio-net interface
on a TAP and the agent on vsock, and runs a process that appends a counter to a file on its
disk ten times a second, syncing each line. Through the snapshot, the restore and the
migration, the process goes on (its counter keeps growing without restarting), the file is
intact (every line is the next number), the network and the agent answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .conftest import BOOT_TIMEOUT, KASOU, Launcher, RunningGuest

WRITER = "i=0; while true; do i=$((i+1)); echo $i >> /root/counter; sync; sleep 0.1; done"


def _tap_up(tap: str, address: str, mac: str | None = None) -> None:
    if mac is not None:
        subprocess.run(["ip", "link", "set", tap, "address", mac], check=True)
    subprocess.run(["ip", "addr", "add", address, "dev", tap], check=True)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)


def _mac_of(interface: str) -> str:
    shown = json.loads(
        subprocess.run(
            ["ip", "-j", "link", "show", interface], check=True, capture_output=True, text=True
        ).stdout
    )
    return str(shown[0]["address"])


def _counter(guest: RunningGuest) -> list[int]:
    """The writer's file, checked whole: 1, 2, 3, ... with nothing missing or garbled."""
    text = guest.output("sh", "-c", "cat /root/counter 2>/dev/null || true")
    numbers = [int(line) for line in text.split()]
    assert numbers == list(range(1, len(numbers) + 1)), text[-200:]
    return numbers


def _goes_on(guest: RunningGuest, after: int) -> int:
    """Wait until the writer has gone past ``after`` (it was not restarted); return the
    count."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        numbers = _counter(guest)
        if numbers and numbers[-1] > after + 5:
            return numbers[-1]
        time.sleep(0.5)
    raise AssertionError(f"the writer stopped at {after}")


def _start_saved(tmp_path: Path, name: str, *args: str) -> RunningGuest:
    """``kasou run`` of a saved VM (``--restore DIR`` or ``--incoming URL``)."""
    sock, console = tmp_path / f"{name}.sock", tmp_path / f"{name}.log"
    process = subprocess.Popen(
        [KASOU, "run", *args, "--api-sock", str(sock), "--console", f"file:{console}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return RunningGuest(process, sock, console, 256 << 20)


def _wait_socket(guest: RunningGuest, path: Path) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not path.exists():
        if guest.process.poll() is not None:
            raise AssertionError(f"kasou ended early: {guest.process.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _close(guest: RunningGuest) -> None:
    """End the kasou process; what it said and its console are printed (pytest shows them
    when the test fails)."""
    if guest.process.poll() is None:
        guest.process.terminate()
    try:
        _, stderr = guest.process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        guest.process.kill()
        _, stderr = guest.process.communicate()
    print(
        f"--- {guest.sock.name}: exit {guest.process.returncode}\n{stderr.decode(errors='replace')}"
    )
    print(f"--- its console:\n{guest.console_text()[-3000:]}")


def test_snapshot_restore_clone_and_migrate_a_guest_writing_its_disk(
    launch: Launcher, tmp_path: Path
) -> None:
    suffix = os.getpid() % 10000
    tap, tap2 = f"ks{suffix}", f"km{suffix}"
    guest = launch("--net", f"tap={tap}", root_disk=True, cmdline="kasou.ip=10.78.0.2/24")
    guest.output("true")
    _tap_up(tap, "10.78.0.1/24")
    guest.output("setsid", "sh", "-c", f"{WRITER} </dev/null >/dev/null 2>&1 &")
    _goes_on(guest, 0)

    # A snapshot; the VM runs on, then stops.
    folder = tmp_path / "snap"
    before_snapshot = _counter(guest)[-1]
    created = subprocess.run(
        [KASOU, "snapshot", "create", "--sock", str(guest.sock), str(folder), "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert created.returncode == 0, created.stderr
    result = json.loads(created.stdout)
    assert result["kind"] == "full" and result["state"] == "running"
    at_snapshot = _counter(guest)[-1]
    _goes_on(guest, at_snapshot)
    guest.request("stop")
    assert guest.wait(60) == 0

    # Restored: the writer goes on from the snapshot's count, the file intact; the TAP (made
    # again under the saved name), the agent and the network answer.
    restored = _start_saved(tmp_path, "restored", "--restore", str(folder))
    clone: RunningGuest | None = None
    migrated: RunningGuest | None = None
    try:
        _wait_socket(restored, restored.sock)
        numbers = _counter(restored)
        assert numbers[-1] >= before_snapshot
        _tap_up(tap, "10.78.0.1/24")
        count = _goes_on(restored, numbers[-1])
        ping = restored.run("ping", "-c", "2", "-W", "5", "10.78.0.1")
        assert ping["status"] == 0, ping

        # A clone of the same snapshot at once beside it: its own overlay, MAC and sockets;
        # its guest is told it was cloned (VM generation ID: Linux reseeds its RNG).
        clone = _start_saved(tmp_path, "clone", "--restore", str(folder), "--clone")
        _wait_socket(clone, clone.sock)
        _goes_on(clone, before_snapshot)
        deadline = time.monotonic() + 60
        while "virtual machine fork" not in clone.output("dmesg"):
            assert time.monotonic() < deadline, clone.output("dmesg")[-2000:]
            time.sleep(0.5)
        mac = clone.request("devices")["devices"]
        assert mac  # the clone's devices answer
        clone.request("stop")
        assert clone.wait(60) == 0
        assert _counter(restored)[-1] >= count  # the clone's writes never reached it

        # Live migration to another kasou process, on a TAP of its own.
        incoming = tmp_path / "incoming.sock"
        migrated = _start_saved(
            tmp_path, "migrated", "--incoming", f"unix:{incoming}", "--net", f"tap={tap2}"
        )
        _wait_socket(migrated, incoming)
        before = _counter(restored)[-1]
        # The destination's TAP takes the place of the source's on the same link: the
        # host's side keeps its MAC (the guest's ARP cache holds it), as a bridge would.
        host_mac = _mac_of(tap)
        sent = subprocess.run(
            [KASOU, "migrate", "--sock", str(restored.sock), f"unix:{incoming}", "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        figures = json.loads(sent.stdout)
        assert figures["phase"] == "completed" and figures["downtime"] < 30
        assert restored.wait(60) == 0
        _tap_up(tap2, "10.78.0.1/24", mac=host_mac)
        _goes_on(migrated, before)
        ping = migrated.run("ping", "-c", "2", "-W", "5", "10.78.0.1")
        assert ping["status"] == 0, ping
        migrated.request("stop")
        assert migrated.wait(60) == 0
    finally:
        for running in (restored, clone, migrated):
            if running is not None:
                _close(running)
