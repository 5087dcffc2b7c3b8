"""What the daemon checks in a VM spec beyond its shape, and the ``kasou run`` argv it becomes.

pydantic (``kasou.spec``) has already checked shapes and ranges. Here: the files a spec names
exist and are readable, its memory fits the host, its disks and nets parse with the very
parsers ``kasou run`` uses (``kasou.vmm.config``), and its limits are well formed. Each
failure is a ``SpecError`` naming the field as the user wrote it (``disks[1]``). A VM that
arrives by migration may carry its boot fields for the cold boots after it arrived
(``boots_once_arrived``): they are checked as a new VM's, since it will boot from them here.

Whether the name is taken is the daemon's business (it holds the table), not this module's.
"""

from __future__ import annotations

import os
from pathlib import Path

from kasou.errors import ConfigError, KasouError, SpecError
from kasou.memory.size import host_memory_bytes, parse_size
from kasou.spec import VmSpec
from kasou.vmm.config import parse_disk, parse_net

__all__ = ["boots_once_arrived", "check_spec", "console_option", "memory_bytes", "run_argv"]


def memory_bytes(text: str) -> int:
    try:
        return parse_size(text)
    except (ConfigError, ValueError) as error:
        raise SpecError("memory", f"{text!r} is not a size: give one like 512M or 2G") from error


def _readable_file(field: str, text: str) -> None:
    path = Path(text)
    if not path.is_absolute():
        raise SpecError(field, f"{text!r} is relative: the daemon needs an absolute path")
    if not path.is_file():
        raise SpecError(field, f"{text}: no such file: give the path of an existing file")
    if not os.access(path, os.R_OK):
        raise SpecError(field, f"{text}: not readable by the daemon: fix its permissions")


# What describes how a VM boots. A restored VM brings its own (``kasou run`` refuses them
# beside --restore); beside ``incoming`` they describe the VM's cold boots once it arrived.
_BOOT_FIELDS = ("kernel", "initrd", "image", "cmdline")


def _check_saved(spec: VmSpec) -> None:
    """A VM brought back (``restore``) or arriving (``incoming``): a restore folder that holds
    a full kasou snapshot (its state file is read and checked) and no boot fields, or a
    listening URL ``kasou run --incoming`` takes (boot fields beside it are checked by
    ``check_spec`` like a new VM's)."""
    if spec.restore is not None and spec.incoming is not None:
        raise SpecError("incoming", "give restore or incoming, not both")
    if spec.clone and spec.restore is None:
        raise SpecError("clone", "a clone is made of a snapshot: give restore too")
    if spec.incoming is not None:
        from kasou.vmm.migration import parse_url

        try:
            parse_url(spec.incoming)
        except (ConfigError, KasouError, ValueError) as error:
            raise SpecError("incoming", str(error)) from error
        return
    assert spec.restore is not None
    given = [field for field in _BOOT_FIELDS if getattr(spec, field) is not None]
    given += [flag for flag in ("rng", "balloon") if getattr(spec, flag)]
    if given:
        raise SpecError(given[0], "describes a new VM; a restored one has its own: leave it out")
    folder = Path(spec.restore)
    if not folder.is_absolute():
        raise SpecError("restore", f"{spec.restore!r} is relative: give an absolute path")
    from kasou.vmm.snapshot import snapshot_info

    try:
        info = snapshot_info(folder)
    except (KasouError, OSError, ValueError) as error:
        raise SpecError("restore", f"{spec.restore}: not a kasou snapshot: {error}") from error
    if info["kind"] != "full":
        raise SpecError(
            "restore", f"{spec.restore} is a diff snapshot: merge it into its full one first"
        )


def boots_once_arrived(spec: VmSpec) -> bool:
    """Whether ``spec`` waits for a migration and then describes its cold boots: once the VM
    has arrived, ``incoming`` is dropped and later starts boot from the spec. Without boot
    fields an incoming VM waits again at each start."""
    return spec.incoming is not None and (spec.boot_after_arrival or spec.describes_boot())


def check_spec(spec: VmSpec, host_memory: int | None = None) -> None:
    """Raise ``SpecError`` unless ``spec`` is one ``kasou run`` can start on this host."""
    if spec.boot_after_arrival and spec.incoming is None:
        raise SpecError("boot_after_arrival", "is for a VM that arrives: give incoming too")
    if spec.restore is not None or spec.incoming is not None or spec.clone:
        _check_saved(spec)
    for field in ("kernel", "initrd", "image"):
        value = getattr(spec, field)
        if value is not None:
            _readable_file(field, value)
    if spec.initrd is not None and spec.kernel is None:
        raise SpecError("initrd", "an initrd needs a kernel: give kernel too")
    if spec.image is not None and spec.kernel is not None:
        raise SpecError("image", "give a kernel or an image, not both")
    size = memory_bytes(spec.memory)
    if size < 1 << 20:
        raise SpecError("memory", f"{spec.memory} is under 1 MiB: give at least 1M")
    available = host_memory if host_memory is not None else host_memory_bytes()
    if size > available:
        raise SpecError(
            "memory",
            f"{spec.memory} is more than the host's {available >> 20} MiB: give less",
        )
    for index, text in enumerate(spec.disks):
        field = f"disks[{index}]"
        try:
            disk = parse_disk(text)
        except ConfigError as error:
            raise SpecError(field, str(error)) from error
        _readable_file(field, str(disk.path))
    for index, text in enumerate(spec.nets):
        try:
            parse_net(text)
        except ConfigError as error:
            raise SpecError(f"nets[{index}]", str(error)) from error
    if spec.limits is not None and spec.limits.memory_limit is not None:
        try:
            parse_size(spec.limits.memory_limit)
        except (ConfigError, ValueError) as error:
            raise SpecError(
                "limits.memory_limit", f"{spec.limits.memory_limit!r}: {error}"
            ) from error
    if spec.limits is not None and spec.limits.cpu_pin is not None:
        for vcpu in spec.limits.cpu_pin:
            if not 0 <= vcpu < spec.vcpus:
                raise SpecError(
                    "limits.cpu_pin", f"vCPU {vcpu} does not exist: 0 to {spec.vcpus - 1}"
                )


def console_option(console_sock: Path, console_log: Path) -> str:
    """``--console`` for a daemon-run VM: live on its socket (any number of clients), and
    everything appended to its log."""
    return f"sock:{console_sock},log={console_log}"


def run_argv(spec: VmSpec, api_sock: Path, console: str) -> list[str]:
    """The ``kasou run`` arguments (without ``run``) that start ``spec``.

    A VM with ``restore`` or ``incoming`` has its memory, vCPUs and devices from the snapshot
    or the stream; ``disks`` and ``nets`` replace its own, except beside boot fields: there
    they describe the VM's later cold boots, and the VM arrives with the disks and
    interfaces it had (``check_spec`` made sure they are here, at the same paths).
    """
    if spec.restore is not None:
        argv = ["--restore", spec.restore] + (["--clone"] if spec.clone else [])
    elif spec.incoming is not None:
        argv = ["--incoming", spec.incoming]
    else:
        argv = ["--memory", spec.memory, "--vcpus", str(spec.vcpus)]
        for field in _BOOT_FIELDS:
            value = getattr(spec, field)
            if value is not None:
                argv += [f"--{field}", value]
        argv += ["--rng"] if spec.rng else []
        argv += ["--balloon"] if spec.balloon else []
        argv += [] if spec.acpi else ["--no-acpi"]
    if not boots_once_arrived(spec):
        for disk in spec.disks:
            argv += ["--disk", disk]
        for net in spec.nets:
            argv += ["--net", net]
    limits = spec.limits
    if limits is not None:
        if limits.cpus_quota is not None:
            argv += ["--cpus-quota", f"{limits.cpus_quota:g}"]
        if limits.cpu_weight is not None:
            argv += ["--cpu-weight", str(limits.cpu_weight)]
        if limits.cpu_pin:
            pins = ",".join(f"{vcpu}={cpu}" for vcpu, cpu in sorted(limits.cpu_pin.items()))
            argv += ["--cpu-pin", pins]
        if limits.memory_limit is not None:
            argv += ["--memory-limit", limits.memory_limit]
        if limits.pids_limit is not None:
            argv += ["--pids-limit", str(limits.pids_limit)]
    argv += ["--api-sock", str(api_sock), "--console", console]
    return argv
