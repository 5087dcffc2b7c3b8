"""Boot time of Debian 12 as users bring it: the image ``kasou image build --distro
debian-12`` makes (Debian's stock cloud kernel, its initramfs-tools initramfs, systemd,
cloud-init with no seed), kasou ``run --image`` beside QEMU ``-M microvm,acpi=on`` given the
same kernel, initramfs, command line and disk. Run by ``make bench``; on a host whose KVM
cannot boot Linux, ``bench/run.py`` runs this inside ``kasou nested``.

The figure, the median of ``--runs`` boots of each VMM: from the VMM's process start (the
harness's clock just before it spawns the VMM) to the login prompt on the serial console
(serial-getty on ttyS0, started by the multi-user target), read from the console file each VMM
writes. Both boot ``quiet``, as ``kasou run --image`` does by default: a verbose boot log
measures serial-port exits more than the boot.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kasou.image import DebianImage, debian_image

KASOU = str(Path(sys.executable).with_name("kasou"))
QEMU = "qemu-system-x86_64"
MARKER = b" login: "  # serial-getty's prompt on ttyS0, part of the multi-user target
TIMEOUT = 900.0


def time_to_marker(command: list[str], console: Path) -> float:
    """Seconds from spawning ``command`` to ``MARKER`` in ``console``; the VM is killed then."""
    console.unlink(missing_ok=True)
    start = time.monotonic()
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while time.monotonic() - start < TIMEOUT:
            if console.exists() and MARKER in console.read_bytes():
                return time.monotonic() - start
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} ended early: {process.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.05)  # polling another process's output file, with a deadline
        raise RuntimeError(f"no {MARKER!r} on the console within {TIMEOUT:.0f} s")
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def kasou_command(disk: Path, console: Path, vcpus: int) -> list[str]:
    return [
        KASOU, "run", "--image", str(disk), "--vcpus", str(vcpus), "--memory", "1G",
        "--console", f"file:{console}",
    ]  # fmt: skip


def qemu_command(image: DebianImage, console: Path, vcpus: int) -> list[str]:
    return [
        QEMU, "-M", "microvm,acpi=on,rtc=on", "-enable-kvm", "-cpu", "host",
        "-smp", str(vcpus), "-m", "1G", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{console}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} reboot=k panic=-1 quiet",
        "-drive", f"id=root,file={image.disk},format=qcow2,if=none,snapshot=on",
        "-device", "virtio-blk-device,drive=root",
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description="Debian 12 boot, kasou beside QEMU microvm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vcpus", type=int, default=1)
    args = parser.parse_args()
    image = debian_image(build=False)
    with tempfile.TemporaryDirectory(prefix="kasou-distro-") as folder:
        console = Path(folder) / "console.log"
        kasou = [
            time_to_marker(kasou_command(image.disk, console, args.vcpus), console)
            for _ in range(args.runs)
        ]
        qemu = [
            time_to_marker(qemu_command(image, console, args.vcpus), console)
            for _ in range(args.runs)
        ]
    k, q = statistics.median(kasou), statistics.median(qemu)
    print(
        f"\n## distro boot (Debian 12 image, stock cloud kernel + initramfs, systemd; "
        f"{args.vcpus} vCPU, 1 GiB; median of {args.runs} boots)"
    )
    print(f"   {'figure':<22} {'kasou':>9} {'QEMU microvm':>13} {'kasou/QEMU':>11}  definition")
    print(
        f"   {'boot to login prompt':<22} {k:>8.1f}s {q:>12.1f}s {k / q:>10.2f}x  "
        "process start -> 'login:' on COM1 (quiet)"
    )
    print(f"   samples: kasou {[round(s, 1) for s in kasou]}, QEMU {[round(s, 1) for s in qemu]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
