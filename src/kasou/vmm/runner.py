"""``run``: one VM from start to end, as ``kasou run`` does it.

It owns what outlives a guest reboot: the console, the event loop, the control socket.
Each boot builds a fresh VM (new KVM VM, fresh RAM: a reset forgets everything, as on real
hardware); with ``on_reboot = "restart"`` a guest reset boots again, otherwise it ends the
run. SIGTERM, SIGINT and SIGHUP stop the VM the way a stop request does, and the terminal is
restored on every way out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from kasou.errors import LifecycleError
from kasou.event import EventLoop
from kasou.vmm.agent import AgentChannel
from kasou.vmm.builder import build_vm
from kasou.vmm.config import VmConfig
from kasou.vmm.console import Console
from kasou.vmm.lifecycle import VmState
from kasou.vmm.vcpu import ExitKind, GuestExit, install_kick_handler
from kasou.vmm.vm import Vm

if TYPE_CHECKING:
    from kasou.jail.seccomp import Seccomp
    from kasou.resources import Resources
    from kasou.vmm.control import ControlServer, Deferred
    from kasou.vmm.reclaim import HostMemory, ReclaimMonitor
    from kasou.vmm.requests import Reply, Request
    from kasou.vmm.snapshot import MachineImage

__all__ = ["run"]

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REPORT_WAIT = 2.0  # seconds a migrated VM's kasou waits for `kasou migrate` to read the result


class _Session:
    """The VM of the current boot, and the requests that reach it."""

    def __init__(self, agent: AgentChannel) -> None:
        self.agent = agent
        self.vm: Vm | None = None
        self.boots = 0
        self.started = time.monotonic()
        self.quit: GuestExit | None = None
        self.busy: str | None = None  # a snapshot or migration under way
        self.migration: Any = None  # the last vmm.migration.Migration started
        self.reclaim: ReclaimMonitor | None = None  # --reclaim's monitor
        self.config: VmConfig | None = None
        self.resources: Resources | None = None  # cgroup and pinning, once any is asked
        self._lock = threading.Lock()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.quit is None:
                self.quit = GuestExit(ExitKind.STOPPED, reason)
            vm = self.vm
        if vm is not None:
            vm.stop(reason)

    def handle(self, request: Request) -> Reply | Deferred:
        from kasou.vmm.requests import Reply, RequestKind  # only VMs with a control socket

        vm = self.vm
        if request.kind is RequestKind.STOP:
            self.stop("stopped on request")
            return Reply(True, {"state": "stopped"})
        if request.kind is RequestKind.EXEC:
            return lambda: self._exec(request)
        if request.kind is RequestKind.SHUTDOWN:
            if vm is None:  # between two boots: no guest to tell
                raise LifecycleError("booting", VmState.RUNNING.value, "shut down")
            pressed = vm.shutdown()
            if request.wait <= 0:
                return Reply(True, pressed)
            return lambda: self._await_end(vm, request.wait, pressed)
        if request.kind in (RequestKind.MIGRATION, RequestKind.MIGRATE_CANCEL):
            return Reply(True, self._migration_request(vm, request))  # also once it left
        if request.kind is RequestKind.LIMITS:
            return Reply(True, self._limits(request))  # also between two boots
        if request.kind is RequestKind.RECLAIM:
            return Reply(True, self._reclaim_request(request))  # also between two boots
        if vm is None:
            if request.kind in (RequestKind.SNAPSHOT, RequestKind.MIGRATE):
                raise LifecycleError("booting", VmState.RUNNING.value, request.kind.value)
            return Reply(True, {"state": "booting"})
        if request.kind is RequestKind.SNAPSHOT:
            return lambda: self._snapshot(vm, request)
        if request.kind is RequestKind.MIGRATE:
            return Reply(True, self._migration_request(vm, request))
        if request.kind is RequestKind.DEVICES:
            return Reply(True, {"devices": vm.device_list()})
        if request.kind is RequestKind.RATE_LIMIT:
            from kasou.vmm.ratelimits import set_rate_limit

            return Reply(True, set_rate_limit(vm, request.device, request.rates))
        if request.kind is RequestKind.BALLOON:
            if self.reclaim is None or request.target is None:
                return Reply(True, vm.balloon(request.target))
            # The user's target is the floor of reclaim's: the monitor sets the balloon.
            vm.balloon(None)  # refused without a balloon
            self.reclaim.set_user_target(request.target)
            return Reply(True, {**vm.balloon(None), "user_target": request.target})
        if request.kind is RequestKind.PAUSE:
            vm.pause()
        elif request.kind is RequestKind.RESUME:
            vm.resume()
        status = vm.status()
        status["boots"] = self.boots
        status["uptime"] = round(time.monotonic() - self.started, 3)
        status["agent"] = {"ready": self.agent.ready_ns is not None, "version": self.agent.version}
        if vm.config.vsock is not None:
            status["vsock"] = {
                "cid": vm.config.vsock.cid,
                "uds": str(vm.config.vsock.uds.absolute()),
            }
        if self.agent.ready_ns is not None:
            status["agent"]["ready_ns"] = self.agent.ready_ns  # CLOCK_MONOTONIC
        return Reply(True, status)

    def _await_end(self, vm: Vm, wait: float, pressed: dict[str, object]) -> Reply:
        """Wait (a worker thread) up to ``wait`` seconds for ``vm`` to end after a shutdown;
        the reply says how it ended, or has ``ending`` None if it has not. kasou may exit
        before this reply is sent: the client then sees its connection close."""
        from kasou.vmm.requests import Reply

        started = time.monotonic()
        ending = vm.wait(wait)
        result = {
            **pressed,
            "state": vm.state.value,
            "ending": None
            if ending is None
            else {"kind": ending.kind.value, "reason": ending.reason},
            "seconds": round(time.monotonic() - started, 3),
        }
        return Reply(True, result)

    def _snapshot(self, vm: Vm, request: Request) -> Reply:
        """Write a snapshot (a worker thread: the VM's event loop serves on meanwhile)."""
        from pathlib import Path

        from kasou.vmm.requests import Reply
        from kasou.vmm.snapshot import create_snapshot

        with self._lock:
            self.busy = "snapshot" if self.busy is None else self.busy
            if self.busy != "snapshot":
                raise LifecycleError(f"busy ({self.busy})", "idle", "snapshot")
        try:
            result = create_snapshot(
                vm,
                Path(request.path),
                diff=request.diff,
                stop=request.stop,
                extra=self.saved_sections,
                disks=request.disks,
            )
        finally:
            with self._lock:
                self.busy = None
        if request.stop:
            with self._lock:
                self.quit = self.quit or GuestExit(ExitKind.STOPPED, "stopped after a snapshot")
        return Reply(True, result)

    def saved_sections(self) -> dict[str, bytes]:
        """What a snapshot or migration keeps of this run beside the VM: the agent channel."""
        from kasou.persist import encode_state

        return {"agent": encode_state(self.agent.save())}

    def _migration_request(self, vm: Vm | None, request: Request) -> dict[str, object]:
        """Start a migration (it runs in a thread of its own), report it, or cancel it."""
        from kasou.errors import MigrationError
        from kasou.vmm.requests import RequestKind

        migration = self.migration
        if request.kind is RequestKind.MIGRATION:
            if migration is None:
                raise MigrationError("no migration has been started on this VM")
            progress: dict[str, object] = migration.progress()
            return progress
        if request.kind is RequestKind.MIGRATE_CANCEL:
            if migration is None or not migration.cancel():
                raise MigrationError("no migration is under way to cancel")
            cancelled: dict[str, object] = migration.progress()
            return cancelled
        from kasou.vmm.migration import Migration

        assert vm is not None
        with self._lock:
            if self.busy is not None:
                raise LifecycleError(f"busy ({self.busy})", "idle", "migrate")
            self.busy = "migration"
        try:
            migration = Migration(
                vm, request.url, downtime=request.downtime, extra=self.saved_sections
            )
        except BaseException:
            with self._lock:
                self.busy = None
            raise

        def finished() -> None:
            with self._lock:
                self.busy = None

        self.migration = migration
        migration.start(on_done=finished)
        started: dict[str, object] = migration.progress()
        return started

    def _limits(self, request: Request) -> dict[str, Any]:
        """Report the limits, pinning and usage; apply new values first if asked. A VM
        started without limits gets its ``Resources`` (and a cgroup, if a change needs one)
        now."""
        with self._lock:
            if self.resources is None:
                from kasou.resources import Resources

                assert self.config is not None
                config = self.config
                self.resources = Resources(config.name, vcpus=config.vcpus, memory=config.memory)
                if self.vm is not None:
                    self.resources.pin_vcpus(vcpu_threads(self.vm))
            resources = self.resources
        if not request.limits:
            return resources.report()
        return resources.change(request.limits)

    def _reclaim_request(self, request: Request) -> dict[str, Any]:
        """Report the reclaim policy and what it did; change the policy first if asked."""
        from kasou.errors import ConfigError

        if self.reclaim is None:
            raise ConfigError(
                "reclaim", "this VM has no reclaim policy: start it with --balloon --reclaim"
            )
        if request.reclaim:
            self.reclaim.update(request.reclaim)
        return self.reclaim.report()

    def _exec(self, request: Request) -> Reply:
        from kasou.vmm.requests import Reply

        result = self.agent.execute(request.argv, request.stdin.encode(), timeout=request.timeout)
        return Reply(
            True,
            {
                "status": result.status,
                "stdout": result.stdout.decode(errors="replace"),
                "stderr": result.stderr.decode(errors="replace"),
            },
        )


def run(
    config: VmConfig,
    *,
    on_boot: Callable[[Vm], None] | None = None,
    restore: MachineImage | None = None,
    before_start: Callable[[Vm], None] | None = None,
    host_memory: Callable[[], HostMemory] | None = None,
) -> GuestExit:
    """Run the VM until it ends for good; return how it ended (``.status`` is the exit
    status). Raises ``KasouError`` for anything that stops it from being built. With
    ``restore`` the first boot is the saved VM (a snapshot's); a guest reboot after it boots
    the kernel of its config afresh. ``before_start(vm)`` runs once the first VM is built,
    before its vCPUs start (an incoming migration's last handshake); ``on_boot(vm)`` after
    each start. ``host_memory`` replaces how ``--reclaim`` reads the host (/proc)."""
    install_kick_handler()
    guard = _start_seccomp(config)
    loop = EventLoop(
        f"kasou-{config.name}-events", on_start=None if guard is None else guard.hook("control")
    )
    agent = AgentChannel(loop)
    session = _Session(agent)
    console = Console(config.console, on_quit=lambda: session.stop("quit from the console"))
    server: ControlServer | None = None
    session.config = config
    previous = _install_stop_signals(session)
    try:
        if config.limits is not None:
            from kasou.resources import Resources

            # Before the VM is built: guest RAM is charged to the group.
            session.resources = Resources.open(
                config.name, config.limits, vcpus=config.vcpus, memory=config.memory
            )
        if guard is None:
            loop.start()
        elif (parked := guard.unpark("control")) is not None:
            loop.start(parked)  # a thread started ahead, its filter on (jail/seccomp.py)
        else:  # from the supervisor: the loop's chain gets its own listener (jail/seccomp.py)
            guard.spawn(loop.start)
        if config.api_sock is not None:
            from kasou.vmm.control import ControlServer  # json and sockets: only when asked

            server = ControlServer(config.api_sock, loop, session.handle)
        if config.reclaim is not None:
            from kasou.vmm.reclaim import ReclaimMonitor, read_host_memory

            session.reclaim = ReclaimMonitor(
                loop, config.reclaim, config.memory, host_memory or read_host_memory
            )
        while True:
            if restore is not None and os.environ.get("KASOU_TRACE_START"):
                # For bench/snapshot.py: restore to first KVM_RUN, on CLOCK_MONOTONIC.
                sys.stderr.write(f"kasou: restore begins at {time.monotonic_ns()}\n")
            vm = build_vm(config, console_output=console.write, agent=agent, restore=restore)
            restored, restore = restore, None
            session.boots += 1
            with session._lock:
                stopped = session.quit is not None
                session.vm = vm
            try:
                if stopped:
                    return session.quit or GuestExit(ExitKind.STOPPED, "stopped")
                console.attach(loop, vm.devices["serial0"])
                agent.attach(vm.devices["serial1"].enqueue_input)
                if restored is not None and "agent" in restored.sections:
                    from kasou.persist import decode_state
                    from kasou.vmm.agent import AgentState

                    saved = restored.sections["agent"]
                    agent.restore(decode_state(saved, AgentState, what="agent"))
                    restored = None
                if before_start is not None:
                    before_start(vm)
                    before_start = None
                if session.reclaim is not None:
                    session.reclaim.attach(vm.virtio()["balloon"].device)
                vm.start()
                if guard is not None:  # setup done: the main thread's list from here on
                    guard.enter("control")
                if session.resources is not None:  # each boot has new vCPU threads
                    session.resources.pin_vcpus(vcpu_threads(vm))
                if on_boot is not None:
                    on_boot(vm)
                ending = vm.wait()
                if session.migration is not None:
                    # A migration stops the VM just before it says "completed": let it end.
                    session.migration.join(REPORT_WAIT)
                if _migrated(session):
                    session.migration.reported.wait(REPORT_WAIT)
            finally:
                with session._lock:
                    session.vm = None
                if session.reclaim is not None:
                    session.reclaim.detach()
                agent.detach()
                vm.close()
            assert ending is not None
            if ending.kind is ExitKind.REBOOT and config.on_reboot == "restart":
                if session.quit is not None:
                    return session.quit
                log.info("the guest rebooted; booting again")
                continue
            return ending
    finally:
        _restore_signals(previous)
        if server is not None:
            server.close()
        loop.stop()
        console.close()
        if session.resources is not None:
            session.resources.close()  # kasou back in its old group, the group removed


def vcpu_threads(vm: Vm) -> dict[int, int]:
    """The kernel thread id of each started vCPU, by index (for pinning)."""
    threads = {}
    for vcpu in vm.vcpus:
        if vcpu.thread_id is not None:
            threads[vcpu.index] = vcpu.thread_id
    return threads


def _start_seccomp(config: VmConfig) -> Seccomp | None:
    """The seccomp supervisor when ``config.seccomp`` asks for filters and this is the main
    thread: the filters are the process's (the main thread takes the control list), so a
    library caller running VMs on other threads of its own process gets none."""
    if not config.seccomp or threading.current_thread() is not threading.main_thread():
        return None
    from kasou.jail.seccomp import Seccomp

    return Seccomp.start()


def _migrated(session: _Session) -> bool:
    """Whether the VM just ended because it migrated away."""
    migration = session.migration
    return migration is not None and migration.phase == "completed"


def _install_stop_signals(session: _Session) -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        session.stop(f"stopped by {signal.Signals(signum).name}")

    previous: dict[int, object] = {}
    for signum in _STOP_SIGNALS:
        previous[signum] = signal.signal(signum, on_signal)
    return previous


def _restore_signals(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


def print_crash(ending: GuestExit) -> None:
    """Tell the user how the guest crashed (stderr)."""
    where = f" on vCPU {ending.vcpu}" if ending.vcpu is not None else ""
    sys.stderr.write(f"kasou: the guest crashed{where}: {ending.reason}\n")
    if ending.report:
        sys.stderr.write(ending.report + "\n")
