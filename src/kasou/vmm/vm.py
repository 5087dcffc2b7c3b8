"""``Vm``: one running virtual machine and its lifecycle.

The VM owns what the builder made (KVM fds, guest memory, buses, devices, vCPUs) and moves
through the states in ``lifecycle.py``. The first ending wins: a guest power-off, reset or
crash, or a stop request, stops every vCPU and is what ``wait`` returns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kasou.devices.bus import Bus
from kasou.errors import KasouError, LifecycleError, SnapshotError
from kasou.kvm import Kvm, VmFd
from kasou.memory import GuestMemory
from kasou.vmm.config import VmConfig
from kasou.vmm.lifecycle import Transition, VmState, next_state
from kasou.vmm.vcpu import ExitKind, GuestExit, Vcpu

if TYPE_CHECKING:
    from kasou.vmm.dirty import DirtyTracker
    from kasou.vmm.state import VcpuState

__all__ = ["Vm"]

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10.0  # seconds a vCPU may take to answer pause/resume/stop


class Vm:
    """A VM built by ``vmm.builder.build_vm``."""

    def __init__(
        self,
        config: VmConfig,
        kvm: Kvm,
        vm_fd: VmFd,
        memory: GuestMemory,
        pio: Bus,
        mmio: Bus,
        devices: dict[str, Any],
        cleanup: contextlib.ExitStack,
    ) -> None:
        self.config = config
        self.kvm = kvm
        self.vm_fd = vm_fd
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.devices = devices
        self.vcpus: list[Vcpu] = []
        self.loops: list[Any] = []  # the device event loops, parked while the VM is saved
        self.dirty: DirtyTracker | None = None  # once a snapshot or migration began
        self.last_snapshot: str | None = None  # the id a diff snapshot would apply on
        self._cleanup = cleanup
        self._lock = threading.RLock()  # pause, resume and start, one at a time
        self._end_lock = threading.Lock()
        self._state = VmState.CREATED
        self._ending: GuestExit | None = None
        self._ended = threading.Event()
        self._listeners: list[Callable[[GuestExit], None]] = []

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def ending(self) -> GuestExit | None:
        """How the VM ended, once it has."""
        return self._ending

    def on_end(self, listener: Callable[[GuestExit], None]) -> None:
        """Call ``listener(ending)`` (from whichever thread ends the VM) when it ends."""
        self._listeners.append(listener)

    def _move(self, transition: Transition) -> VmState:
        self._state = next_state(self._state, transition)
        return self._state

    def start(self) -> None:
        """Start every vCPU thread (when filters are on, a thread started ahead with the
        vcpu list on, or one from the seccomp supervisor that installs it first:
        kasou/jail/seccomp.py)."""
        from kasou.jail.seccomp import Seccomp

        with self._lock:
            self._move(Transition.START)  # created --start--> running
            guard = Seccomp.active() if self.config.seccomp else None
            if guard is None:
                for vcpu in self.vcpus:
                    vcpu.start()
                return
            unparked = []
            for vcpu in self.vcpus:
                vcpu.on_start = guard.hook("vcpu")
                parked = guard.unpark("vcpu")
                if parked is None:
                    unparked.append(vcpu)
                else:
                    vcpu.start(parked)
            if unparked:
                guard.spawn(lambda: self._start_vcpus(unparked))

    @staticmethod
    def _start_vcpus(vcpus: Sequence[Vcpu]) -> None:
        for vcpu in vcpus:
            vcpu.start()

    def pause(self) -> None:
        """Take every vCPU out of KVM_RUN and keep it out; guest state stays as it is."""
        with self._lock:
            if self._state is not VmState.RUNNING:
                raise LifecycleError(self._state.value, VmState.RUNNING.value, "pause")
            requests = [vcpu.pause() for vcpu in self.vcpus]
            for request in requests:
                request.wait(COMMAND_TIMEOUT)
            with self._end_lock:
                self._move(Transition.PAUSE)  # running --pause--> paused

    def resume(self) -> None:
        """Let the vCPUs run again after ``pause``."""
        with self._lock:
            if self._state is not VmState.PAUSED:
                raise LifecycleError(self._state.value, VmState.PAUSED.value, "resume")
            requests = [vcpu.resume() for vcpu in self.vcpus]
            for request in requests:
                request.wait(COMMAND_TIMEOUT)
            with self._end_lock:
                self._move(Transition.RESUME)  # paused --resume--> running

    def save_vcpus(self) -> list[VcpuState]:
        """Every vCPU's KVM state in index order, each read on its own vCPU thread (which
        owns the fd). The VM must be paused, so that no vCPU moves while the others are read."""
        from kasou.vmm.state import save_vcpu, saved_msr_indices

        with self._lock:
            if self._state is not VmState.PAUSED:
                raise LifecycleError(self._state.value, VmState.PAUSED.value, "save the vCPUs")
            kvm = self.kvm
            requests = [
                vcpu.call(lambda fd: save_vcpu(fd, saved_msr_indices(kvm, fd)))
                for vcpu in self.vcpus
            ]
            return [request.wait(COMMAND_TIMEOUT) for request in requests]

    def restore_vcpus(self, states: Sequence[VcpuState]) -> None:
        """Put every vCPU in its saved state before ``start`` (guest memory already holding
        the saved contents). All states are checked before the first is applied."""
        from kasou.vmm.state import check_vcpu, restore_vcpu

        with self._lock:
            if self._state is not VmState.CREATED:
                raise LifecycleError(self._state.value, VmState.CREATED.value, "restore the vCPUs")
            if len(states) != len(self.vcpus):
                raise SnapshotError(
                    f"the snapshot has {len(states)} vCPUs and this VM {len(self.vcpus)}: "
                    f"restore it with vcpus={len(states)}, the configuration it was taken with"
                )
            for position, state in enumerate(states):
                check_vcpu(state)
                if state.index != position:
                    raise SnapshotError(
                        f"vCPU {position}: the snapshot holds vCPU {state.index}'s state in "
                        "its place: the snapshot is damaged or was not written by kasou"
                    )
            # The vCPU threads have not started: this thread may use their fds.
            for vcpu, state in zip(self.vcpus, states, strict=True):
                restore_vcpu(vcpu.fd, state)

    def stop(self, reason: str = "stopped on request") -> None:
        """End the VM from the host side. Stopping a stopped VM does nothing."""
        self.end(GuestExit(ExitKind.STOPPED, reason))

    def end(self, ending: GuestExit) -> None:
        """Record ``ending`` (the first one wins) and stop every vCPU.

        Safe to call from a vCPU thread (a device's reset callback, a crash): the calling
        vCPU is told to stop, not waited for."""
        # Not under ``_lock``: a pause holding it may be waiting for this very vCPU.
        with self._end_lock:
            if self._ending is not None:
                return
            self._ending = ending
            # running | paused | created --stop--> stopped
            self._state = next_state(self._state, Transition.STOP)
        for vcpu in self.vcpus:
            vcpu.stop()
        if ending.kind is ExitKind.CRASH:
            log.error("vCPU %s: %s", ending.vcpu, ending.reason)
        for listener in self._listeners:
            listener(ending)
        self._ended.set()

    def wait(self, timeout: float | None = None) -> GuestExit | None:
        """Block until the VM has ended; return how (``None`` on timeout)."""
        if not self._ended.wait(timeout):
            return None
        current = threading.current_thread()
        for vcpu in self.vcpus:
            if vcpu._thread is not current:
                vcpu.join(COMMAND_TIMEOUT)
        return self._ending

    def _exits_by_reason(self) -> dict[str, int]:
        io = sum(vcpu.io_exits for vcpu in self.vcpus)
        mmio = sum(vcpu.mmio_exits for vcpu in self.vcpus)
        total = sum(vcpu.exits for vcpu in self.vcpus)
        return {"io": io, "mmio": mmio, "other": total - io - mmio}

    def _kvm_exits(self) -> tuple[dict[str, int], list[dict[str, int]]] | None:
        """KVM's own exit counters (kasou/kvm/stats.py), summed over the vCPUs and each
        vCPU's; None where the kernel has no binary statistics. One pread per vCPU."""
        from kasou.kvm.stats import exit_counts

        by_vcpu: list[dict[str, int]] = []
        for vcpu in self.vcpus:
            counts: dict[str, int] = {}
            if vcpu.kvm_stats is not None:
                try:
                    counts = exit_counts(vcpu.kvm_stats.read().values)
                except (KasouError, OSError) as error:
                    log.debug("vCPU %d: KVM's counters unreadable: %s", vcpu.index, error)
            by_vcpu.append(counts)
        if not any(by_vcpu):
            return None
        total: dict[str, int] = {}
        for counts in by_vcpu:
            for reason, value in counts.items():
                total[reason] = total.get(reason, 0) + value
        return total, by_vcpu

    def status(self) -> dict[str, Any]:
        """What ``kasou status`` shows."""
        ending = self._ending
        status: dict[str, Any] = {
            "state": self._state.value,
            "vcpus": len(self.vcpus),
            "memory": self.memory.size,
            "exits": sum(vcpu.exits for vcpu in self.vcpus),
            # Exits to user space by reason; what KVM handles in the kernel is not counted.
            "exits_by_reason": self._exits_by_reason(),
            "ending": None
            if ending is None
            else {"kind": ending.kind.value, "reason": ending.reason},
        }
        kvm_exits = self._kvm_exits()
        if kvm_exits is not None:
            # Every exit, counted by KVM (kernel and user space alike); the reasons overlap.
            status["kvm_exits"], status["kvm_exits_by_vcpu"] = kvm_exits
        return status

    def virtio(self) -> dict[str, Any]:
        """The virtio transports by device id (``block0``, ``net0``, ``vsock``, ...)."""
        from kasou.devices.virtio import VirtioMmio

        return {key: dev for key, dev in self.devices.items() if isinstance(dev, VirtioMmio)}

    def device_list(self) -> list[dict[str, Any]]:
        """What the ``devices`` request shows: each virtio device, its state and counters."""
        listed = []
        for key, transport in self.virtio().items():
            device = transport.device
            listed.append(
                {
                    "id": key,
                    "type": device.device_type.name.lower(),
                    "active": device.active,
                    "needs_reset": device.broken,
                    "features": f"{device.driver_features:#x}",
                    "interrupts": transport.interrupts,
                    "counters": device.counters(),
                }
            )
        return listed

    def balloon(self, target: int | None) -> dict[str, Any]:
        """Set the balloon's target (bytes, when given) and report its state."""
        from kasou.errors import ConfigError

        transport = self.virtio().get("balloon")
        if transport is None:
            raise ConfigError("balloon", "this VM has no balloon: start it with --balloon")
        balloon = transport.device
        if target is not None:
            if target > self.memory.size:
                raise ConfigError(
                    "target", f"{target} bytes is more than the guest's {self.memory.size}"
                )
            balloon.set_target(target)
        return {
            "target": balloon.target,
            "actual": balloon.actual,
            "stats": balloon.stats(),
            "counters": balloon.counters(),
        }

    def shutdown(self) -> dict[str, Any]:
        """Press the ACPI power button, asking the guest's OS to shut down and power off.

        Returns at once; the VM ends when the guest powers off. Raises ``LifecycleError``
        unless the VM is running, and ``GuestError`` when the guest is not listening for
        the button (``AcpiPm.press_power_button``), which leaves the VM as it was."""
        from kasou.errors import GuestError

        # Under ``_lock``, so no pause slips in between the check and the press.
        with self._lock:
            if self._state is not VmState.RUNNING:
                raise LifecycleError(self._state.value, VmState.RUNNING.value, "shut down")
            if not self.config.acpi:
                raise GuestError(
                    "this VM has no ACPI (--no-acpi), so its guest has no power button to "
                    "press: `kasou stop` ends the VM at once"
                )
            if not self.devices["pm"].press_power_button():
                raise GuestError(
                    "the guest has not enabled the ACPI power button (its kernel has no ACPI, "
                    "it booted with acpi=off, or it is still booting): `kasou stop` ends the "
                    "VM at once"
                )
        return {"state": VmState.RUNNING.value, "power_button": "pressed"}

    def close(self) -> None:
        """Stop the VM if needed and release everything it holds: threads, fds, memory."""
        self.stop("closed")
        self.wait(COMMAND_TIMEOUT)
        self._cleanup.close()
