"""Kernel modules for the outer VM: which files to load, in which order, uncompressed.

A module names the modules it needs in the ``depends=`` entry of its ``.modinfo`` ELF section
(the strings ``modinfo`` prints; written by scripts/mod/modpost.c as NUL-separated
``key=value`` pairs). This module reads that entry from each module file, orders the modules so
every one comes after the ones it depends on (what ``modprobe`` does from modules.dep, which a
kernel package unpacked with ``dpkg-deb -x`` lacks, as depmod has not run), and decompresses
``.ko.xz`` / ``.ko.zst`` / ``.ko.gz`` files so busybox ``insmod`` can load them whatever its
build supports.

It does not load modules or know which ones the nested host wants (``_image`` says that).
"""

from __future__ import annotations

import gzip
import io
import lzma
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

__all__ = ["Module", "ModuleError", "module_bytes", "modinfo", "resolve_modules"]

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class ModuleError(Exception):
    """A module, or one it depends on, is missing or unreadable."""


@dataclass(frozen=True)
class Module:
    """One module to load: its name (``kvm_amd``) and file."""

    name: str
    path: Path


def _canonical(name: str) -> str:
    # The kernel treats '-' and '_' in module names as the same character
    # (kernel/params.c, parameqn); file names use either (kvm-amd.ko holds kvm_amd).
    return name.replace("-", "_")


def _stem(path: Path) -> str | None:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return _canonical(path.name[: -len(suffix)])
    return None


def module_bytes(path: Path) -> bytes:
    """The uncompressed ELF image of a module file."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def modinfo(image: bytes) -> dict[str, str]:
    """The ``.modinfo`` entries of an uncompressed module (the last value of a repeated key)."""
    try:
        section = ELFFile(io.BytesIO(image)).get_section_by_name(".modinfo")
    except Exception as error:
        raise ModuleError(f"not a kernel module (ELF): {error}") from error
    if section is None:
        raise ModuleError("the ELF file has no .modinfo section: not a kernel module")
    info: dict[str, str] = {}
    for entry in bytes(section.data()).split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def resolve_modules(module_dir: Path, wanted: Iterable[str]) -> list[Module]:
    """The modules under ``module_dir`` (``lib/modules/<release>``) needed to load ``wanted``,
    each after those it depends on; modules built into the kernel (``modules.builtin``) are
    left out."""
    files: dict[str, Path] = {}
    for path in sorted((module_dir / "kernel").rglob("*.ko*")):
        stem = _stem(path)
        if stem is not None:
            files.setdefault(stem, path)
    builtin_list = module_dir / "modules.builtin"
    builtin = set()
    if builtin_list.exists():
        for line in builtin_list.read_text().splitlines():
            stem = _stem(Path(line.strip()))
            if stem is not None:
                builtin.add(stem)

    order: list[Module] = []
    placed: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _canonical(name)
        if name in placed or name in builtin:
            return
        if name in chain:
            raise ModuleError(f"modules depend on each other in a cycle: {' -> '.join(chain)}")
        path = files.get(name)
        if path is None:
            needed_by = f" (needed by {chain[-1]})" if chain else ""
            raise ModuleError(f"module {name}{needed_by} is not in {module_dir}")
        depends = modinfo(module_bytes(path)).get("depends", "")
        for dependency in filter(None, depends.split(",")):
            visit(dependency, (*chain, name))
        placed.add(name)
        order.append(Module(name, path))

    for name in wanted:
        visit(name, ())
    return order
