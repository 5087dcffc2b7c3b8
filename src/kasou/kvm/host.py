"""What kind of KVM this host offers: hardware VT-x/AMD-V, PVM, or none usable.

PVM (``kvm_pvm``) is a software-assisted KVM backend for nested use: guest ring 3 runs
natively, guest ring 0 is emulated instruction by instruction and some ring-0 instructions
are refused (shared/ENVIRONMENT.md). A Linux guest does not reach user space there, so kasou
reports it and its tests choose a nested host for Linux guests.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

from kasou.errors import HostError
from kasou.kvm.system import CAPABILITIES, REQUIRED, Kvm

__all__ = ["CAPABILITIES", "REQUIRED", "Backend", "HostInfo", "backend", "probe_host"]


class Backend(enum.Enum):
    """The engine behind /dev/kvm."""

    VMX = "intel-vt-x"
    SVM = "amd-v"
    PVM = "pvm"
    NONE = "none"

    @property
    def boots_linux(self) -> bool:
        """Whether an unmodified Linux guest reaches user space on this backend."""
        return self in (Backend.VMX, Backend.SVM)


PVM_LIMITS = (
    "a Linux guest does not reach user space (ring-0 code is emulated; xsave, SSE and other "
    "instructions are refused): boot Linux inside `kasou nested`",
    "guest ring-0 code runs about 270 ns per instruction",
    "port I/O from guest ring 3 becomes a #GP; `int N` and `syscall` from ring 3 are broken",
)


@dataclass(frozen=True)
class HostInfo:
    """What ``kasou host`` reports."""

    backend: Backend
    device: str
    api_version: int | None = None
    max_vcpus: int | None = None
    capabilities: dict[str, int] = field(default_factory=dict)
    problem: str | None = None

    @property
    def missing(self) -> list[str]:
        """Required capabilities this host lacks."""
        return [name for name in REQUIRED if self.capabilities.get(name, 0) <= 0]

    @property
    def limits(self) -> tuple[str, ...]:
        """What cannot run on this backend."""
        return PVM_LIMITS if self.backend is Backend.PVM else ()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def backend(sys_module: Path = Path("/sys/module")) -> Backend:
    """The engine behind this host's /dev/kvm, from the loaded modules and CPU flags."""
    if (sys_module / "kvm_pvm").exists():
        return Backend.PVM
    flags = _cpu_flags()
    if (sys_module / "kvm_intel").exists() or "vmx" in flags:
        return Backend.VMX
    if (sys_module / "kvm_amd").exists() or "svm" in flags:
        return Backend.SVM
    return Backend.NONE


def probe_host(device: str = "/dev/kvm") -> HostInfo:
    """Open ``device`` and describe the KVM behind it; never raises for a missing KVM."""
    if not os.path.exists(device):
        return HostInfo(Backend.NONE, device, problem=f"{device} is missing")
    try:
        kvm = Kvm(device)
    except HostError as error:
        return HostInfo(backend(), device, problem=str(error))
    with kvm:
        capabilities = {name: kvm.check_extension(cap) for name, cap in CAPABILITIES.items()}
        return HostInfo(
            backend=backend(),
            device=device,
            api_version=kvm.get_api_version(),
            max_vcpus=kvm.max_vcpus(),
            capabilities=capabilities,
        )
