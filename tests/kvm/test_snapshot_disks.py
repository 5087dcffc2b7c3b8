"""``kasou snapshot create --copy-disks``: a plain snapshot that copies the disks the user
attached (the writable ones) while the VM is paused, so ``kasou run --restore`` runs on the
disk as it was, and leaves the user's file alone.

The guest is the guest kit's ``vblk-watch``: it reads sector 0 of its first disk again and
again and prints the CRC-32 of what it read, so a restored VM's console tells which
content its disk has.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

from kasou.guestkit import cmdline

from .conftest import KASOU, kasou_with_socket

MIB = 1 << 20
SECTOR = 512
WATCH = re.compile(rb"vblk-watch read=\d+ crc=0x([0-9a-f]{8})\n")


def _kasou(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([KASOU, *args], capture_output=True, timeout=120, check=False)


@pytest.mark.timeout(120)  # the console is read line by line: a silent guest must not hang
def test_copy_disks_snapshots_the_writable_disks_and_a_restore_runs_on_them(
    guest_elf: Path, tmp_path: Path
) -> None:
    data, seed = tmp_path / "data.raw", tmp_path / "seed.raw"
    data.write_bytes(b"A" * SECTOR + bytes(MIB - SECTOR))
    seed.write_bytes(bytes(MIB))
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="ks"))  # a short socket path
    sock, snapshot = folder / "vm.sock", tmp_path / "snap"
    try:
        command = [KASOU, "run", "--kernel", str(guest_elf), "--memory", "64M"]
        watch = ["--cmdline", cmdline("vblk-watch", every=16)]
        disks = ["--disk", f"{data},format=raw", "--disk", f"{seed},ro"]
        with kasou_with_socket([*command, *watch, *disks, "--api-sock", str(sock)], sock):
            done = _kasou(
                "snapshot", "create", "--sock", str(sock), "--copy-disks", "--json", str(snapshot)
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result["disks"] == [
                {"path": str(data), "copy": "disk0.raw"},
                {"path": str(seed), "copy": None},  # read-only: not copied
            ]
            assert result["paused_seconds"] > 0
        assert (snapshot / "disk0.raw").read_bytes() == data.read_bytes()

        data.write_bytes(b"B" * SECTOR + bytes(MIB - SECTOR))  # changed after the snapshot
        restored = subprocess.Popen(
            [KASOU, "run", "--restore", str(snapshot)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert restored.stdout is not None
        seen: list[bytes] = []
        try:
            for line in restored.stdout:  # the guest's console, until three reads
                seen += WATCH.findall(line)
                if len(seen) >= 3:
                    break
        finally:
            restored.kill()
            restored.communicate()
        assert set(seen) == {f"{zlib.crc32(b'A' * SECTOR):08x}".encode()}
        assert data.read_bytes()[:SECTOR] == b"B" * SECTOR  # the restore did not write it
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
