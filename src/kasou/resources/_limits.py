"""``ResourceLimits`` and the checks on each value, from the command line or a control request.

Values arrive as text (``--cpus-quota 0.5``) or as JSON (a control request: untrusted), and
leave as numbers. The checks that need no host (ranges, vCPU indexes, guest RAM) are in
``check_limits``; those that read the host (its CPUs) in ``check_host_cpus``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import NamedTuple

from kasou.errors import ConfigError

__all__ = [
    "MEMORY_OVERHEAD",
    "MIN_PIDS",
    "ResourceLimits",
    "allowed_cpus",
    "check_host_cpus",
    "check_limits",
    "parse_cpu_pin",
    "parse_cpu_weight",
    "parse_cpus_quota",
    "parse_pids_limit",
]

# What kasou itself may need beyond guest RAM inside the memory limit (its Python heap,
# thread stacks, device buffers). A floor, not an estimate: a limit this tight can still
# kill kasou when the guest touches all of its RAM; give 64 MiB or more to be safe.
MEMORY_OVERHEAD = 16 << 20
# Tasks kasou runs besides its vCPU threads: the main thread, event loops (runner, devices,
# one per disk), control workers. A pids limit below vCPUs + this stops threads from starting.
MIN_PIDS = 16
# The kernel refuses CFS quotas below 1 ms (kernel/sched/core.c, min_cfs_quota_period);
# kasou uses a 100 ms period, so 0.01 of a CPU is the least it can ask.
QUOTA_PERIOD_US = 100_000
MIN_QUOTA = 0.01
# cpu.weight's range (Documentation/admin-guide/cgroup-v2.rst, "cpu.weight").
MIN_WEIGHT, MAX_WEIGHT = 1, 10_000
# PID_MAX_LIMIT on 64-bit (include/linux/threads.h): more tasks cannot exist.
MAX_PIDS = 4 * 1024 * 1024


class ResourceLimits(NamedTuple):
    """What a VM's kasou may use of the host. ``None`` (or no pins) leaves a resource alone.

    ``cpus_quota`` is in host CPUs (0.5: half of one CPU's time, 2.0: two CPUs' worth);
    ``cpu_weight`` the share under contention (1-10000, 100 the default); ``cpu_pin`` pairs
    (vCPU index, host CPU); ``memory_limit`` bytes, guest RAM included; ``pids_limit`` the
    tasks (threads) kasou may have."""

    cpus_quota: float | None = None
    cpu_weight: int | None = None
    cpu_pin: tuple[tuple[int, int], ...] = ()
    memory_limit: int | None = None
    pids_limit: int | None = None

    @property
    def controllers(self) -> tuple[str, ...]:
        """The cgroup controllers these limits need (none: no cgroup at all)."""
        wanted = []
        if self.cpus_quota is not None or self.cpu_weight is not None:
            wanted.append("cpu")
        if self.memory_limit is not None:
            wanted.append("memory")
        if self.pids_limit is not None:
            wanted.append("pids")
        return tuple(wanted)


def _number(field: str, value: object, what: str) -> float:
    """A JSON or text number; booleans and NaN are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(field, f"{value!r} is not a number: give {what}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(field, f"{value!r} is not a number: give {what}") from None
    if not math.isfinite(number):
        raise ConfigError(field, f"{value!r} is not a number: give {what}")
    return number


def _whole(field: str, value: object, what: str) -> int:
    number = _number(field, value, what)
    if number != int(number):
        raise ConfigError(field, f"{value!r} is not a whole number: give {what}")
    return int(number)


def parse_cpus_quota(value: object) -> float:
    """``--cpus-quota``: host CPUs' worth of time, 0.01 or more (0.5 is half of one CPU)."""
    quota = _number("cpus-quota", value, "host CPUs, like 0.5 or 2")
    if quota < MIN_QUOTA:
        raise ConfigError(
            "cpus-quota", f"{value} is too little: give at least {MIN_QUOTA} of a host CPU"
        )
    return quota


def parse_cpu_weight(value: object) -> int:
    """``--cpu-weight``: 1 to 10000 (100 is every process's default)."""
    weight = _whole("cpu-weight", value, f"{MIN_WEIGHT} to {MAX_WEIGHT}, like 100")
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ConfigError(
            "cpu-weight", f"{value}: give {MIN_WEIGHT} to {MAX_WEIGHT} (100: default)"
        )
    return weight


def parse_pids_limit(value: object) -> int:
    """``--pids-limit``: how many tasks (threads) kasou may have."""
    pids = _whole("pids-limit", value, "a number of tasks, like 64")
    if not MIN_PIDS <= pids <= MAX_PIDS:
        raise ConfigError(
            "pids-limit", f"{value}: give {MIN_PIDS} to {MAX_PIDS} (kasou needs {MIN_PIDS} + vCPUs)"
        )
    return pids


def parse_cpu_pin(value: object) -> tuple[tuple[int, int], ...]:
    """``--cpu-pin 0=2,1=3`` (vCPU 0 on host CPU 2, ...), or a JSON object ``{"0": 2}``.
    An empty string or object pins nothing."""
    if isinstance(value, str):
        pairs: list[tuple[object, object]] = []
        for word in value.split(",") if value.strip() else []:
            left, sep, right = word.partition("=")
            if not sep:
                raise ConfigError("cpu-pin", f"{word!r}: write VCPU=CPU pairs, like 0=2,1=3")
            pairs.append((left.strip(), right.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ConfigError("cpu-pin", 'give VCPU=CPU pairs like "0=2,1=3" or {"0": 2}')
    pins: dict[int, int] = {}
    for vcpu_text, cpu_text in pairs:
        vcpu = _index("cpu-pin", vcpu_text, "vCPU")
        cpu = _index("cpu-pin", cpu_text, "host CPU")
        if vcpu in pins:
            raise ConfigError("cpu-pin", f"vCPU {vcpu} is pinned twice")
        pins[vcpu] = cpu
    return tuple(sorted(pins.items()))


def _index(field: str, value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(field, f"{value!r} is not a {what} number")
    text = str(value)
    if not text.isdigit() or not text.isascii() or len(text) > 7:
        raise ConfigError(field, f"{value!r} is not a {what} number: give 0, 1, ...")
    return int(text)


def check_limits(limits: ResourceLimits, *, vcpus: int, memory: int) -> None:
    """The checks that need the VM but not the host: pinned vCPUs exist, the memory limit
    holds guest RAM and kasou, the pids limit lets every thread start."""
    for vcpu, _ in limits.cpu_pin:
        if vcpu >= vcpus:
            raise ConfigError(
                "cpu-pin", f"vCPU {vcpu} does not exist: the VM has vCPUs 0 to {vcpus - 1}"
            )
    if limits.memory_limit is not None and limits.memory_limit < memory + MEMORY_OVERHEAD:
        raise ConfigError(
            "memory-limit",
            f"{limits.memory_limit >> 20} MiB is below guest RAM ({memory >> 20} MiB) plus "
            f"{MEMORY_OVERHEAD >> 20} MiB for kasou itself: give at least "
            f"{(memory + MEMORY_OVERHEAD) >> 20}M",
        )
    if limits.pids_limit is not None and limits.pids_limit < vcpus + MIN_PIDS:
        raise ConfigError(
            "pids-limit",
            f"{limits.pids_limit} tasks is too few for {vcpus} vCPU threads and kasou's "
            f"{MIN_PIDS}: give at least {vcpus + MIN_PIDS}",
        )


def allowed_cpus() -> frozenset[int]:
    """The host CPUs this process may run on (its affinity, inside any cpuset)."""
    return frozenset(os.sched_getaffinity(0))


def check_host_cpus(limits: ResourceLimits, allowed: frozenset[int] | None = None) -> None:
    """The checks that read the host: pinned CPUs are ones kasou may use, and the quota is
    no more than those CPUs can give."""
    allowed = allowed_cpus() if allowed is None else allowed
    listed = ",".join(str(cpu) for cpu in sorted(allowed))
    for vcpu, cpu in limits.cpu_pin:
        if cpu not in allowed:
            raise ConfigError(
                "cpu-pin",
                f"vCPU {vcpu} on host CPU {cpu}: kasou may run on CPUs {listed} only",
            )
    if limits.cpus_quota is not None and limits.cpus_quota > len(allowed):
        raise ConfigError(
            "cpus-quota",
            f"{limits.cpus_quota:g} CPUs is more than the {len(allowed)} kasou may run on "
            f"({listed}): give at most {len(allowed)}",
        )
