"""``kasou run --image``: a disk image boots firmware-less with its own kernel and root.

The image is made here from the default guest, shaped like a distribution's: a GPT disk whose
partition 1 is the guest's ext4 root with its kernel inside as /boot/vmlinuz-6.1.0-kasou and
a /vmlinuz link to it (the guest's vmlinux: the loader takes ELF as well as bzImage). It has
no initrd, so kasou gives the kernel ``root=PARTUUID=...``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import BOOT_TIMEOUT, KASOU, RunningGuest

KERNEL_NAME = "vmlinuz-6.1.0-kasou"

pytestmark = pytest.mark.skipif(
    shutil.which("sfdisk") is None or shutil.which("debugfs") is None,
    reason="sfdisk and debugfs are needed (apt-get install fdisk e2fsprogs)",
)


def _run(*argv: str | Path, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(arg) for arg in argv], input=stdin, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def _guest_image(folder: Path, guest: Any) -> Path:
    """The default guest as a one-partition GPT disk with its kernel in /boot."""
    root = folder / "root.ext4"
    shutil.copyfile(guest.rootfs, root)
    for request in (
        "mkdir /boot",
        f"write {guest.kernel} /boot/{KERNEL_NAME}",
        f"symlink /vmlinuz boot/{KERNEL_NAME}",
    ):
        _run("debugfs", "-w", "-R", request, root)
    assert KERNEL_NAME in _run("debugfs", "-R", "ls /boot", root)
    image = folder / "guest.raw"
    size = root.stat().st_size
    with image.open("wb") as file:
        file.truncate(size + (2 << 20))
    _run("sfdisk", "-q", image, stdin=f"label: gpt\nstart=2048, size={size // 512}\n")
    with image.open("r+b") as file, root.open("rb") as source:
        file.seek(1 << 20)
        shutil.copyfileobj(source, file)
    return image


def _digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def test_an_image_boots_with_its_kernel_and_root_and_stays_untouched(
    tmp_path: Path, default_guest: Any
) -> None:
    image = _guest_image(tmp_path, default_guest)
    before = _digest(image)
    scratch = tmp_path / "scratch"  # kasou's temporary folder: the overlay, the kernel
    scratch.mkdir()
    sock, console = tmp_path / "vm.sock", tmp_path / "console.log"
    command = [KASOU, "run", "--image", str(image), "--memory", "256M"]
    command += ["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"]  # kasou adds the root
    command += ["--console", f"file:{console}", "--api-sock", str(sock)]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    guest = RunningGuest(process, sock, console, 256 << 20)
    try:
        while not sock.exists():  # another process's startup, with a deadline
            assert process.poll() is None, process.communicate()
            assert time.monotonic() - started < BOOT_TIMEOUT, "no control socket"
            time.sleep(0.05)
        assert any(scratch.iterdir())  # the overlay and the kernel, while it runs

        # The kernel found the root the image's partition table names: / is /dev/vda1
        # (mountinfo: ID, parent, MAJOR:MINOR, root, mount point, ...).
        mounts = [line.split() for line in guest.output("cat", "/proc/self/mountinfo").splitlines()]
        (root_device,) = [fields[2] for fields in mounts if fields[4] == "/"]
        assert root_device == guest.output("cat", "/sys/class/block/vda1/dev")
        cmdline = guest.output("cat", "/proc/cmdline")
        assert any(word.startswith("root=PARTUUID=") for word in cmdline.split())
        print(f"--image to the agent answering: {time.monotonic() - started:.1f} s")

        # `kasou exec` reaches the agent over vsock, as with the default guest.
        result = subprocess.run(
            [KASOU, "exec", "--sock", str(sock), "--", "sh", "-c", "echo x > /marker; sync"],
            capture_output=True,
            timeout=BOOT_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert guest.output("cat", "/marker") == "x"

        guest.trigger("poweroff")
        assert guest.wait() == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        process.communicate()
    assert _digest(image) == before  # the guest wrote to the throw-away overlay
    assert not any(scratch.iterdir())  # removed at exit
    assert not sock.exists()
