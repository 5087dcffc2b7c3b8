"""``VmConfig``: everything one VM is made of, validated before anything is built.

A bad value raises ``ConfigError`` naming the field as the user wrote it and the fix. Checks
that need the host (its memory, KVM's vCPU limit) run in ``check_host``, so a config can be
parsed and validated on any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from kasou.errors import ConfigError
from kasou.memory import format_size, host_memory_bytes, parse_size

__all__ = ["ConsoleConfig", "VmConfig", "parse_console"]

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"
MIN_MEMORY = 16 << 20
# Below 4 GiB the guest's RAM stops at the MMIO hole; the rest goes above 4 GiB
# (arch/x86_64/layout.py), so large guests are fine.
MAX_VCPUS_MPTABLE = 254  # APIC ids are 8 bits in the MP table; 255 is broadcast

ConsoleKind = Literal["stdio", "file", "none"]
OnReboot = Literal["exit", "restart"]


class ConsoleConfig(NamedTuple):
    """Where COM1 goes: the terminal, a file, or nowhere."""

    kind: ConsoleKind = "stdio"
    path: Path | None = None


def parse_console(text: str) -> ConsoleConfig:
    """Parse ``stdio``, ``none`` or ``file:PATH``."""
    if text in ("stdio", "none"):
        return ConsoleConfig(text)  # type: ignore[arg-type]
    if text.startswith("file:") and len(text) > len("file:"):
        return ConsoleConfig("file", Path(text[len("file:") :]))
    raise ConfigError("console", f"{text!r} is not a console: use stdio, none or file:PATH")


@dataclass(frozen=True)
class VmConfig:
    """One VM. Sizes are bytes; ``parse_size`` turns "512M" into them."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    vcpus: int = 1
    memory: int = 512 << 20
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    api_sock: Path | None = None
    on_reboot: OnReboot = "exit"
    memory_backing: Literal["anonymous", "memfd"] = "anonymous"
    hugepages: bool = False
    name: str = "kasou"

    def __post_init__(self) -> None:
        if not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise ConfigError("vcpus", f"{self.vcpus} is not a vCPU count: give 1 or more")
        if self.vcpus > MAX_VCPUS_MPTABLE:
            raise ConfigError(
                "vcpus", f"{self.vcpus} vCPUs: kasou's MP table holds {MAX_VCPUS_MPTABLE} at most"
            )
        if self.memory < MIN_MEMORY:
            raise ConfigError(
                "memory",
                f"{format_size(self.memory)} is too little: give at least "
                f"{format_size(MIN_MEMORY)}",
            )
        if self.memory % 4096:
            raise ConfigError("memory", f"{self.memory} is not a whole number of 4 KiB pages")
        if self.on_reboot not in ("exit", "restart"):
            raise ConfigError("on-reboot", f"{self.on_reboot!r}: use exit or restart")
        if self.memory_backing not in ("anonymous", "memfd"):
            raise ConfigError("memory-backing", f"{self.memory_backing!r}: use anonymous or memfd")
        if "\0" in self.cmdline:
            raise ConfigError("cmdline", "the command line contains a NUL byte")
        _check_readable("kernel", self.kernel)
        if self.initrd is not None:
            _check_readable("initrd", self.initrd)

    @classmethod
    def from_options(
        cls,
        *,
        kernel: str | Path,
        memory: str | int = "512M",
        console: str = "stdio",
        initrd: str | Path | None = None,
        **others: object,
    ) -> VmConfig:
        """Build a config from strings as a user types them (CLI, API)."""
        try:
            size = parse_size(memory)
        except ValueError as error:
            raise ConfigError("memory", str(error)) from None
        return cls(
            kernel=Path(kernel),
            initrd=Path(initrd) if initrd else None,
            memory=size,
            console=parse_console(console),
            **others,  # type: ignore[arg-type]
        )

    def check_host(self, max_vcpus: int) -> None:
        """Checks that need this host: its memory and KVM's vCPU limit."""
        if self.vcpus > max_vcpus:
            raise ConfigError(
                "vcpus", f"{self.vcpus} vCPUs, but this host's KVM allows {max_vcpus}"
            )
        host = host_memory_bytes()
        if self.memory > host:
            raise ConfigError(
                "memory",
                f"{format_size(self.memory)} is more than this host has "
                f"({host >> 20} MiB): give less",
            )


def _check_readable(name: str, path: Path) -> None:
    try:
        path.stat()
    except PermissionError:
        raise ConfigError(
            name, f"{path} is not reachable: check the permissions of its folders"
        ) from None
    except OSError:
        pass  # reported below, in words
    if not path.exists():
        raise ConfigError(name, f"{path} does not exist: give the path of a {name} image")
    if not path.is_file():
        raise ConfigError(name, f"{path} is not a file: give the path of a {name} image")
    if not os.access(path, os.R_OK):
        raise ConfigError(name, f"{path} is not readable: check its permissions")
