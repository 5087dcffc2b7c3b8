"""A Multiboot kernel under ``kasou run`` on this host's KVM: what it is handed (command line,
modules, loader name) as it prints it on COM1, and the exit status it picks through
``--debug-exit``; one-line errors for what cannot boot.

PVM runs the test kernel's 32-bit protected-mode code (emulated, as all ring-0 code there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kasou.guestkit.multiboot import build_multiboot_hello, exit_value, expected_lines

KASOU = str(Path(sys.executable).with_name("kasou"))


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KASOU, "run", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multiboot")
    return {
        "elf": build_multiboot_hello(folder),
        "address fields": build_multiboot_hello(folder, address_fields=True),
    }


@pytest.fixture
def modules(tmp_path: Path) -> list[tuple[Path, bytes]]:
    contents = [b"hello module A\n", bytes(range(7, 250, 3)), b""]
    paths = [tmp_path / "a.txt", tmp_path / "b.bin", tmp_path / "empty"]
    for path, data in zip(paths, contents, strict=True):
        path.write_bytes(data)
    return list(zip(paths, contents, strict=True))


@pytest.mark.parametrize("form", ["elf", "address fields"])
@pytest.mark.parametrize("exit_arg", ["exit=7", "exit=0", "exit=127 more words", "exit=128"])
def test_the_kernel_prints_its_boot_information_and_exits_with_its_status(
    kernels: dict[str, Path], modules: list[tuple[Path, bytes]], form: str, exit_arg: str
) -> None:
    kernel = kernels[form]
    initrds = [arg for path, _ in modules for arg in ("--initrd", str(path))]
    result = run(
        "--kernel", str(kernel), "--memory", "64M", "--cmdline", exit_arg,
        *initrds, "--debug-exit", "0xf4",
    )  # fmt: skip
    assert result.stdout.splitlines() == expected_lines(
        f"{kernel} {exit_arg}", [(str(path), data) for path, data in modules], loader="kasou"
    ), result.stderr
    assert result.returncode == ((exit_value(exit_arg) << 1) | 1) & 0xFF, result.stderr
    assert "crashed" not in result.stderr


def test_no_module_is_a_count_of_zero(kernels: dict[str, Path]) -> None:
    kernel = kernels["elf"]
    result = run("--kernel", str(kernel), "--cmdline", "exit=3", "--debug-exit", "0xf4,size=1")
    assert result.stdout.splitlines() == expected_lines(f"{kernel} exit=3", [], loader="kasou")
    assert result.returncode == 7


def test_a_module_larger_than_the_guest_ram_is_a_one_line_error(
    kernels: dict[str, Path], tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(20 << 20))
    result = run("--kernel", str(kernels["elf"]), "--memory", "16M", "--initrd", str(big))
    assert result.returncode == 2
    assert result.stderr.startswith(f"kasou: error: module {big} needs guest RAM")
    assert "raise --memory" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_linux_kernel_with_two_initrds_is_a_one_line_error(
    guest_elf: Path, modules: list[tuple[Path, bytes]]
) -> None:
    (first, _), (second, _), _ = modules
    result = run("--kernel", str(guest_elf), "--initrd", str(first), "--initrd", str(second))
    assert result.returncode == 2
    assert result.stderr == (
        "kasou: error: initrd: a Linux kernel takes one initrd, 2 were given: join them into "
        "one (concatenated cpio archives are one initramfs)\n"
    )


def test_a_debug_exit_port_a_kasou_device_holds_is_refused(kernels: dict[str, Path]) -> None:
    result = run("--kernel", str(kernels["elf"]), "--debug-exit", "0x3f8")
    assert result.returncode == 2
    assert result.stderr.startswith("kasou: error: debug-exit: port 0x3f8 is taken (")
    assert "Serial" in result.stderr
