"""The Multiboot test kernel under QEMU (TCG), the peer Multiboot loader: it prints what
``expected_lines`` says and exits through isa-debug-exit with ``(N << 1) | 1``. Where this
host's KVM can run kasou, kasou boots the same kernel with the same arguments and must print
the same text (the boot loader's name aside) and exit with the same status."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kasou.guestkit.multiboot import EXIT_PORT, build_multiboot_hello, exit_value, expected_lines
from kasou.kvm.host import probe_host
from qemu_peer import QEMU

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")

KASOU = str(Path(sys.executable).with_name("kasou"))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multiboot")
    return {
        "elf": build_multiboot_hello(folder),
        "address fields": build_multiboot_hello(folder, address_fields=True),
    }


def qemu(kernel: Path, cmdline: str, modules: list[Path], serial: Path) -> int:
    command = [
        QEMU,
        "-accel", "tcg",
        "-m", "128",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(kernel),
        "-append", cmdline,
        "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=4",
        "-serial", f"file:{serial}",
    ]  # fmt: skip
    if modules:
        command += ["-initrd", ",".join(str(path) for path in modules)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert not result.stderr.strip(), result.stderr
    return result.returncode


def kasou(kernel: Path, cmdline: str, modules: list[Path]) -> subprocess.CompletedProcess[str]:
    initrds = [arg for path in modules for arg in ("--initrd", str(path))]
    command = [KASOU, "run", "--kernel", str(kernel), "--memory", "128M", "--cmdline", cmdline]
    return subprocess.run(
        [*command, *initrds, "--debug-exit", hex(EXIT_PORT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("form", ["elf", "address fields"])
@pytest.mark.parametrize(("cmdline", "count"), [("exit=21 quiet", 3), ("exit=0", 0)])
def test_qemu_and_kasou_hand_the_kernel_the_same_boot(
    kernels: dict[str, Path], tmp_path: Path, form: str, cmdline: str, count: int
) -> None:
    kernel = kernels[form]
    contents = [b"first module\n", bytes(range(256)) * 5, b"\x00\x01"][:count]
    modules = [tmp_path / f"module{index}" for index in range(count)]
    for path, data in zip(modules, contents, strict=True):
        path.write_bytes(data)
    status = ((exit_value(cmdline) << 1) | 1) & 0xFF
    pairs = zip(modules, contents, strict=True)
    expected = expected_lines(f"{kernel} {cmdline}", [(str(path), data) for path, data in pairs])

    serial = tmp_path / "qemu-serial.txt"
    assert qemu(kernel, cmdline, modules, serial) == status
    qemu_lines = serial.read_text().splitlines()
    assert qemu_lines == [*expected, "loader: qemu"]

    problem = probe_host().problem
    if problem is not None:
        pytest.skip(f"QEMU agrees with the expected text; kasou cannot run here: {problem}")
    result = kasou(kernel, cmdline, modules)
    assert result.returncode == status, result.stderr
    assert result.stdout.splitlines() == [*expected, "loader: kasou"]
