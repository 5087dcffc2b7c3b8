"""``Resources``: what one VM's kasou applies to itself, and changes while it runs.

It owns the VM's cgroup (made only when a limit needs one) and the pinning of its vCPU
threads. Every change is checked whole before any of it is applied; the memory limit, the
one the kernel may refuse (a limit below what the group already uses), is written first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kasou.errors import ConfigError
from kasou.resources._affinity import last_cpu, pin_thread, thread_cpus
from kasou.resources._cgroup import Cgroup, Hierarchy, find_hierarchy, remove_stale
from kasou.resources._limits import ResourceLimits, check_host_cpus, check_limits

__all__ = ["Resources", "hand_over"]

# A group made by ``kasou run --jail``'s supervisor and handed to the VMM it forks, which
# cannot see the cgroup hierarchy from its jail: (version, controller -> folder).
_handed: tuple[int, dict[str, Path]] | None = None


def hand_over(group: Cgroup) -> None:
    """Make ``group`` the one every later ``Resources`` of this process (and of the children
    it forks) adopts instead of making its own. The jail's supervisor calls it before the
    fork; the VMM inside then changes the group's files (handed to its uid) but never
    makes or removes folders: the supervisor removes the group once the VMM ended."""
    global _handed
    _handed = (group.version, dict(group.folders))


_SETTERS = {
    "cpus_quota": ("cpu", Cgroup.set_cpu_quota),
    "cpu_weight": ("cpu", Cgroup.set_cpu_weight),
    "memory_limit": ("memory", Cgroup.set_memory_limit),
    "pids_limit": ("pids", Cgroup.set_pids_limit),
}


class Resources:
    """The limits of one VM's kasou process. ``open`` applies the start-up limits;
    ``change`` applies new values live; ``close`` removes the group."""

    def __init__(
        self, name: str, *, vcpus: int, memory: int, hierarchy: Hierarchy | None = None
    ) -> None:
        self.name = name
        self.vcpus = vcpus
        self.memory = memory
        self.limits = ResourceLimits()
        self._hierarchy = hierarchy
        self._group: Cgroup | None = None
        self._adopted = False
        self._threads: dict[int, int] = {}  # vCPU index -> thread id
        self._unpinned = frozenset(os.sched_getaffinity(0))
        self._started = time.monotonic()
        self._cpu_at_start = time.process_time()

    @classmethod
    def open(
        cls,
        name: str,
        limits: ResourceLimits,
        *,
        vcpus: int,
        memory: int,
        hierarchy: Hierarchy | None = None,
    ) -> Resources:
        """Check ``limits``, then make the group and move kasou in (before guest RAM is
        allocated, so that it is charged to the group). Nothing is left on failure."""
        resources = cls(name, vcpus=vcpus, memory=memory, hierarchy=hierarchy)
        try:
            resources.change(limits._asdict(), starting=True)
        except BaseException:
            resources.close()
            raise
        return resources

    @property
    def group(self) -> Cgroup | None:
        return self._group

    def change(self, changes: Mapping[str, Any], *, starting: bool = False) -> dict[str, Any]:
        """Apply ``changes`` (``ResourceLimits`` field names; None lifts a limit) and return
        the report. A bad value raises ``ConfigError`` with nothing changed."""
        unknown = set(changes) - set(ResourceLimits._fields)
        if unknown:
            raise ConfigError("limits", f"unknown limits {', '.join(sorted(unknown))}")
        new = self.limits._replace(**changes)
        check_limits(new, vcpus=self.vcpus, memory=self.memory)
        check_host_cpus(new)
        group_changes = {
            field: value
            for field, value in changes.items()
            if field in _SETTERS and (value is not None or getattr(self.limits, field) is not None)
        }
        if (
            not starting
            and group_changes.get("memory_limit") is not None
            and (self._group is None or "memory" not in self._group.folders)
        ):
            raise ConfigError(
                "memory-limit",
                "a memory limit must be set when the VM starts (--memory-limit), so that "
                "guest RAM is charged to it; it can then be changed",
            )
        if group_changes:
            group = self._ensure_group(
                [_SETTERS[field][0] for field, value in group_changes.items() if value is not None]
            )
            # The memory limit first: the kernel refuses one below current use (EBUSY).
            for field in sorted(group_changes, key=lambda name: name != "memory_limit"):
                controller, setter = _SETTERS[field]
                if controller in group.folders:
                    setter(group, group_changes[field])
        self.limits = new
        if "cpu_pin" in changes:
            self._apply_pins()
        return self.report()

    def _ensure_group(self, controllers: list[str]) -> Cgroup:
        if _handed is not None:
            return self._adopt(controllers, *_handed)
        if self._hierarchy is None:
            self._hierarchy = find_hierarchy()
        hierarchy = self._hierarchy
        if self._group is None:
            # The name goes into a folder name: anything but [A-Za-z0-9_.] becomes "_".
            leaf = "".join(
                c if c.isascii() and (c.isalnum() or c in "_.") else "_" for c in self.name
            )
            self._group = Cgroup(hierarchy, leaf[:64] or "vm")
        wanted = [name for name in controllers if name not in self._group.folders]
        for name in wanted:
            hierarchy.own_folder(name)  # a missing controller: one error, nothing made
        if hierarchy.version == 1 and "cpu" in wanted and "cpuacct" in hierarchy.available:
            wanted.append("cpuacct")  # v1 counts CPU time in a controller of its own
        if wanted:
            remove_stale(hierarchy, wanted)
            self._group.ensure(wanted)
        return self._group

    def _adopt(self, controllers: list[str], version: int, folders: dict[str, Path]) -> Cgroup:
        """The supervisor's group (see ``hand_over``), for the controllers it has."""
        missing = sorted(set(controllers) - set(folders))
        if missing:
            raise ConfigError(
                "limits",
                f"in a jail, only limits given at the start can be changed (no "
                f"{', '.join(missing)} group was made): start the VM with that limit",
            )
        if self._group is None:
            # own folders: the group's grandparents (OWN/kasou/NAME-PID); never written here
            owners = {name: folder.parent.parent for name, folder in folders.items()}
            hierarchy = Hierarchy(
                version,
                {"": next(iter(owners.values()))} if version == 2 else owners,
                frozenset(folders),
            )
            self._group = Cgroup(hierarchy, "handed")
            self._group.folders = dict(folders)
            self._adopted = True
        return self._group

    def pin_vcpus(self, threads: Mapping[int, int]) -> None:
        """The vCPU threads of the current boot (index -> thread id): pin them as asked.
        Called again after a reboot builds new ones."""
        self._threads = dict(threads)
        self._apply_pins()

    def _apply_pins(self) -> None:
        pins = dict(self.limits.cpu_pin)
        for vcpu, tid in self._threads.items():
            pin_thread(tid, {pins[vcpu]} if vcpu in pins else self._unpinned)

    def cpu_seconds(self) -> float:
        """CPU time used: the group's (every thread of kasou since the group was made),
        or, without a CPU-accounting group, this process's since ``Resources`` was made."""
        if self._group is not None:
            used = self._group.cpu_seconds()
            if used is not None:
                return used
        return time.process_time() - self._cpu_at_start

    def report(self) -> dict[str, Any]:
        """Current values, the group and measured usage, as the ``limits`` request shows."""
        limits = self.limits
        group = self._group
        return {
            "cpus_quota": limits.cpus_quota,
            "cpu_weight": limits.cpu_weight,
            "cpu_pin": {str(vcpu): cpu for vcpu, cpu in limits.cpu_pin},
            "memory_limit": limits.memory_limit,
            "pids_limit": limits.pids_limit,
            "cgroup": None
            if group is None or not group.folders
            else {
                "version": group.version,
                "folders": {name: str(folder) for name, folder in sorted(group.folders.items())},
            },
            "usage": {
                "cpu_seconds": round(self.cpu_seconds(), 6),
                "memory_bytes": None if group is None else group.memory_bytes(),
                "tasks": None if group is None else group.tasks(),
            },
            "vcpus": [
                {"vcpu": vcpu, "tid": tid, "cpus": thread_cpus(tid), "last_cpu": last_cpu(tid)}
                for vcpu, tid in sorted(self._threads.items())
            ],
        }

    def close(self) -> None:
        """Move kasou back to where it started and remove the group (an adopted one is
        its maker's to remove)."""
        if self._group is not None and not self._adopted:
            self._group.remove()
