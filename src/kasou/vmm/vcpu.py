"""A vCPU actor: one thread in a blocking KVM_RUN, driven by commands and kicks.

Other threads never touch a vCPU's fd. They queue a command (pause, resume, stop, or a
function to run on the vCPU thread, such as reading its registers) and kick the thread:
``immediate_exit`` is set in ``kvm_run`` and SIGUSR1 is sent to the thread, so KVM_RUN returns
``EINTR`` whether the thread was inside it or about to enter (Documentation/virt/kvm/api.rst,
``immediate_exit``). The thread then clears the flag and drains its queue.

The exit loop handles only exits that need an answer now: PIO and MMIO accesses go to the
buses with zero-copy views of the ``kvm_run`` page. Everything else ends the vCPU with a
``GuestExit`` reported to the VM. Doorbells (ioeventfd) and interrupts (irqfd) never reach
this thread.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import queue
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from kasou._sys import ioctl_noretry, set_thread_name
from kasou.devices.bus import Bus
from kasou.errors import HostError, KasouError, LifecycleError
from kasou.event import ParkedThread
from kasou.kvm import VcpuFd
from kasou.kvm import bindings as b
from kasou.kvm.stats import KvmStats

__all__ = [
    "KICK_SIGNAL",
    "ExitKind",
    "GuestExit",
    "Vcpu",
    "install_kick_handler",
    "register_report",
]

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
_ENTER_WAIT = 1.0  # seconds ``start`` waits at most for a parked thread to enter the guest

_IO = struct.Struct("<BBHIQ")  # struct kvm_run io: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # struct kvm_run mmio: phys_addr, data[8], len, is_write
_INTERNAL = struct.Struct("<II")  # struct kvm_run internal: suberror, ndata (then u64 data[])


class ExitKind(enum.Enum):
    """Why a VM's vCPUs ended, in order of how a user reads the exit status."""

    POWEROFF = "poweroff"  # the guest turned itself off
    REBOOT = "reboot"  # the guest reset the machine
    STOPPED = "stopped"  # the host asked (stop request, Ctrl-A X, a signal)
    CRASH = "crash"  # triple fault, KVM internal error, failed entry
    ERROR = "error"  # kasou itself failed
    DEBUG_EXIT = "debug-exit"  # the guest wrote the debug-exit port; it chose the status

    @property
    def status(self) -> int:
        """The exit status of ``kasou run`` for this ending (a debug exit's is its own:
        ``GuestExit.status``)."""
        return 1 if self in (ExitKind.CRASH, ExitKind.ERROR) else 0


class GuestExit(NamedTuple):
    """How a VM ended; ``report`` (crashes) names the vCPU and its registers; ``code`` is the
    exit status a debug exit carries."""

    kind: ExitKind
    reason: str
    vcpu: int | None = None
    report: str | None = None
    code: int | None = None

    @property
    def status(self) -> int:
        """The exit status of ``kasou run``: the guest's own for a debug exit, else the
        kind's."""
        return self.code if self.code is not None else self.kind.status


class _Command(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    CALL = "call"


class _Request:
    """A queued command and its reply."""

    __slots__ = ("command", "done", "error", "function", "result")

    def __init__(self, command: _Command, function: Callable[[VcpuFd], Any] | None = None):
        self.command = command
        self.function = function
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def wait(self, timeout: float) -> Any:
        if not self.done.wait(timeout):
            raise HostError(f"a vCPU did not answer {self.command.value} within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result


def install_kick_handler() -> None:
    """Install the (empty) SIGUSR1 handler that makes a kick interrupt KVM_RUN.

    Python installs signal handlers from the main thread only; ``Vcpu.start`` calls this
    when it can and otherwise requires that it was done."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise HostError(
            "kasou needs a SIGUSR1 handler to kick vCPUs: call "
            "kasou.vmm.install_kick_handler() from the main thread before starting a VM"
        )
    signal.signal(KICK_SIGNAL, _ignore_kick)


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's work is done by interrupting KVM_RUN; nothing is left for the handler."""


class Vcpu:
    """One vCPU: its fd, its thread and its command queue."""

    def __init__(
        self,
        fd: VcpuFd,
        pio: Bus,
        mmio: Bus,
        on_exit: Callable[[GuestExit], None],
        kvm_stats: KvmStats | None = None,
    ) -> None:
        self.fd = fd
        self.index = fd.vcpu_id
        self._pio = pio
        self._mmio = mmio
        self._on_exit = on_exit
        self._commands: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.exits = 0  # exits to user space, for status and benchmarks
        self.io_exits = 0  # of which port I/O
        self.mmio_exits = 0  # of which MMIO
        # KVM's own counters of this vCPU (kasou/kvm/stats.py), read by status, not per exit;
        # None on a kernel without binary statistics. The builder opens and closes it.
        self.kvm_stats = kvm_stats
        # Run first on the vCPU thread, once it is named (a seccomp filter's installation).
        self.on_start: Callable[[], None] | None = None
        self._entered = threading.Event()  # set at the thread's first KVM_RUN, or its end

    # --- control, from other threads ---------------------------------------------------

    def start(self, parked: ParkedThread | None = None) -> None:
        """Run the vCPU in its own (daemon) thread: a new one, or ``parked``."""
        install_kick_handler()
        name = f"kasou-vcpu{self.index}"
        if parked is None:
            self._thread = threading.Thread(target=self._main, name=name, daemon=True)
            self._thread.start()
            return
        self._thread = parked.thread
        parked.run(self._main, name)
        # Until the thread is in KVM_RUN it needs the interpreter lock, which the caller
        # would otherwise keep until its next blocking call (a waiting thread asks for it
        # only after sys.getswitchinterval(), 5 ms): let it have it now. A thread started
        # ahead only has to wake up; the bound keeps one that cannot from stopping the VM.
        self._entered.wait(_ENTER_WAIT)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread_id(self) -> int | None:
        """The kernel's id of the vCPU's thread once it runs (for pinning), else None."""
        return None if self._thread is None else self._thread.native_id

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN (or not enter it) and look at its queue."""
        thread = self._thread
        if thread is None or thread.ident is None or not thread.is_alive():
            return
        self.fd.set_immediate_exit(True)
        try:
            signal.pthread_kill(thread.ident, KICK_SIGNAL)
        except ProcessLookupError:
            pass  # the thread ended between the check and the signal

    def send(self, command: _Command, function: Callable[[VcpuFd], Any] | None = None) -> _Request:
        request = _Request(command, function)
        if not self.alive:
            request.error = LifecycleError("stopped", "running or paused", command.value)
            request.done.set()
            return request
        self._commands.put(request)
        self.kick()
        return request

    def pause(self) -> _Request:
        return self.send(_Command.PAUSE)

    def resume(self) -> _Request:
        return self.send(_Command.RESUME)

    def stop(self) -> _Request:
        return self.send(_Command.STOP)

    def call(self, function: Callable[[VcpuFd], Any]) -> _Request:
        """Run ``function(fd)`` on the vCPU thread (it owns the fd) between two KVM_RUNs."""
        return self.send(_Command.CALL, function)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the vCPU thread ----------------------------------------------------------------

    def _main(self) -> None:
        set_thread_name(f"kasou-vcpu{self.index}")
        try:
            if self.on_start is not None:
                self.on_start()
            ending = self._loop()
        except KasouError as error:
            ending = GuestExit(ExitKind.ERROR, str(error), self.index)
        except Exception as error:  # a kasou bug: end this VM, keep the process sane
            log.exception("vCPU %d failed", self.index)
            ending = GuestExit(ExitKind.ERROR, f"internal error: {error!r}", self.index)
        self._entered.set()
        self._drain_after_end()
        if ending is not None:
            self._on_exit(ending)

    def _loop(self) -> GuestExit | None:
        """Run until the guest or a command ends this vCPU. Returns the ending to report
        (``None`` when a stop command ended it: the VM already knows why)."""
        fd = self.fd.fd
        page = self.fd.run_page
        view = memoryview(page)
        exit_reason = view[b.RUN_EXIT_REASON : b.RUN_EXIT_REASON + 4].cast("I")
        mmio_data = view[b.RUN_MMIO_DATA : b.RUN_MMIO_DATA + 8]
        pio, mmio = self._pio, self._mmio
        unpack_io, unpack_mmio = _IO.unpack_from, _MMIO.unpack_from
        run, request = ioctl_noretry, b.KVM_RUN
        exit_io, exit_mmio = b.KVM_EXIT_IO, b.KVM_EXIT_MMIO
        union = b.RUN_UNION
        if self.index == 0 and os.environ.get("KASOU_TRACE_START"):
            # For bench/start.py: when the boot vCPU enters the guest, on CLOCK_MONOTONIC.
            sys.stderr.write(f"kasou: first KVM_RUN at {time.monotonic_ns()}\n")
        self._entered.set()
        try:
            while True:
                result = run(fd, request)
                if result < 0:
                    if result in (-errno.EINTR, -errno.EAGAIN):
                        page[b.RUN_IMMEDIATE_EXIT] = 0
                        if not self._handle_commands():
                            return None
                        continue
                    return self._crash(f"KVM_RUN failed: errno {-result}")
                self.exits += 1
                reason = exit_reason[0]
                if reason == exit_io:
                    self.io_exits += 1
                    out, size, port, count, offset = unpack_io(page, union)
                    if count == 1:
                        data = view[offset : offset + size]
                        if out:
                            pio.write(port, data)
                        elif not pio.read(port, data):
                            data[:] = b"\xff" * size
                    else:  # rep ins/outs: count items of size bytes, back to back
                        for item in range(count):
                            start = offset + item * size
                            data = view[start : start + size]
                            if out:
                                pio.write(port, data)
                            elif not pio.read(port, data):
                                data[:] = b"\xff" * size
                elif reason == exit_mmio:
                    self.mmio_exits += 1
                    address, _, length, is_write = unpack_mmio(page, union)
                    data = mmio_data[:length] if 0 < length <= 8 else mmio_data[:0]
                    if is_write:
                        mmio.write(address, data)
                    elif not mmio.read(address, data):
                        data[:] = b"\xff" * len(data)
                else:
                    ending = self._other_exit(reason)
                    if ending is not None:
                        return ending
        finally:
            mmio_data.release()
            exit_reason.release()
            view.release()

    def _handle_commands(self) -> bool:
        """Serve queued commands; block while paused. False when the vCPU must end."""
        paused = False
        while True:
            try:
                request = self._commands.get(block=paused)
            except queue.Empty:
                return True
            command = request.command
            try:
                if command is _Command.PAUSE:
                    paused = True
                elif command is _Command.RESUME:
                    paused = False
                elif command is _Command.STOP:
                    request.done.set()
                    return False
                elif request.function is not None:
                    request.result = request.function(self.fd)
            except BaseException as error:
                request.error = error
            request.done.set()
            if not paused and self._commands.empty():
                return True

    def _drain_after_end(self) -> None:
        """Answer whatever is still queued after the thread's last KVM_RUN."""
        while True:
            try:
                request = self._commands.get_nowait()
            except queue.Empty:
                return
            if request.command is not _Command.STOP:
                request.error = LifecycleError(
                    "stopped", "running or paused", request.command.value
                )
            request.done.set()

    def _other_exit(self, reason: int) -> GuestExit | None:
        if reason == b.KVM_EXIT_SHUTDOWN:
            # On x86 a shutdown exit is a triple fault (Intel SDM vol. 3, 6.15 #DF).
            return self._crash("triple fault")
        if reason == b.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _INTERNAL.unpack_from(self.fd.run_page, b.RUN_UNION)
            words = struct.unpack_from(f"<{min(ndata, 16)}Q", self.fd.run_page, b.RUN_UNION + 8)
            detail = " ".join(f"{word:#x}" for word in words)
            what = "instruction emulation failed" if suberror == 1 else f"suberror {suberror}"
            return self._crash(f"KVM internal error: {what} [{detail}]")
        if reason == b.KVM_EXIT_FAIL_ENTRY:
            code = struct.unpack_from("<Q", self.fd.run_page, b.RUN_UNION)[0]
            return self._crash(f"VM entry failed: hardware reason {code:#x}")
        if reason == b.KVM_EXIT_SYSTEM_EVENT:
            event = struct.unpack_from("<I", self.fd.run_page, b.RUN_UNION)[0]
            if event == b.KVM_SYSTEM_EVENT_RESET:
                return GuestExit(ExitKind.REBOOT, "the guest reset the machine", self.index)
            if event == b.KVM_SYSTEM_EVENT_SHUTDOWN:
                return GuestExit(ExitKind.POWEROFF, "the guest powered off", self.index)
            return self._crash(f"system event {event}")
        if reason in (b.KVM_EXIT_HLT, b.KVM_EXIT_INTR, b.KVM_EXIT_UNKNOWN):
            return None if reason != b.KVM_EXIT_UNKNOWN else self._crash("unknown exit")
        return self._crash(f"unexpected exit reason {reason}")

    def _crash(self, reason: str) -> GuestExit:
        return GuestExit(ExitKind.CRASH, reason, self.index, register_report(self.fd))


def register_report(fd: VcpuFd) -> str:
    """The vCPU's registers as a crash report reads them."""
    try:
        regs = fd.get_regs()
        sregs = fd.get_sregs()
    except KasouError as error:
        return f"vCPU {fd.vcpu_id}: registers unavailable ({error})"
    names = [field[0] for field in regs._fields_]
    lines = [f"vCPU {fd.vcpu_id} registers:"]
    for row in range(0, len(names), 4):  # four registers a line
        lines.append(
            "  "
            + "  ".join(f"{name:>6}={getattr(regs, name):016x}" for name in names[row : row + 4])
        )
    lines.append(
        f"     cr0={sregs.cr0:016x}     cr2={sregs.cr2:016x}     cr3={sregs.cr3:016x}"
        f"     cr4={sregs.cr4:016x}"
    )
    lines.append(
        f"    efer={sregs.efer:016x}      cs={sregs.cs.selector:04x}  ss={sregs.ss.selector:04x}"
        f"  cpl={sregs.cs.dpl}"
    )
    return "\n".join(lines)
