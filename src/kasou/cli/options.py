"""The options of ``kasou run``, once, for both of its parsers."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["RUN_EXAMPLE", "RUN_OPTIONS", "RunOption"]


class RunOption(NamedTuple):
    name: str  # the long flag without dashes
    help: str
    default: str | int | None = None
    kind: type = str
    choices: tuple[str, ...] = ()


RUN_OPTIONS = (
    RunOption("kernel", "Linux kernel: a vmlinux (ELF) or a bzImage. Default: the default guest."),
    RunOption("initrd", "Initial ramdisk (cpio, optionally compressed)."),
    RunOption("cmdline", "Kernel command line. Default: console=ttyS0 reboot=k panic=-1"),
    RunOption("vcpus", "Number of virtual CPUs.", 1, int),
    RunOption("memory", "Guest RAM, like 512M or 2G.", "512M"),
    RunOption("console", "Where COM1 goes: stdio, file:PATH or none.", "stdio"),
    RunOption("api-sock", "Serve the control socket (status, pause, resume, stop) here."),
    RunOption(
        "on-reboot",
        "What a guest reboot does: exit kasou, or restart the guest.",
        "exit",
        choices=("exit", "restart"),
    ),
)

RUN_EXAMPLE = (
    "kasou run --kernel vmlinux --initrd initrd.cpio.gz --vcpus 2 --memory 1G "
    "--api-sock /tmp/vm.sock"
)
