"""Compiling the test guest with the machine's gcc, checking it, caching it.

This module owns the guest's build: the compiler flags, the cache under
``$XDG_CACHE_HOME/kasou/guestkit/<key>/guest.elf``, the check that the code holds no
instruction PVM's emulator refuses, and the check that the ELF file is also a valid Multiboot
image. It also names the guest's fixed addresses, which those checks hold the image to. It
does not boot the guest (kasou's tests and the QEMU peer under ``tests/guestkit_qemu`` do).

The cache key is a hash of the sources, the flags and ``gcc --version``: a change to any of
them builds afresh. A build happens in a temporary folder beside the cache entry and is
renamed into place whole, so a half-built entry is never seen and two processes building at
once both end with the same, complete entry.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kasou.errors import KasouError

__all__ = [
    "CFLAGS",
    "COUNTER_GPA",
    "LOAD_ADDR",
    "MULTIBOOT_SEARCH_BYTES",
    "SOURCE_DIR",
    "TEST_MMIO_BASE",
    "TEST_PIO_BASE",
    "GuestImage",
    "GuestKitError",
    "build_guest",
    "cache_key",
    "default_cache_dir",
    "inspect_guest",
    "refused_instructions",
]

SOURCE_DIR = Path(__file__).with_name("src")
_SOURCES = ("head.S", "kernel.c", "user.c", "lib.c", "virtio.c", "vwork.c")
_LINKER_SCRIPT = "guest.ld"
_SOURCE_SUFFIXES = frozenset({".c", ".S", ".h", ".ld"})
_ABANDONED_AFTER_S = 3600

# The guest's fixed guest-physical addresses (src/guest.h, kernel.c, user.c).
LOAD_ADDR = 0x100000  # where the one loadable segment starts (1 MiB)
COUNTER_GPA = 0x200000  # the `counter` workload's 64-bit counter; the image ends below it
TEST_MMIO_BASE = 0xD000_0000  # the `dispatch` and `mmio` workloads' test device
TEST_PIO_BASE = 0x500  # the `dispatch` workload's test ports
AP_TRAMPOLINE = 0x8000  # the `smp` workload copies its real-mode trampoline here

# Multiboot 0.6.96, 3.1: the header lies 4-byte aligned in the first 8192 bytes of the file.
MULTIBOOT_SEARCH_BYTES = 8192
_MB_HEADER_MAGIC = 0x1BADB002
_MB_FLAG_ADDRESS = 1 << 16

# shared/ENVIRONMENT.md: ring-0 code runs in PVM's instruction emulator, so plain integer code
# only. -mgeneral-regs-only keeps gcc from SSE for copies and zeroing; -march=x86-64 from
# popcnt, BMI and friends whatever the distribution's default; -fcf-protection=none from
# endbr64; no unwind tables, no build-id, one RWX segment at 1 MiB (guest.ld).
CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-no-pie",
    "-static",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
    "-march=x86-64",
    "-mtune=generic",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",  # memset's loop must not become a call to memset
    "-fno-strict-aliasing",
    "-Wall",
    "-Wextra",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--no-warn-rwx-segments",
)

# Instructions the PVM emulator refuses (shared/ENVIRONMENT.md), by objdump's mnemonic:
# int3, fwait, popcnt, cmpxchg16b, XSAVE, MXCSR, SMAP, rdtscp, crc32, BMI2, ADX, PKU, clwb, and
# vmcall, which hangs. Also any `int N` (broken from ring 3 on PVM, and never needed here),
# the SSE fences, and endbr (CET), which the emulator has not been shown to accept.
_REFUSED_MNEMONICS = frozenset(
    {
        "int3",
        "int",
        "int1",
        "fwait",
        "wait",
        "popcnt",
        "cmpxchg16b",
        "xgetbv",
        "xsetbv",
        "ldmxcsr",
        "stmxcsr",
        "vldmxcsr",
        "vstmxcsr",
        "clac",
        "stac",
        "rdtscp",
        "mulx",
        "pdep",
        "pext",
        "rorx",
        "sarx",
        "shlx",
        "shrx",
        "bzhi",
        "adcx",
        "adox",
        "rdpkru",
        "wrpkru",
        "clwb",
        "vmcall",
        "vmmcall",
        "lfence",
        "mfence",
        "sfence",
        "endbr64",
        "endbr32",
        "(bad)",
    }
)
_REFUSED_MNEMONIC_PREFIXES = ("xsave", "xrstor", "crc32")
# Any SSE, AVX or MMX register operand, or an AVX-512 mask register.
_SIMD_OPERAND = re.compile(r"%(?:[xyz]mm\d+|mm\d\b|k[0-7]\b)")
_PREFIXES = frozenset(
    {
        "lock",
        "rep",
        "repz",
        "repnz",
        "repe",
        "repne",
        "data16",
        "data32",
        "addr16",
        "addr32",
        "cs",
        "ds",
        "es",
        "ss",
        "fs",
        "gs",
        "notrack",
        "bnd",
    }
)
_OBJDUMP_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S.*)$")
# The processor mode each code section runs in (head.S), as objdump's -M option.
_SECTION_MODES = {".text16": "i8086", ".text32": "i386"}


class GuestKitError(KasouError):
    """The test guest could not be built, or the built image is not what kasou needs."""


@dataclass(frozen=True)
class GuestImage:
    """What the checks found in a built guest ELF."""

    path: Path
    entry64: int  # e_entry: the 64-bit boot protocol entry
    entry32: int  # Multiboot entry_addr: the 32-bit protected-mode entry
    load_addr: int  # p_paddr of the one PT_LOAD, and Multiboot load_addr
    load_end: int  # end of the file-backed bytes, Multiboot load_end_addr
    bss_end: int  # end of the image in memory, Multiboot bss_end_addr
    multiboot_offset: int  # file offset of the Multiboot header


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kasou/guestkit``, with ``~/.cache`` when the variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kasou" / "guestkit"


def _gcc_version() -> str:
    try:
        result = subprocess.run(
            ["gcc", "--version"], capture_output=True, text=True, check=False, timeout=60
        )
    except FileNotFoundError as exc:
        raise GuestKitError(
            "gcc is not installed: the test guest is compiled at test time "
            "(apt-get install gcc binutils)"
        ) from exc
    if result.returncode != 0:
        raise GuestKitError(f"gcc --version failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def _source_files(source_dir: Path) -> list[Path]:
    return sorted(
        path for path in source_dir.iterdir() if path.is_file() and path.suffix in _SOURCE_SUFFIXES
    )


def cache_key(source_dir: Path = SOURCE_DIR) -> str:
    """The cache entry name: a hash of the sources, the flags and ``gcc --version``."""
    digest = hashlib.sha256()
    for path in _source_files(source_dir):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update("\0".join(CFLAGS).encode() + b"\0")
    digest.update(_gcc_version().encode())
    return digest.hexdigest()[:24]


def build_guest(cache_dir: Path | None = None, *, source_dir: Path | None = None) -> Path:
    """Returns the path of the guest ELF, compiling it first unless the cache has it.

    ``cache_dir`` replaces ``default_cache_dir()``; ``source_dir`` replaces the packaged
    sources (for tests of the build itself). Raises ``GuestKitError`` when gcc fails (with
    the tail of its output), when the code holds an instruction PVM refuses, or when the
    image's layout is wrong.
    """
    sources = source_dir if source_dir is not None else SOURCE_DIR
    root = cache_dir if cache_dir is not None else default_cache_dir()
    entry = root / cache_key(sources)
    elf = entry / "guest.elf"
    if elf.is_file():
        return elf

    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        _compile(sources, staging / "guest.elf")
        staging.chmod(0o755)  # mkdtemp makes it 0700; the entry is for anyone to read
        try:
            # rename(2) of a folder onto a non-empty one fails: a concurrent build got
            # there first, and its entry is as good as ours.
            staging.rename(entry)
        except OSError:
            if not elf.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return elf


def _remove_abandoned_builds(root: Path) -> None:
    """Removes staging folders a killed build left behind (older than any real build)."""
    cutoff = time.time() - _ABANDONED_AFTER_S
    for staging in root.glob(".build-*"):
        try:
            if staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process removed it first


def _compile(source_dir: Path, output: Path) -> None:
    command = [
        "gcc",
        *CFLAGS,
        "-T",
        str(source_dir / _LINKER_SCRIPT),
        "-o",
        str(output),
        *(str(source_dir / name) for name in _SOURCES),
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=300, cwd=output.parent
        )
    except FileNotFoundError as exc:
        raise GuestKitError(
            "gcc is not installed: the test guest is compiled at test time "
            "(apt-get install gcc binutils)"
        ) from exc
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise GuestKitError(
            f"gcc could not build the test guest from {source_dir} "
            f"(exit {result.returncode}); fix the sources:\n{tail}"
        )
    refused = refused_instructions(output)
    if refused:
        shown = "\n".join(refused[:20])
        raise GuestKitError(
            f"the test guest holds {len(refused)} instruction(s) that PVM's emulator refuses "
            f"in ring 0 (shared/ENVIRONMENT.md); rewrite the code that emits them:\n{shown}"
        )
    inspect_guest(output)
    (output.parent / "build.txt").write_text(" ".join(command) + "\n")


def _code_sections(elf: bytes) -> list[str]:
    """Names of the executable sections (SHF_EXECINSTR) of an ELF64 file."""
    shoff, shentsize, shnum, shstrndx = (
        struct.unpack_from("<Q", elf, 0x28)[0],
        *struct.unpack_from("<HHH", elf, 0x3A),
    )
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = headers[shstrndx][4]
    names = []
    for name_offset, _type, flags, _addr, _offset, size in headers:
        if flags & 0x4 and size:  # SHF_EXECINSTR
            end = elf.index(b"\0", strtab_offset + name_offset)
            names.append(elf[strtab_offset + name_offset : end].decode())
    return names


def refused_instructions(elf: Path) -> list[str]:
    """The instructions in ``elf`` that PVM's emulator refuses, as ``section address: text``.

    Each code section is disassembled in the mode it runs in (``.text16`` real mode,
    ``.text32`` protected mode, the rest 64-bit). Empty when the guest is fit to run.
    """
    found: list[str] = []
    for section in _code_sections(elf.read_bytes()):
        command = ["objdump", "-d", "--no-show-raw-insn", "-j", section]
        if section in _SECTION_MODES:
            command += ["-M", _SECTION_MODES[section]]
        try:
            result = subprocess.run(
                [*command, str(elf)], capture_output=True, text=True, check=False, timeout=60
            )
        except FileNotFoundError as exc:
            raise GuestKitError("objdump is missing: apt-get install binutils") from exc
        if result.returncode != 0:
            raise GuestKitError(f"objdump failed on {elf}: {result.stderr.strip()[-500:]}")
        for line in result.stdout.splitlines():
            match = _OBJDUMP_LINE.match(line)
            if match and _is_refused(match.group(2)):
                found.append(f"{section} {match.group(1)}: {match.group(2).strip()}")
    return found


def _is_refused(instruction: str) -> bool:
    words = instruction.split()
    while words and (words[0] in _PREFIXES or words[0].startswith("rex")):
        words.pop(0)
    if not words:
        return False
    mnemonic = words[0]
    return (
        mnemonic in _REFUSED_MNEMONICS
        or mnemonic.startswith(_REFUSED_MNEMONIC_PREFIXES)
        or _SIMD_OPERAND.search(instruction) is not None
    )


def inspect_guest(elf: Path) -> GuestImage:
    """Checks that ``elf`` loads the same way as an ELF and as a Multiboot image.

    That is: an x86-64 executable with one PT_LOAD at ``LOAD_ADDR`` (physical equal to
    virtual), ending below ``COUNTER_GPA``, and a Multiboot header with the address fields in
    the first 8192 bytes whose load range is exactly that segment's bytes in the file.
    Raises ``GuestKitError`` naming the first thing that is wrong.
    """
    data = elf.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestKitError(f"{elf} is not a little-endian ELF64 file")
    e_type, e_machine = struct.unpack_from("<HH", data, 0x10)
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 0x18)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    if e_type != 2 or e_machine != 62:  # ET_EXEC, EM_X86_64
        raise GuestKitError(
            f"{elf} is not an x86-64 executable (type {e_type}, machine {e_machine})"
        )
    loads = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
    if len(loads) != 1:
        raise GuestKitError(f"{elf} has {len(loads)} PT_LOAD segments; guest.ld must make one")
    p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = loads[0]
    if p_paddr != LOAD_ADDR or p_vaddr != LOAD_ADDR:
        raise GuestKitError(f"{elf} loads at {p_paddr:#x}/{p_vaddr:#x}, not {LOAD_ADDR:#x}")
    if p_paddr + p_memsz > COUNTER_GPA:
        raise GuestKitError(f"{elf} ends at {p_paddr + p_memsz:#x}, over {COUNTER_GPA:#x}")
    if not p_paddr <= e_entry < p_paddr + p_filesz:
        raise GuestKitError(f"{elf} enters at {e_entry:#x}, outside its code")

    header = _find_multiboot_header(data)
    if header is None:
        raise GuestKitError(f"{elf} has no valid Multiboot header in its first 8192 bytes")
    flags, _checksum, header_addr, load_addr, load_end, bss_end, entry32 = struct.unpack_from(
        "<7I", data, header + 4
    )
    if not flags & _MB_FLAG_ADDRESS:
        raise GuestKitError(f"{elf}: the Multiboot header lacks the address fields (bit 16)")
    expected = {
        "load_addr": (load_addr, p_paddr),
        "header_addr": (header_addr, p_paddr + header - p_offset),
        "load_end_addr": (load_end, p_paddr + p_filesz),
        "bss_end_addr": (bss_end, p_paddr + p_memsz),
    }
    for field, (got, want) in expected.items():
        if got != want:
            raise GuestKitError(f"{elf}: Multiboot {field} is {got:#x}, the ELF says {want:#x}")
    if not load_addr <= entry32 < load_end:
        raise GuestKitError(f"{elf}: Multiboot entry_addr {entry32:#x} is outside the image")
    return GuestImage(
        path=elf,
        entry64=e_entry,
        entry32=entry32,
        load_addr=load_addr,
        load_end=load_end,
        bss_end=bss_end,
        multiboot_offset=header,
    )


def _find_multiboot_header(data: bytes) -> int | None:
    # The header's 8 fields (32 bytes) must lie in the file.
    for offset in range(0, min(len(data) - 32, MULTIBOOT_SEARCH_BYTES - 12) + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic == _MB_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset
    return None
