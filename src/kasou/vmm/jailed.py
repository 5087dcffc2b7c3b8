"""``kasou run --jail``: what a VM needs in its jail (``kasou.jail``), and its TAPs opened
before the drop.

TUNSETIFF needs CAP_NET_ADMIN, which the jailed VMM no longer has, so the TAPs are opened
inside the jail while it is still root (``before_drop``) and the builder adopts them
(``adopted_tap``): each boot gets a duplicate of the fd, so a guest reboot does not release
the interface the jail cannot open again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kasou.errors import ConfigError
from kasou.vmm.config import VmConfig

if TYPE_CHECKING:
    from kasou.jail import JailPlan
    from kasou.tap import Tap

__all__ = ["adopted_tap", "jail_plan", "run_jailed_vm"]

_taps: dict[str, Tap] = {}  # "net0" -> the TAP opened before the drop
_FILE_MARGIN = 1 << 30  # RLIMIT_FSIZE above the largest disk: qcow2 metadata, console log


def adopted_tap(device_id: str) -> Tap | None:
    """The TAP opened before the drop for ``device_id`` (``net0``...), as a new fd the
    caller owns; None outside a jail."""
    opened = _taps.get(device_id)
    if opened is None:
        return None
    from kasou.tap import Tap

    return Tap(os.dup(opened.fd), opened.name, opened.mtu, created=False)


def jail_plan(config: VmConfig) -> JailPlan:
    """The files, sockets and limits of ``config``'s jail."""
    from kasou.jail import JailPlan

    read_only: list[Path] = [config.kernel, *config.initrds]
    writable: list[Path] = []
    largest = 0
    for disk in config.disks:
        (read_only if disk.read_only else writable).append(disk.path)
        chain, size = _backing_chain(disk.path, disk.format)
        read_only += chain
        largest = max(largest, size, disk.path.stat().st_size)
    console = config.console
    if console.kind == "file" and console.path is not None:
        writable.append(console.path)
    if console.kind == "sock" and console.log is not None:
        if not console.log.exists():  # made here, so it is private (the lending makes 0644)
            try:
                os.close(os.open(console.log, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            except OSError as error:
                raise ConfigError(
                    "console", f"cannot open the log {console.log}: {error.strerror}"
                ) from None
        writable.append(console.log)
    sockets = [config.api_sock] if config.api_sock is not None else []
    if console.kind == "sock" and console.path is not None:
        sockets.append(console.path)
    if config.vsock is not None:
        sockets.append(config.vsock.uds)
    if config.virtio_console is not None and config.virtio_console.socket is not None:
        sockets.append(config.virtio_console.socket)
    return JailPlan(
        name=config.name,
        read_only=tuple(path.absolute() for path in read_only),
        writable=tuple(path.absolute() for path in writable),
        sockets=tuple(path.absolute() for path in sockets),
        network=bool(config.nets),
        file_size_limit=largest + _FILE_MARGIN,
    )


def _backing_chain(path: Path, format: str | None) -> tuple[list[Path], int]:
    """The backing files of a disk (read-only in the jail) and its virtual size."""
    from kasou.disk import inspect_disk

    info = inspect_disk(path, format=format)
    size, chain = info.size, []
    backing = info.backing
    while backing is not None:
        chain.append(Path(backing.path))
        backing = backing.backing
    return chain, size


def run_jailed_vm(config: VmConfig) -> int:
    """Run ``config`` in its jail; the exit status ``kasou run`` ends with."""
    from kasou.jail import run_jailed

    assert config.jail is not None
    if config.seccomp:  # libseccomp is found through ldconfig, which the jail does not have
        from kasou.jail.seccomp import Seccomp

        Seccomp.prepare()

    def before_drop() -> Sequence[int]:
        from kasou.tap import open_tap

        for index, net in enumerate(config.nets):
            _taps[f"net{index}"] = open_tap(net.tap)
        return [tap.fd for tap in _taps.values()]

    def body() -> int:
        from kasou.vmm.runner import print_crash, run

        ending = run(config)
        if ending.report is not None or ending.kind.status:
            print_crash(ending)
        return ending.status

    # The cgroup is made here, by the supervisor, which the VMM's process inherits it from;
    # its folders are handed to the jail so the VMM changes its limits live.
    resources = None
    delegated: tuple[Path, ...] = ()
    if config.limits is not None and config.limits != type(config.limits)():
        from kasou.resources import Resources, hand_over

        resources = Resources.open(
            config.name, config.limits, vcpus=config.vcpus, memory=config.memory
        )
        if resources.group is not None:
            hand_over(resources.group)
            delegated = tuple(resources.group.folders.values())
    try:
        plan = jail_plan(config)._replace(delegated=delegated)
        return run_jailed(config.jail, plan, before_drop, body)
    finally:
        if resources is not None:
            resources.close()
