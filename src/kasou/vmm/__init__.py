"""One VM: configuration, the builder (the only wiring site), lifecycle, vCPU threads,
console, control socket, and the runner that ties them together for ``kasou run``."""

from kasou.vmm.builder import ExtraDevice, build_vm
from kasou.vmm.config import ConsoleConfig, VmConfig
from kasou.vmm.lifecycle import VmState
from kasou.vmm.runner import run
from kasou.vmm.vcpu import ExitKind, GuestExit, install_kick_handler
from kasou.vmm.vm import Vm

__all__ = [
    "ConsoleConfig",
    "ExitKind",
    "ExtraDevice",
    "GuestExit",
    "Vm",
    "VmConfig",
    "VmState",
    "build_vm",
    "install_kick_handler",
    "run",
]
