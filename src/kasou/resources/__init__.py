"""What a VM's kasou may use of the host: CPU time, CPU weight, memory and tasks through
control groups (v2 or v1, one interface), and the host CPUs each vCPU thread runs on.

This package owns the cgroup files and the thread affinities. It does not know what a vCPU
is beyond an index and a thread id, and it never starts or stops anything: the runner
(``vmm/runner.py``) opens ``Resources`` before it builds the VM, hands it the vCPU threads
once they run, answers the control socket's ``limits`` request with it, and closes it at the
end::

    from kasou.resources import ResourceLimits, Resources

    limits = ResourceLimits(cpus_quota=0.5, cpu_pin=((0, 1),), memory_limit=1 << 30)
    resources = Resources.open("vm1", limits, vcpus=1, memory=512 << 20)
    resources.pin_vcpus({0: vcpu_thread.native_id})
    resources.change({"cpus_quota": 0.2})   # live; returns the report
    resources.cpu_seconds()                 # CPU time the group used (for benchmarks)
    resources.close()                       # kasou back in its old group, the group removed

No limit, no cgroup: pinning alone is a thread affinity. A VM's group is
``kasou/<name>-<pid>`` under kasou's own group; the groups of kasou processes that died
(kill -9) are removed by the next kasou that makes one. A host without a needed controller
is a ``HostError`` naming it, before anything is made; a bad value a ``ConfigError``.
"""

from typing import TYPE_CHECKING, Any

from kasou.resources._limits import (
    MEMORY_OVERHEAD,
    MIN_PIDS,
    ResourceLimits,
    allowed_cpus,
    check_host_cpus,
    check_limits,
    parse_cpu_pin,
    parse_cpu_weight,
    parse_cpus_quota,
    parse_pids_limit,
)

if TYPE_CHECKING:
    from kasou.resources._affinity import last_cpu, pin_thread, thread_cpus
    from kasou.resources._cgroup import Cgroup, Hierarchy, find_hierarchy, parse_hierarchy
    from kasou.resources._resources import Resources, hand_over

# The cgroup machinery loads on first use: ``VmConfig`` names ``ResourceLimits`` on every
# start, the rest only matters to a VM with limits.
_LAZY = {
    "last_cpu": "_affinity",
    "pin_thread": "_affinity",
    "thread_cpus": "_affinity",
    "Cgroup": "_cgroup",
    "Hierarchy": "_cgroup",
    "find_hierarchy": "_cgroup",
    "parse_hierarchy": "_cgroup",
    "Resources": "_resources",
    "hand_over": "_resources",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kasou.resources' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"kasou.resources.{module}"), name)


__all__ = [
    "MEMORY_OVERHEAD",
    "MIN_PIDS",
    "Cgroup",
    "Hierarchy",
    "ResourceLimits",
    "Resources",
    "allowed_cpus",
    "check_host_cpus",
    "check_limits",
    "find_hierarchy",
    "hand_over",
    "last_cpu",
    "parse_cpu_pin",
    "parse_cpu_weight",
    "parse_cpus_quota",
    "parse_hierarchy",
    "parse_pids_limit",
    "pin_thread",
    "thread_cpus",
]
