"""The jail's settings and plan: plain data, cheap to import (``VmConfig`` holds one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from kasou.errors import ConfigError, HostError

__all__ = ["DEFAULT_BASE", "DEFAULT_ID", "JailConfig", "JailPlan", "check_jail"]

DEFAULT_BASE = Path("/run/kasou/jail")
DEFAULT_ID = 64990
"""The jail's default uid and gid: no account on a stock Debian (system ids end at 999,
users start at 1000, ``nobody`` is 65534). Not ``nobody``: a process may signal any other
process of its uid, and daemons run as nobody. Give each VM its own id (``--jail-uid``) for
RLIMIT_NPROC to count one VM's threads only."""


class JailConfig(NamedTuple):
    """``--jail [--jail-dir BASE] [--jail-uid N] [--jail-gid N]``."""

    base: Path = DEFAULT_BASE
    uid: int = DEFAULT_ID
    gid: int = DEFAULT_ID


class JailPlan(NamedTuple):
    """What one VMM needs in its jail, each at its host path (so no config is rewritten)."""

    name: str
    read_only: tuple[Path, ...] = ()
    """Files bound read-only: kernel, initrds, read-only disks, backing files."""
    writable: tuple[Path, ...] = ()
    """Files bound read-write and lent to the jail id (chowned, given back at the end):
    writable disks, the console file (created when missing)."""
    sockets: tuple[Path, ...] = ()
    """Unix sockets the VMM listens on; made in the jail folder, linked from the host path."""
    network: bool = False
    """Keep the host's network namespace (the VM has TAPs)."""
    delegated: tuple[Path, ...] = ()
    """The VM's cgroup folders, made by the supervisor: bound read-write and handed, with
    their files, to the jail id, so the VMM changes its own limits live (cgroup v1
    delegation; on v2 the folder's cgroup.procs and controller files likewise)."""
    file_size_limit: int = 1 << 40
    """RLIMIT_FSIZE: the largest file the VMM may write."""


def check_jail(config: JailConfig) -> None:
    """The checks that need no change on the host: root, a jail id other than 0."""
    for field, value in (("jail-uid", config.uid), ("jail-gid", config.gid)):
        if not 0 < value < 2**32 - 1:
            raise ConfigError(field, f"{value}: give an unprivileged id, not 0 (e.g. 64990)")
    if os.geteuid() != 0:
        raise HostError("--jail needs root (namespaces, mounts, device nodes): run as root")
