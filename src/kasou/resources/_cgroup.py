"""Control groups, v2 and v1 behind one class: find the hierarchy, make a VM's group, move
kasou into it and out again, write its limits and read its usage.

Which version: v2 when /sys/fs/cgroup is a cgroup2 mount, or when a cgroup2 mount elsewhere
(the hybrid layout's /sys/fs/cgroup/unified) has controllers and none of cpu, memory and pids
is mounted as v1; otherwise v1, one mount per
controller (or per co-mounted set, like ``cpu,cpuacct``), found in /proc/self/mountinfo
(Documentation/admin-guide/cgroup-v1/cgroups.rst, cgroup-v2.rst).

A VM's group is ``kasou/<name>-<pid>`` under the group kasou was started in, per controller
on v1. It holds the whole kasou process (``cgroup.procs``). The files each version uses:

=============  =============================  =====================================
setting        v2                             v1
=============  =============================  =====================================
CPU quota      cpu.max "QUOTA PERIOD"         cpu.cfs_quota_us, cpu.cfs_period_us
CPU weight     cpu.weight (1-10000)           cpu.shares (weight * 1024 / 100)
memory limit   memory.max                     memory.limit_in_bytes
pids limit     pids.max                       pids.max
CPU used       cpu.stat usage_usec            cpuacct.usage (ns; cpuacct controller)
memory used    memory.current                 memory.usage_in_bytes
tasks          pids.current                   pids.current
=============  =============================  =====================================

This module does not decide what to apply: ``_resources.py`` does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from kasou.errors import ConfigError, HostError

__all__ = ["Cgroup", "Hierarchy", "find_hierarchy", "parse_hierarchy", "remove_stale"]

GROUP_FOLDER = "kasou"
USED = ("cpu", "memory", "pids")  # the controllers kasou's limits use
_UNLIMITED_V1 = -1
# cpu.shares' range (kernel/sched/sched.h MIN_SHARES, MAX_SHARES) and its default.
_MIN_SHARES, _MAX_SHARES, _DEFAULT_SHARES = 2, 262_144, 1024


class Hierarchy(NamedTuple):
    """Where kasou's own group is, per controller: ``version`` 2 has one folder for all
    (``folders[""]``) and ``available`` lists its controllers; v1 maps each mounted
    controller to kasou's folder in that controller's hierarchy."""

    version: int
    folders: dict[str, Path]
    available: frozenset[str]

    def own_folder(self, controller: str) -> Path:
        """kasou's current group for ``controller``; ``HostError`` naming it when the host
        has none."""
        if controller not in self.available:
            mounted = ", ".join(sorted(self.available)) or "none"
            raise HostError(
                f"this host has no cgroup {controller} controller (cgroup v{self.version}; "
                f"available: {mounted}): mount it, or leave out the limits that need it"
            )
        return self.folders["" if self.version == 2 else controller]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (proc(5))."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _inside(mount: Path, mount_root: str, path: str) -> Path:
    """The folder of cgroup ``path`` (as /proc/self/cgroup names it) under a mount of the
    hierarchy's ``mount_root`` (a container sees only its part of the tree)."""
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    return mount / path.lstrip("/")


def parse_hierarchy(
    mountinfo: str, own_cgroups: str, controllers_of: dict[Path, str] | None = None
) -> Hierarchy:
    """The hierarchy from the text of /proc/self/mountinfo and /proc/self/cgroup.
    ``controllers_of`` gives the cgroup.controllers text of cgroup2 folders (read from the
    host when omitted)."""
    v1_mounts: dict[str, tuple[Path, str]] = {}
    v2_mounts: list[tuple[Path, str]] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, mountpoint, fstype = _unescape(fields[3]), Path(_unescape(fields[4])), tail[0]
        if fstype == "cgroup2":
            v2_mounts.append((mountpoint, root))
        elif fstype == "cgroup":
            for option in tail[2].split(","):
                if option not in ("rw", "ro") and "=" not in option:
                    v1_mounts.setdefault(option, (mountpoint, root))
    v1_paths: dict[str, str] = {}
    v2_path = None
    for line in own_cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        for controller in parts[1].split(","):
            if controller:
                v1_paths[controller] = parts[2]
    folders = {
        controller: _inside(mountpoint, root, v1_paths[controller])
        for controller, (mountpoint, root) in v1_mounts.items()
        if controller in v1_paths
    }
    # A hybrid host binds each controller to one version: kasou's ones mounted as v1 win
    # over a cgroup2 mount that holds only others (like hugetlb).
    if not any(name in folders for name in USED) or any(
        mountpoint == Path("/sys/fs/cgroup") for mountpoint, _ in v2_mounts
    ):
        for mountpoint, root in v2_mounts:
            if v2_path is None:
                break
            folder = _inside(mountpoint, root, v2_path)
            text = (
                controllers_of.get(folder, "")
                if controllers_of is not None
                else _read_or_empty(folder / "cgroup.controllers")
            )
            available = frozenset(text.split())
            if mountpoint == Path("/sys/fs/cgroup") or available:
                return Hierarchy(2, {"": folder}, available)
    return Hierarchy(1, folders, frozenset(folders))


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def find_hierarchy() -> Hierarchy:
    """This host's hierarchy, as kasou's process sees it."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
        mounts = mountinfo.read()
    with open("/proc/self/cgroup", encoding="utf-8", errors="replace") as cgroups:
        own = cgroups.read()
    return parse_hierarchy(mounts, own)


def _write(path: Path, value: str, setting: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EBUSY, errno.ERANGE):
            raise ConfigError(
                setting, f"the kernel refused {value.strip()!r} in {path}: {error.strerror}"
            ) from None
        raise HostError(f"cannot write {path}: {error.strerror}") from error


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise HostError(f"cannot read {path}: {error.strerror}") from error


class Cgroup:
    """One VM's group: a folder per controller on v1, one folder on v2."""

    def __init__(self, hierarchy: Hierarchy, name: str, pid: int | None = None) -> None:
        self.hierarchy = hierarchy
        self.pid = os.getpid() if pid is None else pid
        self.leaf = f"{name}-{self.pid}"
        self.folders: dict[str, Path] = {}  # controller -> the group's folder, once made

    @property
    def version(self) -> int:
        return self.hierarchy.version

    def folder(self, controller: str) -> Path:
        """Where the group's folder for ``controller`` is (made or not)."""
        return self.hierarchy.own_folder(controller) / GROUP_FOLDER / self.leaf

    def ensure(self, controllers: Iterable[str]) -> None:
        """Make the group's folders for ``controllers`` (all are checked first: a missing
        controller creates nothing) and move the process in."""
        wanted = [name for name in dict.fromkeys(controllers) if name not in self.folders]
        for name in wanted:
            self.hierarchy.own_folder(name)
        for name in wanted:
            if self.version == 2:
                self._enable_v2(name)
            folder = self.folder(name)
            fresh = not folder.exists()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.folders[name] = folder
                (folder / "cgroup.procs").write_text(str(self.pid))
            except OSError as error:
                if fresh:
                    _rmdir(folder)
                self.folders.pop(name, None)
                raise HostError(f"cannot make the cgroup {folder}: {error.strerror}") from error

    def _enable_v2(self, controller: str) -> None:
        """v2 distributes a controller only where every ancestor lists it in
        cgroup.subtree_control (cgroup-v2.rst, "Enabling and Disabling")."""
        own = self.hierarchy.own_folder(controller)
        parent = own / GROUP_FOLDER
        parent.mkdir(exist_ok=True)
        for folder in (own, parent):
            enabled = _read(folder / "cgroup.subtree_control").split()
            if controller in enabled:
                continue
            try:
                (folder / "cgroup.subtree_control").write_text(f"+{controller}")
            except OSError as error:
                raise HostError(
                    f"cannot enable the {controller} controller below {folder} "
                    f"({error.strerror}): on cgroup v2 start kasou in a group of its own "
                    "with the controller delegated to it"
                ) from error

    # --- settings ----------------------------------------------------------------------

    def set_cpu_quota(self, quota: float | None) -> None:
        from kasou.resources._limits import QUOTA_PERIOD_US

        folder = self.folders["cpu"]
        value = None if quota is None else max(1000, round(quota * QUOTA_PERIOD_US))
        if self.version == 2:
            _write(folder / "cpu.max", f"{value or 'max'} {QUOTA_PERIOD_US}", "cpus-quota")
            return
        _write(folder / "cpu.cfs_period_us", str(QUOTA_PERIOD_US), "cpus-quota")
        _write(folder / "cpu.cfs_quota_us", str(value or _UNLIMITED_V1), "cpus-quota")

    def set_cpu_weight(self, weight: int | None) -> None:
        folder = self.folders["cpu"]
        if self.version == 2:
            _write(folder / "cpu.weight", str(weight or 100), "cpu-weight")
            return
        _write(folder / "cpu.shares", str(shares_of(weight)), "cpu-weight")

    def set_memory_limit(self, limit: int | None) -> None:
        folder = self.folders["memory"]
        if self.version == 2:
            _write(folder / "memory.max", str(limit or "max"), "memory-limit")
        else:
            _write(folder / "memory.limit_in_bytes", str(limit or _UNLIMITED_V1), "memory-limit")

    def set_pids_limit(self, limit: int | None) -> None:
        _write(self.folders["pids"] / "pids.max", str(limit or "max"), "pids-limit")

    # --- usage -------------------------------------------------------------------------

    def cpu_seconds(self) -> float | None:
        """CPU time (user and system) the group's tasks used since it was made; None when
        the group has no CPU accounting (v1 without the cpuacct controller)."""
        if self.version == 2:
            folder = next(iter(self.folders.values()), None)
            if folder is None:
                return None
            for line in _read(folder / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return None
        folder = self.folders.get("cpuacct")
        if folder is None:
            return None
        return int(_read(folder / "cpuacct.usage")) / 1e9

    def memory_bytes(self) -> int | None:
        folder = self.folders.get("memory")
        if folder is None:
            return None
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int(_read(folder / name))

    def tasks(self) -> int | None:
        folder = self.folders.get("pids")
        return None if folder is None else int(_read(folder / "pids.current"))

    # --- the end -----------------------------------------------------------------------

    def remove(self) -> None:
        """Move the process back to the group it came from and remove the folders."""
        for name, folder in list(self.folders.items()):
            try:
                (self.hierarchy.own_folder(name) / "cgroup.procs").write_text(str(self.pid))
            except OSError:
                pass  # the process is gone (the folder empties itself) or the folder is
            _rmdir(folder)
            del self.folders[name]


def shares_of(weight: int | None) -> int:
    """cpu.weight to v1's cpu.shares: each default (100, 1024) maps to the other, linearly,
    within the shares' range."""
    if weight is None:
        return _DEFAULT_SHARES
    return max(_MIN_SHARES, min(_MAX_SHARES, weight * _DEFAULT_SHARES // 100))


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _is_kasou(pid: int) -> bool:
    """Whether process ``pid`` lives and is a kasou (its command line names kasou)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"kasou" in cmdline.read()
    except OSError:
        return False


def remove_stale(hierarchy: Hierarchy, controllers: Iterable[str]) -> list[Path]:
    """Remove the groups of kasou processes that died without removing theirs (kill -9):
    empty groups whose name's pid is gone or is not a kasou. Returns those removed."""
    removed = []
    folders = {hierarchy.own_folder(name) / GROUP_FOLDER for name in controllers}
    for parent in folders:
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for folder in entries:
            _, sep, pid_text = folder.name.rpartition("-")
            if not sep or not pid_text.isdigit() or not folder.is_dir():
                continue
            if _read_or_empty(folder / "cgroup.procs").strip():
                continue  # in use
            pid = int(pid_text)
            if pid != os.getpid() and _is_kasou(pid):
                continue  # a live kasou that has not moved in yet
            try:
                folder.rmdir()
            except OSError:
                continue
            removed.append(folder)
    return removed
