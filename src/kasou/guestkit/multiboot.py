"""The Multiboot test kernel: 32-bit assembly that prints what its boot loader handed it.

This module owns building ``src/multiboot_hello.S`` (with ``src/multiboot_hello.ld``) with
binutils into an ELF32 Multiboot (v1) kernel, cached like the guest kit, in two forms: a plain
ELF (the loader reads its program headers) and one whose Multiboot header carries the address
fields (flag 16, the "a.out kludge"). It also says what the kernel prints for a given boot
(``expected_lines``), so that kasou's tests and the QEMU peer hold both loaders to the same
text. It boots nothing.

The kernel prints on COM1, one line each::

    hello from multiboot
    cmdline: <the command line>          (loaders put the kernel's path first)
    modules: <count>
    module <i>: <string> size=0x<size, 8 hex digits> bytes=<its first 16 bytes in hex>
    loader: <boot_loader_name>

then writes N, from the first ``exit=N`` word of its command line (decimal, default 0), to
port ``EXIT_PORT`` as a byte: with a debug-exit device there (kasou's ``--debug-exit 0xf4``,
QEMU's ``-device isa-debug-exit,iobase=0xf4``) the VM ends with status ``(N << 1) | 1``.
A module not on a 4 KiB page gets `` unaligned`` at the end of its line; a wrong EAX
prints ``fail: bad magic 0x...`` and writes 0x7f.

The cache key is a hash of the two sources, the commands and ``as --version``; entries are
built in a temporary folder and renamed into place whole.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kasou.guestkit.build import SOURCE_DIR, GuestKitError, default_cache_dir

__all__ = ["EXIT_PORT", "SHOWN_BYTES", "build_multiboot_hello", "exit_value", "expected_lines"]

EXIT_PORT = 0xF4
SHOWN_BYTES = 16  # how many of each module's first bytes the kernel prints
_SOURCE = SOURCE_DIR / "multiboot_hello.S"
_LINKER_SCRIPT = SOURCE_DIR / "multiboot_hello.ld"
_AS_FLAGS = ("--32",)
_LD_FLAGS = (
    "-m",
    "elf_i386",
    "-z",
    "max-page-size=0x1000",
    "--build-id=none",
    "--no-warn-rwx-segments",
)


def _tool_version() -> str:
    try:
        result = subprocess.run(
            ["as", "--version"], capture_output=True, text=True, check=False, timeout=60
        )
    except FileNotFoundError as exc:
        raise GuestKitError(
            "as is not installed: the Multiboot test kernel is assembled at test time "
            "(apt-get install binutils)"
        ) from exc
    return result.stdout


def _key(address_fields: bool) -> str:
    digest = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        _LINKER_SCRIPT.read_bytes(),
        " ".join((*_AS_FLAGS, *_LD_FLAGS)).encode(),
        _tool_version().encode(),
        b"aout" if address_fields else b"elf",
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:24]


def build_multiboot_hello(cache_dir: Path | None = None, *, address_fields: bool = False) -> Path:
    """The path of the built kernel, assembled first unless the cache has it.

    ``address_fields`` builds the form whose header has the address fields (flag 16);
    ``cache_dir`` replaces ``default_cache_dir() / "multiboot"``. Raises ``GuestKitError``
    (with the tail of the tools' output) when ``as`` or ``ld`` fail.
    """
    root = cache_dir if cache_dir is not None else default_cache_dir() / "multiboot"
    name = "hello-aout.elf" if address_fields else "hello.elf"
    entry = root / _key(address_fields)
    kernel = entry / name
    if kernel.is_file():
        return kernel
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        objects = staging / "hello.o"
        defines = ("--defsym", "AOUT_KLUDGE=1") if address_fields else ()
        _tool(["as", *_AS_FLAGS, *defines, "-o", str(objects), str(_SOURCE)])
        _tool(
            ["ld", *_LD_FLAGS, "-T", str(_LINKER_SCRIPT), "-o", str(staging / name), str(objects)]
        )
        objects.unlink()
        staging.chmod(0o755)
        try:
            staging.rename(entry)
        except OSError:
            if not kernel.is_file():  # not a concurrent build that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return kernel


def _tool(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise GuestKitError(f"{command[0]} is not installed: apt-get install binutils") from exc
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise GuestKitError(
            f"{command[0]} could not build the Multiboot test kernel (exit "
            f"{result.returncode}); fix {_SOURCE.name}:\n{tail}"
        )


def exit_value(cmdline: str) -> int:
    """The byte the kernel writes to ``EXIT_PORT`` for ``cmdline``: the digits of the first
    ``exit=`` word, 0 without one."""
    for word in cmdline.split(" "):
        if word.startswith("exit="):
            digits = ""
            for char in word[len("exit=") :]:
                if not "0" <= char <= "9":
                    break
                digits += char
            return int(digits or "0") & 0xFF
    return 0


def expected_lines(
    cmdline: str, modules: Sequence[tuple[str, bytes]], loader: str | None = None
) -> list[str]:
    """What the kernel prints when its loader passes ``cmdline`` (the full string, kernel
    path first) and ``modules`` (each string and contents); the ``loader:`` line only when
    ``loader`` is given."""
    lines = ["hello from multiboot", f"cmdline: {cmdline}", f"modules: {len(modules)}"]
    for index, (string, data) in enumerate(modules):
        shown = data[:SHOWN_BYTES].hex()
        lines.append(f"module {index}: {string} size=0x{len(data):08x} bytes={shown}")
    if loader is not None:
        lines.append(f"loader: {loader}")
    return lines
