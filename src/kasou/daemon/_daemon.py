"""The daemon: declared VMs, their lifecycle table, the supervisor, events and metrics.

Each declared VM has a record in the ``Store`` and, while its process runs, a ``VmProcess``.
Every change of state goes through ``_move``, which checks it against ``_TRANSITIONS``, saves
the record and appends an event; user actions that do not fit the state raise ``StateError``
naming the state they need. The VM's states (``kasou.spec.VmState``)::

    created ─start─> starting ─spawned─> running ─pause─> paused ─resume─> running
    running|paused ─stop|shutdown─> stopping ─(process ends)─> stopped
    running|paused ─(process ends by itself)─> stopped      status 0, no restart wanted
                                             > failed       an error, no restart (or a crash loop)
                                             > backoff ─retry─> starting   the restart policy
    stopped|failed|backoff ─start─> starting;  backoff ─stop─> stopped

The supervisor thread polls the pidfds of the running VMs (and a wake-up eventfd): a pidfd
that turns readable is a VM that ended, handled by the table above and the restart policy
(exponential backoff from 0.5 s, capped at 30 s; 5 restarts within 60 s end in FAILED,
counted across daemon restarts: their times are kept in the VM's record).
VMs are forked by the warm template (``_template``) in their own session, so they outlive
the daemon; ``Daemon.open`` re-attaches to those still running (``_process``).

Locking: one lock (``_lock``, with the condition ``_changed``) guards the table; no call to
a VM's control socket and no fork is made while holding it.

This module does not speak HTTP (``kasou.api``) and does not parse ``kasou run`` options
(``_specs`` turns a spec into them).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import enum
import logging
import os
import select
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kasou.client.control import ControlClient, RemoteError
from kasou.daemon._backups import Backups
from kasou.daemon._process import VmProcess, listens, read_status, readable
from kasou.daemon._specs import (
    boots_once_arrived,
    check_spec,
    console_option,
    memory_bytes,
    run_argv,
)
from kasou.daemon._store import SqliteStore, Store, VmRecord
from kasou.daemon._template import BOOTED, Template
from kasou.errors import (
    ConflictError,
    DaemonError,
    GuestError,
    HostError,
    KasouError,
    NotFoundError,
    StateError,
)
from kasou.spec import (
    DesiredState,
    Event,
    ExecRequest,
    ExecResult,
    Limits,
    RestartPolicy,
    VmInfo,
    VmSpec,
    VmState,
    VmUpdate,
)

__all__ = ["Daemon", "RestartTiming", "VmMetrics", "VmPaths"]

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_READY_TIMEOUT = 10.0  # a started VM's control socket answers within this, or it is late
_STOP_GRACE = 10.0  # after a stop request, before SIGKILL
_CONTROL_TIMEOUT = 5.0
_KILL_WAIT = 2.0  # a killed VM process is gone within this
_ENDING_WAIT = 2.0  # a VM whose control socket failed is seen ending within this, or runs
_ARRIVAL_POLL = 0.05  # between looks at a VM waiting for a migration: has it arrived?


@dataclasses.dataclass(frozen=True)
class VmPaths:
    """Where one VM's runtime files are: STATE/vms/NAME/..."""

    dir: Path
    api_sock: Path
    console_sock: Path
    console_log: Path
    stderr_log: Path

    @classmethod
    def under(cls, folder: Path) -> VmPaths:
        return cls(
            dir=folder,
            api_sock=folder / "api.sock",
            console_sock=folder / "console.sock",
            console_log=folder / "console.log",
            stderr_log=folder / "stderr.log",
        )

    @property
    def exit(self) -> Path:
        return self.dir / "exit"


@dataclasses.dataclass
class VmMetrics:
    """One running VM's resource use, for ``/metrics``. The device tables go device id ->
    direction (read/write, rx/tx, flush) -> count."""

    name: str
    pid: int
    cpu_seconds: float
    memory_rss: int
    memory_pss: int
    guest_memory: int
    restarts: int
    exits: dict[str, int] = dataclasses.field(default_factory=dict)
    # KVM's own exit counters by reason (kernel and user space; empty without binary stats)
    kvm_exits: dict[str, int] = dataclasses.field(default_factory=dict)
    disk_bytes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    disk_ops: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    net_bytes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    net_packets: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RestartTiming:
    """How a restart policy paces restarts: ``first`` seconds after the first crash, doubling
    up to ``cap``; ``limit`` restarts within ``window`` seconds, and the next crash is FAILED."""

    first: float = 0.5
    cap: float = 30.0
    limit: int = 5
    window: float = 60.0


class _Action(enum.Enum):
    """What moves a VM from one state to another: user actions and what the supervisor sees."""

    START = "start"
    SPAWNED = "spawned"
    SPAWN_FAILED = "spawn-failed"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    CANCEL = "cancel"  # a stop while waiting to restart
    ENDED = "ended"  # the process ended after a stop or shutdown
    EXITED = "exited"  # it ended by itself with status 0, no restart wanted
    CRASHED = "crashed"  # it ended by itself with an error, no restart (policy or limit)
    BACKOFF = "backoff"  # it ended by itself and the policy restarts it
    RETRY = "retry"  # the backoff delay is over
    DELETE = "delete"


_S = VmState
_LIVE = frozenset({_S.STARTING, _S.RUNNING, _S.PAUSED, _S.STOPPING})  # a process may exist
_AT_REST = frozenset({_S.CREATED, _S.STOPPED, _S.FAILED, _S.BACKOFF})
_ENDS_BY_ITSELF = frozenset({_S.STARTING, _S.RUNNING, _S.PAUSED})

# action -> (states it is allowed in, the state it leads to, the event kind it records)
_TRANSITIONS: dict[_Action, tuple[frozenset[VmState], VmState, str]] = {
    _Action.START: (_AT_REST, _S.STARTING, "started"),
    _Action.SPAWNED: (frozenset({_S.STARTING}), _S.RUNNING, "running"),
    _Action.SPAWN_FAILED: (frozenset({_S.STARTING, _S.STOPPING}), _S.FAILED, "failed"),
    _Action.PAUSE: (frozenset({_S.RUNNING}), _S.PAUSED, "paused"),
    _Action.RESUME: (frozenset({_S.PAUSED}), _S.RUNNING, "resumed"),
    _Action.STOP: (_LIVE, _S.STOPPING, "stopping"),
    _Action.SHUTDOWN: (frozenset({_S.RUNNING, _S.PAUSED}), _S.STOPPING, "shutting-down"),
    _Action.CANCEL: (frozenset({_S.BACKOFF}), _S.STOPPED, "stopped"),
    _Action.ENDED: (frozenset({_S.STOPPING}), _S.STOPPED, "stopped"),
    _Action.EXITED: (_ENDS_BY_ITSELF, _S.STOPPED, "stopped"),
    _Action.CRASHED: (_ENDS_BY_ITSELF, _S.FAILED, "failed"),
    _Action.BACKOFF: (_ENDS_BY_ITSELF, _S.BACKOFF, "backoff"),
    _Action.RETRY: (frozenset({_S.BACKOFF}), _S.STARTING, "restarted"),
    _Action.DELETE: (_AT_REST, _S.STOPPED, "deleted"),
}


def _wanted(states: frozenset[VmState]) -> str:
    return " or ".join(sorted(state.value for state in states))


@dataclasses.dataclass
class _Vm:
    """A declared VM in memory: its stored record and what only lives with the daemon."""

    record: VmRecord
    paths: VmPaths
    process: VmProcess | None = None


class Daemon:
    """The host daemon's core. Make one with ``Daemon.open``; every method is thread-safe."""

    def __init__(
        self, state_dir: Path, store: Store, template: Template, timing: RestartTiming
    ) -> None:
        self.state_dir = state_dir
        self._store = store
        self._template = template
        self._timing = timing
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._vms: dict[str, _Vm] = {}
        self._last_event = store.last_event_id()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing = False
        self._supervisor = threading.Thread(
            target=self._supervise, name="kasoud-supervisor", daemon=True
        )
        self.backups = Backups(self)

    # --- opening and closing -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: Path,
        store: Store | None = None,
        *,
        timing: RestartTiming | None = None,
    ) -> Daemon:
        """Open the daemon on ``state_dir`` (made if missing): start the warm template and
        re-attach to the VM processes a previous daemon left running."""
        state_dir = Path(state_dir)
        try:
            (state_dir / "vms").mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise HostError(f"cannot make the state folder {state_dir}: {error}") from error
        _become_subreaper()
        store = store if store is not None else SqliteStore(state_dir / "kasou.db")
        template = Template(state_dir / "template.log")
        template.start()
        daemon = cls(state_dir, store, template, timing or RestartTiming())
        with daemon._lock:
            daemon._reattach()
        daemon._supervisor.start()
        daemon.backups.start()
        return daemon

    def _reattach(self) -> None:
        for record in self._store.list():
            vm = _Vm(record, VmPaths.under(self.state_dir / "vms" / record.name))
            self._vms[record.name] = vm
            if record.pid is None:
                if record.state in _ENDS_BY_ITSELF or record.state is _S.STOPPING:
                    self._on_end(vm, None, "the daemon ended while it was starting")
                continue
            process = VmProcess.attach(record.pid, record.pid_start, vm.paths.exit)
            if process is not None and not process.ended():
                vm.process = process
                self._event(record.name, "reattached", record.state, f"pid {record.pid}")
                self._watch_arrival(vm)
                continue
            if process is not None:  # ended, not yet reaped: its status may be ours to take
                status, how = process.collect()
            else:
                status = read_status(vm.paths.exit)
                how = f"status {status}" if status is not None else "killed"
            self._on_end(vm, status, f"ended while the daemon was away ({how})")

    def close(self, stop_vms: bool = False) -> None:
        """Stop watching; the VMs run on (for the next daemon to re-attach) unless
        ``stop_vms``."""
        self.backups.close()
        if stop_vms:
            self._stop_all(deadline=_STOP_GRACE, shutdown_first=False)
        with self._lock:
            self._closing = True
        os.eventfd_write(self._wake, 1)
        if self._supervisor.is_alive():
            self._supervisor.join()
        self._template.close()
        with self._lock:
            for vm in self._vms.values():
                if vm.process is not None:
                    vm.process.close()
                    vm.process = None
        os.close(self._wake)
        self._store.close()

    def host_shutdown(self, deadline: float = 30.0) -> None:
        """Stop every VM within ``deadline`` seconds: VMs with ACPI are asked to power off
        (the power button) and stopped if they have not near the deadline; the others are
        stopped at once; what is left at the deadline is killed."""
        self._stop_all(deadline=deadline, shutdown_first=True)

    def _stop_all(self, deadline: float, shutdown_first: bool) -> None:
        until = time.monotonic() + deadline
        # The last moments before the deadline: for a stop request to end a guest that
        # ignored the button, then for SIGKILL to end one that ignored the stop.
        stop_margin = min(5.0, deadline / 4)
        kill_margin = min(1.0, deadline / 10)
        with self._lock:
            for vm in self._vms.values():
                if vm.record.state is _S.BACKOFF:
                    self._move(vm, _Action.CANCEL, "host shutdown")
            live = [vm for vm in self._vms.values() if vm.record.state in _LIVE]
            soft = [
                vm
                for vm in live
                if shutdown_first and vm.record.spec.acpi and vm.record.state is not _S.STOPPING
            ]
            for vm in soft:
                # desired stays as it was: a host shutdown is not the user's stop.
                if vm.record.state in (_S.RUNNING, _S.PAUSED):
                    self._move(vm, _Action.SHUTDOWN, "host shutdown")  # --shutdown--> stopping
        # Control calls go out side by side: one VM slow to answer must not spend the others'
        # time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(live), 32))) as pool:
            soft_set = {id(vm) for vm in soft}
            list(pool.map(lambda vm: self._control(vm, "shutdown", wait=0), soft))
            list(pool.map(self._stop_now, [vm for vm in live if id(vm) not in soft_set]))
            self._await_end(soft, until - stop_margin)
            list(pool.map(self._stop_now, soft))
        if not self._await_end(live, until - kill_margin):
            with self._lock:
                for vm in live:
                    if vm.process is not None:
                        vm.process.signal(signal.SIGKILL)
            # SIGKILL ends a process within milliseconds; its end is seen by the supervisor.
            self._await_end(live, until + _KILL_WAIT)

    def _stop_now(self, vm: _Vm) -> None:
        """Part of ``_stop_all``: move a live VM to stopping and send it the stop request."""
        with self._lock:
            if vm.record.state in _LIVE and vm.record.state is not _S.STOPPING:
                self._move(vm, _Action.STOP, "host shutdown")  # --stop--> stopping
            elif vm.record.state is not _S.STOPPING:
                return
        self._control(vm, "stop")

    # --- the table ------------------------------------------------------------------------

    def create(self, spec: VmSpec, start: bool = False) -> VmInfo:
        """Declare a VM (``ConflictError`` if the name is taken, ``SpecError`` if it cannot
        run here); start it too when ``start``."""
        check_spec(spec)
        with self._lock:
            if spec.name in self._vms:
                raise ConflictError(f"a VM named {spec.name!r} exists: pick another name")
            paths = VmPaths.under(self.state_dir / "vms" / spec.name)
            try:
                paths.dir.mkdir(mode=0o700, exist_ok=True)
            except OSError as error:
                raise HostError(f"cannot make {paths.dir}: {error}") from error
            vm = _Vm(VmRecord(spec=spec), paths)
            self._vms[spec.name] = vm
            self._store.put(vm.record)
            restored = f"from snapshot {spec.restore}" if spec.restore else ""
            self._event(spec.name, "created", _S.CREATED, restored)
        if start:
            return self.start(spec.name)
        return vm.record.info()

    def list(self, labels: dict[str, str] | None = None) -> builtins.list[VmInfo]:
        """The declared VMs, by name; only those carrying every one of ``labels``."""
        wanted = labels or {}
        with self._lock:
            return [
                vm.record.info()
                for name, vm in sorted(self._vms.items())
                if all(vm.record.spec.labels.get(k) == v for k, v in wanted.items())
            ]

    def get(self, name: str) -> VmInfo:
        with self._lock:
            return self._vm(name).record.info()

    def paths(self, name: str) -> VmPaths:
        with self._lock:
            return self._vm(name).paths

    def update(self, name: str, update: VmUpdate) -> VmInfo:
        """Change a VM's declaration; boot settings count from its next start, limits also
        apply at once to a running VM."""
        changes = update.model_dump(exclude_none=True)
        with self._lock:
            vm = self._vm(name)
            spec = VmSpec.model_validate({**vm.record.spec.model_dump(), **changes})
            check_spec(spec)
            vm.record.spec = spec
            self._store.put(vm.record)
            self._event(name, "updated", vm.record.state, ", ".join(sorted(changes)))
            live = vm.record.state in (_S.RUNNING, _S.PAUSED)
        if live and update.limits is not None:
            self.request(name, "limits", **_limit_words(update.limits))
        return self.get(name)

    def delete(self, name: str, force: bool = False) -> None:
        """Forget a VM and its folder. A VM whose process runs needs ``force`` (it is
        stopped first)."""
        with self._lock:
            vm = self._vm(name)
            if vm.record.state in _LIVE and not force:
                raise StateError(
                    name, vm.record.state.value, "delete", f"{_wanted(_AT_REST)} (or use force)"
                )
        if force:
            self._stop(name, kill=True)
        with self._lock:
            vm = self._vm(name)
            self._check(vm, _Action.DELETE)
            del self._vms[name]
            self._store.delete(name)
            self._event(name, "deleted", None)
        shutil.rmtree(vm.paths.dir, ignore_errors=True)

    def replace_spec(self, name: str, spec: VmSpec, why: str) -> VmInfo:
        """Declare ``name`` anew as ``spec`` (same name; a restored backup): the VM must be
        at rest."""
        check_spec(spec)
        with self._lock:
            vm = self._vm(name)
            if vm.record.state not in _AT_REST or spec.name != name:
                raise StateError(name, vm.record.state.value, "re-declare", _wanted(_AT_REST))
            vm.record.spec = spec
            self._store.put(vm.record)
            self._event(name, "updated", vm.record.state, why)
            return vm.record.info()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, name: str) -> VmInfo:
        """Start a VM's process; return once it is built and its control socket answers
        (or it ended)."""
        with self._lock:
            vm = self._vm(name)
            self._check(vm, _Action.START)
            vm.record.desired = DesiredState.RUNNING
            vm.record.restarts = 0
            vm.record.recent_restarts.clear()
            self._move(vm, _Action.START)  # saved with the fields above: one write
        # The VM says on this pipe when its vCPUs run (Template.spawn): waiting for that
        # costs the VM nothing, where asking its control socket while it builds would take
        # a CPU and its interpreter's lock from it (measured: ~1 ms of its start here).
        booted, booted_writer = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self._spawn(vm, booted_writer)
            finally:
                os.close(booted_writer)
            self._await_ready(vm, booted)
        finally:
            os.close(booted)
        if vm.record.spec.incoming is not None:
            self._ended_before_listening(vm)
        return self.get(name)

    def stop(self, name: str) -> VmInfo:
        """Stop a VM at once (its process ends; the guest is not asked)."""
        return self._stop(name, kill=False)

    def _stop(self, name: str, kill: bool) -> VmInfo:
        with self._lock:
            vm = self._vm(name)
            process = vm.process
        if process is not None:
            # Arrived a moment ago, and not yet seen so: the next start boots from the spec.
            self._note_arrival(vm, process)
        with self._lock:
            vm = self._vm(name)
            vm.record.desired = DesiredState.STOPPED
            if vm.record.state is _S.BACKOFF:
                self._move(vm, _Action.CANCEL)  # backoff --stop--> stopped
                return vm.record.info()
            if kill and vm.record.state not in _LIVE:
                self._store.put(vm.record)
                return vm.record.info()
            if vm.record.state is not _S.STOPPING:
                self._move(vm, _Action.STOP)  # running|paused|starting --stop--> stopping
            else:
                self._store.put(vm.record)
        if kill:
            with self._lock:
                if vm.process is not None:
                    vm.process.signal(signal.SIGKILL)
        else:
            self._control(vm, "stop")
        if not self._await_end([vm], time.monotonic() + _STOP_GRACE):
            with self._lock:
                if vm.process is not None:
                    vm.process.signal(signal.SIGKILL)
            self._await_end([vm], time.monotonic() + _STOP_GRACE)
        return vm.record.info()

    def shutdown(self, name: str, timeout: float = 30.0) -> VmInfo:
        """Ask the guest to power off (ACPI); stop it if it has not within ``timeout``."""
        with self._lock:
            vm = self._vm(name)
            self._check(vm, _Action.SHUTDOWN)
            if not vm.record.spec.acpi:
                acpi = False
            else:
                acpi = True
                vm.record.desired = DesiredState.STOPPED
                self._move(vm, _Action.SHUTDOWN)  # running|paused --shutdown--> stopping
        if not acpi:
            return self.stop(name)
        self._control(vm, "shutdown", wait=0)
        if not self._await_end([vm], time.monotonic() + timeout):
            return self.stop(name)
        return vm.record.info()

    def pause(self, name: str) -> VmInfo:
        return self._pause_resume(name, _Action.PAUSE)

    def resume(self, name: str) -> VmInfo:
        return self._pause_resume(name, _Action.RESUME)

    def _pause_resume(self, name: str, action: _Action) -> VmInfo:
        with self._lock:
            vm = self._vm(name)
            self._check(vm, action)
        self._request(vm, action.value)
        with self._lock:
            if vm.record.state in _TRANSITIONS[action][0]:
                self._move(vm, action)  # running --pause--> paused, paused --resume--> running
            return vm.record.info()

    def restart(self, name: str) -> VmInfo:
        """Stop a VM whose process runs, then start it."""
        with self._lock:
            state = self._vm(name).record.state
        if state in _LIVE:
            self.stop(name)
        return self.start(name)

    # --- requests to a running VM -----------------------------------------------------------

    def exec(self, name: str, request: ExecRequest) -> ExecResult:
        """Run a command in the guest through its agent (the default guest has one)."""
        vm = self._running(name, "exec")
        try:
            with ControlClient(vm.paths.api_sock, timeout=request.timeout + 15) as client:
                reply = client.execute(request.argv, request.stdin, request.timeout)
        except RemoteError as error:
            raise GuestError(f"{name}: exec failed: {error}") from error
        except (HostError, OSError):
            self._raise_if_ending(vm, "exec")
            raise
        return ExecResult(
            exit_code=int(reply.get("status", -1)),
            stdout=str(reply.get("stdout", "")),
            stderr=str(reply.get("stderr", "")),
        )

    def request(self, name: str, kind: str, **args: Any) -> dict[str, Any]:
        """Pass a control-socket request (``status``, ``limits``, ``balloon``, ``devices``,
        ``rate-limit``, ``snapshot``, ...) to a running VM; the lifecycle ones go through the
        daemon's table."""
        lifecycle = {
            "pause": self.pause,
            "resume": self.resume,
            "stop": self.stop,
            "shutdown": self.shutdown,
        }
        if kind in lifecycle:
            return lifecycle[kind](name).model_dump(mode="json")
        return self._request(self._running(name, kind), kind, **args)

    def snapshot(self, name: str, path: str) -> dict[str, Any]:
        """Write a snapshot of the running VM into folder ``path`` (what ``kasou run
        --restore`` and a spec's ``restore`` take); the event log keeps it."""
        vm = self._running(name, "snapshot")
        answer = self._request(vm, "snapshot", path=path)
        self._event(name, "snapshot", vm.record.state, path)
        return answer

    def migrate(
        self,
        name: str,
        url: str,
        downtime: float = 0.3,
        progress: Callable[[float], None] | None = None,
    ) -> dict[str, Any]:
        """Send the running VM to ``url`` (a ``kasou run --incoming``, or a VM declared with
        ``incoming``) and wait for the end; ``progress`` gets the share of memory sent. After
        a completed migration the VM here is STOPPED; otherwise it runs on."""
        vm = self._running(name, "migrate")
        with self._lock:
            desired = vm.record.desired
            # The process ends by itself once the VM runs at the destination: as asked.
            vm.record.desired = DesiredState.STOPPED
            self._store.put(vm.record)
        state: dict[str, Any] = {"phase": "starting", "error": None}
        try:
            self._request(vm, "migrate", url=url, downtime=downtime)
            self._event(name, "migrating", vm.record.state, url)
            while state.get("phase") not in ("completed", "failed", "cancelled"):
                with self._changed:  # between polls, woken early when the process ends
                    self._changed.wait(0.1)
                try:
                    state = self._request(vm, "migration")
                except (KasouError, OSError) as error:
                    if self._await_end([vm], time.monotonic() + _STOP_GRACE) and (
                        vm.record.exit_status == 0
                    ):
                        state = {"phase": "completed", "url": url, "error": None}
                    else:
                        state = {"phase": "failed", "error": str(error)}
                    break
                if progress is not None and state.get("memory"):
                    sent = int(state.get("pages_sent", 0)) * 4096 / int(state["memory"])
                    progress(min(0.99, sent))
        finally:
            if state.get("phase") != "completed":
                with self._lock:
                    vm.record.desired = desired
                    self._store.put(vm.record)
        if state.get("phase") != "completed":
            self._event(name, "migration-failed", vm.record.state, str(state.get("error")))
            raise GuestError(f"{name}: migration to {url} {state.get('phase')}: {state['error']}")
        self._await_end([vm], time.monotonic() + _STOP_GRACE)
        self._event(name, "migrated", vm.record.state, url)
        return state

    def _running(self, name: str, action: str) -> _Vm:
        with self._lock:
            vm = self._vm(name)
            if vm.record.state not in (_S.RUNNING, _S.PAUSED) or vm.process is None:
                raise StateError(name, vm.record.state.value, action, "running or paused")
            return vm

    def _request(self, vm: _Vm, kind: str, **args: Any) -> dict[str, Any]:
        timeout = 3600.0 if kind == "snapshot" else 15.0
        try:
            with ControlClient(vm.paths.api_sock, timeout=timeout) as client:
                return client.request(kind, **args)
        except RemoteError as error:
            if error.type == "LifecycleError":
                raise StateError(vm.record.name, vm.record.state.value, kind, str(error)) from None
            if error.type == "ConfigError":
                raise DaemonError(f"{vm.record.name}: {kind}: {error}") from error
            raise GuestError(f"{vm.record.name}: {kind}: {error}") from error
        except (HostError, OSError) as error:
            self._raise_if_ending(vm, kind)
            raise HostError(f"{vm.record.name}: {kind}: {error}") from error

    def _raise_if_ending(self, vm: _Vm, action: str) -> None:
        """After a failed call to ``vm``'s control socket: if the VM's process is ending,
        raise ``StateError`` once the supervisor has seen the end, so the caller learns the
        state the VM moved to rather than a socket error. A process that is killed resets
        the connection (or leaves a socket nobody listens on) a moment before its pidfd
        turns readable, so the end is awaited briefly; if the VM still runs, the error is
        the caller's to raise."""
        self._await_end_seen(vm, time.monotonic() + _ENDING_WAIT)
        with self._lock:
            state = vm.record.state
        if state in (_S.RUNNING, _S.PAUSED):
            return
        raise StateError(vm.record.name, state.value, action, "running or paused") from None

    def _await_end_seen(self, vm: _Vm, until: float) -> None:
        with self._changed:
            self._changed.wait_for(
                lambda: vm.process is None and vm.record.state not in (_S.RUNNING, _S.PAUSED),
                max(0.0, until - time.monotonic()),
            )

    def _control(self, vm: _Vm, kind: str, **args: Any) -> bool:
        """Best effort: a stop or shutdown to a VM that may be ending anyway."""
        try:
            with ControlClient(vm.paths.api_sock, timeout=_CONTROL_TIMEOUT) as client:
                client.request(kind, **args)
        except (KasouError, OSError, ValueError) as error:
            log.debug("%s: %s: %s", vm.record.name, kind, error)
            if kind == "stop":
                with self._lock:
                    if vm.process is not None:
                        # One still waiting for a migration has no control socket yet: SIGTERM
                        # ends it cleanly, its listening socket removed.
                        waiting = vm.record.spec.incoming is not None
                        vm.process.signal(signal.SIGTERM if waiting else signal.SIGKILL)
            return False
        return True

    # --- events ---------------------------------------------------------------------------

    def events(
        self, since: int = 0, vm: str | None = None, limit: int = 1000
    ) -> builtins.list[Event]:
        return self._store.events(since, vm, limit)

    def wait_events(self, since: int, timeout: float) -> builtins.list[Event]:
        """Events after ``since``, waiting up to ``timeout`` seconds for the first one."""
        with self._changed:
            self._changed.wait_for(lambda: self._last_event > since or self._closing, timeout)
        return self._store.events(since)

    def _event(self, vm: str | None, kind: str, state: VmState | None, message: str = "") -> None:
        event = self._store.append_event(vm, kind, state, message)
        with self._changed:
            self._last_event = max(self._last_event, event.id)
            self._changed.notify_all()

    # --- metrics --------------------------------------------------------------------------

    def metrics(self) -> builtins.list[VmMetrics]:
        """The resource use of each VM whose process runs."""
        with self._lock:
            running = [
                (vm, vm.process.pid)
                for vm in self._vms.values()
                if vm.process is not None and vm.record.state in (_S.RUNNING, _S.PAUSED)
            ]
        samples = []
        for vm, pid in running:
            sample = _process_metrics(vm, pid)
            if sample is None:
                continue  # it ended meanwhile
            _add_vm_figures(vm, sample)
            samples.append(sample)
        return samples

    # --- inside ---------------------------------------------------------------------------

    def _vm(self, name: str) -> _Vm:
        vm = self._vms.get(name)
        if vm is None:
            raise NotFoundError(f"no VM named {name!r}: see the list of VMs")
        return vm

    def _check(self, vm: _Vm, action: _Action) -> None:
        allowed = _TRANSITIONS[action][0]
        if vm.record.state not in allowed:
            raise StateError(vm.record.name, vm.record.state.value, action.value, _wanted(allowed))

    def _move(self, vm: _Vm, action: _Action, message: str = "") -> None:
        """The one place a VM changes state: check the table, save, record the event."""
        self._check(vm, action)
        _, state, kind = _TRANSITIONS[action]
        vm.record.state = state
        if state is not _S.BACKOFF:
            vm.record.backoff_until = None
        if message or state in (_S.STARTING, _S.RUNNING):
            vm.record.message = message
        self._store.put(vm.record)
        self._event(vm.record.name, kind, state, message)
        self._changed.notify_all()

    def _spawn(self, vm: _Vm, booted: int | None = None) -> None:
        """Fork the VM's process (state STARTING) and watch it; the VM gets ``booted``
        (``Template.spawn``). Runs without the lock."""
        name = vm.record.name
        with self._lock:
            spec, paths = vm.record.spec, vm.paths
            for stale in (paths.exit, paths.dir / "exit.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        argv = run_argv(spec, paths.api_sock, console_option(paths.console_sock, paths.console_log))
        try:
            pid = self._template.spawn(argv, paths.dir, booted)
        except KasouError as error:
            with self._lock:
                self._move(vm, _Action.SPAWN_FAILED, str(error))
            return
        process = VmProcess.attach(pid, None, paths.exit)
        with self._lock:
            vm.record.pid = pid
            vm.record.pid_start = process.ticks if process is not None else None
            vm.record.started_at = time.time()
            vm.record.exit_status = None
            if process is None:  # gone already, and reaped by someone else
                self._on_end(vm, read_status(paths.exit), "ended at once")
                return
            vm.process = process
            if vm.record.state is _S.STARTING:
                self._move(vm, _Action.SPAWNED, f"pid {pid}")  # starting --spawned--> running
            else:  # stopped while it was being forked
                self._store.put(vm.record)
                process.signal(signal.SIGKILL)
        os.eventfd_write(self._wake, 1)
        log.debug("%s: started as pid %d", name, pid)
        self._watch_arrival(vm)

    def _await_ready(self, vm: _Vm, booted: int) -> None:
        """Wait until the VM's control socket reports it built, its process ends, or it is
        late. The wait begins on the pipe ``booted`` (``Template.spawn``): a VM that says it
        booted is ready; one that closed it without a word (jailed, waiting for a migration)
        or ended is looked at as before."""
        deadline = time.monotonic() + _READY_TIMEOUT
        with self._lock:
            spawned = vm.process is not None
        if spawned and readable(booted, _READY_TIMEOUT):
            with contextlib.suppress(OSError):
                if os.read(booted, len(BOOTED)) == BOOTED:
                    return  # built (its control socket listened before), its vCPUs run
        while time.monotonic() < deadline:
            with self._lock:
                process = vm.process
                if process is None or vm.record.state is not _S.RUNNING:
                    return
                incoming = vm.record.spec.incoming
            if process.ended():
                return
            if incoming is not None:
                # Its control socket comes with the VM, when a migration arrives; it is ready
                # for the sender once it listens.
                if listens(process.pid, incoming):
                    return
                with self._changed:
                    self._changed.wait(0.002)
                continue
            try:
                with ControlClient(vm.paths.api_sock, timeout=_CONTROL_TIMEOUT) as client:
                    # "booting": the socket is up, the VM not yet built (a pause would
                    # find nothing to pause).
                    if client.request("status").get("state") != "booting":
                        return
            except (KasouError, OSError, ValueError):
                pass  # not listening yet
            # kasou run makes its socket a few ms in: poll, woken early by any change.
            with self._changed:
                self._changed.wait(0.002)

    def _watch_arrival(self, vm: _Vm) -> None:
        """For a VM that waits for a migration and carries its boot fields: a thread that
        drops ``incoming`` from its spec once it has arrived (``_note_arrival``)."""
        with self._lock:
            process = vm.process
            if process is None or not boots_once_arrived(vm.record.spec):
                return
        threading.Thread(
            target=self._await_arrival,
            args=(vm, process),
            name=f"kasoud-arrival-{vm.record.name}",
            daemon=True,
        ).start()

    def _await_arrival(self, vm: _Vm, process: VmProcess) -> None:
        # A wait of hours costs a stat of the control socket's path per look.
        while not self._note_arrival(vm, process):
            with self._changed:
                if self._closing or vm.process is not process:
                    return
                self._changed.wait(_ARRIVAL_POLL)

    def _note_arrival(self, vm: _Vm, process: VmProcess) -> bool:
        """If ``process`` (``vm``'s, waiting for a migration) runs the VM that arrived, drop
        ``incoming`` from the spec, so a restart, a stop and start or the restart policy
        boot it from its boot fields like any VM. True once there is nothing more to wait
        for (it arrived, ended, or the spec no longer waits)."""
        with self._lock:
            if vm.process is not process or not boots_once_arrived(vm.record.spec):
                return True
        if not vm.paths.api_sock.exists():  # the control socket comes with the VM
            return False
        try:
            with ControlClient(vm.paths.api_sock, timeout=_CONTROL_TIMEOUT) as client:
                state = client.request("status").get("state")
        except (KasouError, OSError, ValueError):
            return False
        # Its vCPUs run (or were paused since): they start on the source's GO, and the source
        # gives its VM up once this side's RUNNING reaches it (kasou.vmm.migration). Before
        # GO the status is "booting" (arriving) or "created" (built). A link lost in the
        # round trip between RUNNING and DONE stops this copy with an error after it was
        # seen arriving: rare, and the one case where its restart policy boots it anew.
        if state not in ("running", "paused"):
            return False
        with self._lock:
            if vm.process is process and boots_once_arrived(vm.record.spec):
                vm.record.spec = vm.record.spec.model_copy(
                    update={"incoming": None, "boot_after_arrival": False}
                )
                self._store.put(vm.record)
                self._event(
                    vm.record.name,
                    "arrived",
                    vm.record.state,
                    "arrived; later starts boot from the spec",
                )
        return True

    def _ended_before_listening(self, vm: _Vm) -> None:
        """If a VM that was to wait for a migration ended first (it could not listen): once
        the supervisor has seen the end, its record says why in ``kasou run``'s own words
        (the last line of its stderr)."""
        with self._lock:
            if vm.process is not None and not vm.process.ended():
                return  # it listens (or is late, and the sender will say so)
        self._await_end_seen(vm, time.monotonic() + _ENDING_WAIT)
        try:
            lines = vm.paths.stderr_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return
        with self._lock:
            if lines and vm.process is None:
                vm.record.message = f"{vm.record.message}: {lines[-1][:300]}".lstrip(": ")
                self._store.put(vm.record)

    def _await_end(self, vms: builtins.list[_Vm], until: float) -> bool:
        """Wait until none of ``vms`` has a live process; False at ``until``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: all(vm.record.state not in _LIVE for vm in vms),
                max(0.0, until - time.monotonic()),
            )

    def _on_end(self, vm: _Vm, status: int | None, why: str) -> None:
        """The VM's process ended (with the lock held): apply the table and the policy."""
        record = vm.record
        if vm.process is not None:
            vm.process.close()
            vm.process = None
        record.pid = None
        record.pid_start = None
        record.exit_status = status
        for sock in (vm.paths.api_sock, vm.paths.console_sock):
            with contextlib.suppress(OSError):
                sock.unlink()  # left by a VM that was killed
        action, message = self._after_end(vm, status, why)
        # The "exited" event carries the state the VM moves to, like the move's own event.
        self._event(record.name, "exited", _TRANSITIONS[action][1], why)
        self._move(vm, action, message)

    def _after_end(self, vm: _Vm, status: int | None, why: str) -> tuple[_Action, str]:
        """Where a VM whose process ended goes (with the lock held): the table and the
        restart policy decide; the backoff delay is set on the record."""
        record = vm.record
        if record.state is _S.STOPPING:
            return _Action.ENDED, ""  # stopping --ended--> stopped
        failed = status != 0
        policy = record.spec.restart
        again = policy is RestartPolicy.ALWAYS or (policy is RestartPolicy.ON_FAILURE and failed)
        if not again or record.desired is not DesiredState.RUNNING:
            # running --exited--> stopped, or running --crashed--> failed
            return (_Action.CRASHED if failed else _Action.EXITED), why
        # Wall-clock times, kept in the record: the count survives a daemon restart.
        now = time.time()
        timing = self._timing
        recent = [t for t in record.recent_restarts if now - timing.window <= t <= now]
        record.recent_restarts = recent
        if len(recent) >= timing.limit:
            return (
                _Action.CRASHED,
                f"{why}; restarted {len(recent)} times in {timing.window:g} s: "
                "left failed (a crash loop); fix it and start it again",
            )
        delay = min(timing.first * 2 ** len(recent), timing.cap)
        record.backoff_until = now + delay
        return _Action.BACKOFF, f"{why}; restarting in {delay:g} s"

    def _supervise(self) -> None:
        """The supervisor thread: see VM processes end, restart VMs whose backoff is over."""
        while not self._closing:
            try:
                self._supervise_once()
            except Exception:  # a bug here must not leave every VM unwatched
                log.exception("the supervisor's round failed; it goes on")

    def _supervise_once(self) -> None:
        """Wait for a VM to end, a backoff to be over or a wake-up; handle what happened."""
        with self._lock:
            if self._closing:
                return
            watched = {
                vm.process.fileno(): vm for vm in self._vms.values() if vm.process is not None
            }
            due = [
                vm.record.backoff_until
                for vm in self._vms.values()
                if vm.record.state is _S.BACKOFF and vm.record.backoff_until is not None
            ]
        timeout = max(0.0, min(due) - time.time()) if due else None
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        for fd in watched:
            poller.register(fd, select.POLLIN)
        ready = poller.poll(None if timeout is None else timeout * 1000 + 1)
        for fd, _ in ready:
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                continue
            vm = watched[fd]
            with self._lock:
                if vm.process is None or vm.process.fileno() != fd:
                    continue
                status, why = vm.process.collect()
                vm.process = None
                self._on_end(vm, status, why)
        self._retry_due()

    def _retry_due(self) -> None:
        now = time.time()
        with self._lock:
            due = [
                vm
                for vm in self._vms.values()
                if vm.record.state is _S.BACKOFF
                and vm.record.backoff_until is not None
                and vm.record.backoff_until <= now
            ]
            for vm in due:
                vm.record.restarts += 1
                vm.record.recent_restarts.append(now)
                self._move(vm, _Action.RETRY, f"restart {vm.record.restarts}")
        for vm in due:
            try:
                self._spawn(vm)
            except KasouError as error:  # the supervisor must outlive any one VM
                log.warning("%s: restart failed: %s", vm.record.name, error)


def _limit_words(limits: Limits) -> dict[str, Any]:
    """The ``limits`` request's fields for ``limits`` (those given; pinning as "0=2,1=3")."""
    words = limits.model_dump(exclude_none=True)
    if limits.cpu_pin is not None:
        words["cpu_pin"] = ",".join(f"{v}={c}" for v, c in sorted(limits.cpu_pin.items()))
    return words


def _become_subreaper() -> None:
    """Make the daemon a child subreaper (prctl(2)): the VMs it forks through the template
    are re-parented to it, so it reaps them (and sees how they ended) rather than init."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s", os.strerror(ctypes.get_errno()))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_metrics(vm: _Vm, pid: int) -> VmMetrics | None:
    """CPU time (all threads: utime + stime, proc(5) fields 14 and 15) and memory
    (smaps_rollup) of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as rollup:
            memory = {
                line.split()[0].rstrip(":"): int(line.split()[1]) * 1024
                for line in rollup
                if line.split()[-1:] == ["kB"]
            }
    except (OSError, IndexError, ValueError):
        return None
    return VmMetrics(
        name=vm.record.name,
        pid=pid,
        cpu_seconds=(int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
        memory_rss=memory.get("Rss", 0),
        memory_pss=memory.get("Pss", 0),
        guest_memory=memory_bytes(vm.record.spec.memory),
        restarts=vm.record.restarts,
    )


def _add_vm_figures(vm: _Vm, sample: VmMetrics) -> None:
    """Exits (kasou's and KVM's) from the ``status`` request, device counters from
    ``devices``: best effort."""
    try:
        with ControlClient(vm.paths.api_sock, timeout=1.0) as client:
            status = client.request("status")
            devices = client.request("devices").get("devices", [])
    except (KasouError, OSError, ValueError):
        return
    exits = status.get("exits_by_reason", status.get("exits"))
    if isinstance(exits, int):
        sample.exits["all"] = exits
    elif isinstance(exits, dict):
        sample.exits.update({str(k): v for k, v in exits.items() if isinstance(v, int)})
    kvm_exits = status.get("kvm_exits")
    if isinstance(kvm_exits, dict):
        sample.kvm_exits.update({str(k): v for k, v in kvm_exits.items() if isinstance(v, int)})
    for device in devices if isinstance(devices, builtins.list) else []:
        counters = device.get("counters") or {}
        key = str(device.get("id"))
        if device.get("type") == "block":
            sample.disk_bytes[key] = _pick(counters, read="read_bytes", write="write_bytes")
            sample.disk_ops[key] = _pick(counters, read="reads", write="writes", flush="flushes")
        elif device.get("type") == "net":
            sample.net_bytes[key] = _pick(counters, rx="rx_bytes", tx="tx_bytes")
            sample.net_packets[key] = _pick(counters, rx="rx_packets", tx="tx_packets")


def _pick(counters: dict[str, Any], **names: str) -> dict[str, int]:
    """``label -> counters[field]`` for each ``label=field`` whose value is a number (the
    VM's reply is checked, not trusted)."""
    return {
        label: counters[field]
        for label, field in names.items()
        if isinstance(counters.get(field), int)
    }
