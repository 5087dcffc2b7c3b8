"""seccomp-bpf allow-lists, one per thread role, and the reporter of forbidden calls.

This module owns the lists (``syscalls/*.txt``: data, recorded from what kasou's threads
really call by ``tests/tools/seccomp_record.py``), their compilation into BPF through
libseccomp (pyseccomp), their installation on each thread (seccomp(2)) and the report when a
thread makes a call outside its list. It does not decide which thread has which role: the
VMM passes ``hook(role)`` to the threads it starts (an ``on_start`` callable run first on the
thread) and calls ``enter("control")`` on its main thread.

Roles
-----
``vcpu`` (threads in KVM_RUN and the exits handled there), ``device`` (the virtio event
loops), ``control`` (the main thread, the runner's event loop: console, control socket,
agent, and the workers it spawns: snapshots, migration). Every list also holds ``base.txt``:
what any Python thread may call at any moment (signal return, allocator, locks, exit).

Order of installation, and why
------------------------------
A filter applies to the thread that installs it and to every thread that thread creates
afterwards; filters stack (a call passes only if every filter in the chain allows it), and
the kernel allows one notification listener per chain (``EBUSY`` otherwise; seccomp_unotify(2)).
Each role thread needs its own listener, so it must start from a chain without one:

1. ``Seccomp.start`` (main thread, before any other thread of the VM) compiles every program
   (libseccomp is loaded here, before any chroot) and starts the supervisor thread
   ``kasou-seccomp``. It installs a filter allowing the union of all roles, without a
   listener and with ``SECCOMP_RET_USER_NOTIF`` for anything else (ENOSYS there, as it has
   no listener; a kill would outrank the notification of the threads it starts): it runs
   only this module's fixed code (reading notifications, starting threads).
2. Role threads are started *by the supervisor* (``spawn``): their chain is
   [union, role], which allows exactly the role's list (role is a subset of the union), and
   has no listener yet, so each installs its role's filter with its own listener at its start.
3. The main thread installs the ``control`` filter after the first boot's threads started
   (``enter``). On a guest reboot it builds again under that filter, but it never creates
   the new VM's threads itself: ``spawn`` does. Threads that a filtered thread creates
   directly (control workers from the control loop, the console output thread from a vCPU)
   keep their creator's list and report through their creator's listener.

Reporting
---------
A call outside the list returns ``SECCOMP_RET_USER_NOTIF``: the calling thread blocks and
the supervisor, polling every listener fd, reads the notification (thread id, syscall
number), prints ``kasou: seccomp: thread NAME made a forbidden system call: NAME (NR);
stopping`` to stderr and kills the process with SIGKILL. ``SECCOMP_RET_KILL_PROCESS`` alone
prints nothing where no audit daemon runs, and ``SECCOMP_RET_TRAP`` would have to report from
a signal handler on the faulting thread, which Python cannot do safely.

Test hook
---------
With ``KASOU_TEST_HOOKS=1`` and ``KASOU_SECCOMP_PROBE=<role>`` in the environment, the first
thread of that role calls ``getppid`` (in no list) right after installing its filter, so
tests can watch the report and the kill. Without ``KASOU_TEST_HOOKS=1`` the probe is ignored.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import select
import signal
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Literal, TypeVar

from kasou._sys import set_thread_name
from kasou.errors import HostError

__all__ = [
    "PROBE_SYSCALL",
    "ROLES",
    "Role",
    "Seccomp",
    "SeccompError",
    "compile_filter",
    "load_lists",
    "parse_list",
]

log = logging.getLogger(__name__)

Role = Literal["vcpu", "device", "control"]
ROLES: tuple[Role, ...] = ("vcpu", "device", "control")
PROBE_SYSCALL = "getppid"  # what the test hook calls: in no role's list

_T = TypeVar("_T")
# What the supervisor needs beyond the roles: its own calls (reading notifications, naming
# the thread, the report) and what a thread it starts does before its role filter is on.
_SUPERVISOR_OWN = frozenset(
    {"seccomp", "prctl", "epoll_wait", "ioctl", "openat", "read", "close", "write", "kill"}
)

# linux/seccomp.h, linux/prctl.h; x86_64 syscall numbers (arch/x86/entry/syscalls).
_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_PR_SET_NO_NEW_PRIVS = 38
_BPF_INSN = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
# struct seccomp_notif: u64 id, u32 pid, u32 flags, struct seccomp_data (int nr, u32 arch,
# u64 instruction_pointer, u64 args[6]).
_NOTIF = struct.Struct("<QIIiIQ6Q")
assert _NOTIF.size == 80
# _IOWR('!', 0, struct seccomp_notif)
_SECCOMP_IOCTL_NOTIF_RECV = (3 << 30) | (_NOTIF.size << 16) | (ord("!") << 8) | 0


class _SockFprog(ctypes.Structure):
    """struct sock_fprog, linux/filter.h."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


assert ctypes.sizeof(_SockFprog) == 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


class SeccompError(HostError):
    """A filter could not be built or installed."""


# --- the lists --------------------------------------------------------------------------


def parse_list(text: str, source: str = "list") -> frozenset[str]:
    """The syscall names of a list file: one a line, ``#`` starts a comment."""
    names = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.replace("_", "").isalnum() or not line[0].isalpha():
            raise SeccompError(f"{source}:{number}: {line!r} is not a system call name")
        names.add(line)
    return frozenset(names)


def load_lists() -> dict[str, frozenset[str]]:
    """Each role's allow-list (its file plus ``base.txt``), and ``"supervisor"``: the union."""
    folder = resources.files("kasou.jail") / "syscalls"
    base = parse_list((folder / "base.txt").read_text(), "base.txt")
    lists: dict[str, frozenset[str]] = {}
    for role in ROLES:
        name = f"{role}.txt"
        lists[role] = base | parse_list((folder / name).read_text(), name)
    lists["supervisor"] = frozenset().union(*lists.values(), _SUPERVISOR_OWN)
    return lists


def compile_filter(allowed: Iterable[str], otherwise: int | None = None) -> bytes:
    """A BPF program (struct sock_filter[]) that allows ``allowed`` on x86_64 and returns
    ``otherwise`` (default: ``SECCOMP_RET_USER_NOTIF``) for every other call."""
    import pyseccomp  # type: ignore[import-untyped]

    arch = pyseccomp.system_arch()
    action = pyseccomp.NOTIFY if otherwise is None else otherwise
    rules = pyseccomp.SyscallFilter(action)
    for name in sorted(allowed):
        if pyseccomp.resolve_syscall(arch, name) < 0:
            raise SeccompError(f"{name!r} is no system call on this architecture")
        rules.add_rule(pyseccomp.ALLOW, name)
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % _BPF_INSN:
        raise SeccompError(f"libseccomp produced a {len(program)}-byte BPF program")
    return program


def _install(program: bytes, listener: bool) -> int:
    """Install ``program`` on the calling thread; return its listener fd (or -1)."""
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(code)}")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _BPF_INSN, ctypes.addressof(buffer))
    flags = _SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    result = _syscall(
        ctypes.c_long(_SYS_SECCOMP),
        ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(flags),
        ctypes.byref(fprog),
    )
    if result < 0:
        code = ctypes.get_errno()
        raise SeccompError(f"seccomp(SECCOMP_SET_MODE_FILTER) failed: {os.strerror(code)}")
    return int(result) if listener else -1


def _thread_name(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm", "rb") as comm:
            return comm.read().decode(errors="replace").strip() or f"tid {tid}"
    except OSError:
        return f"tid {tid}"


# --- the supervisor ---------------------------------------------------------------------


class _Call:
    __slots__ = ("done", "error", "function", "result")

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class Seccomp:
    """The process's filters: programs compiled once, and the supervisor thread."""

    _instance: Seccomp | None = None
    _instance_lock = threading.Lock()
    _prepared: tuple[dict[str, bytes], dict[int, str]] | None = None

    def __init__(self, programs: Mapping[str, bytes], names: Mapping[int, str]) -> None:
        self._programs = dict(programs)
        self._names = dict(names)  # syscall numbers of this arch, resolved before any jail
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._listeners: set[int] = set()
        self._entered: set[int] = set()  # native ids of threads that installed a role
        self._probe = _probe_role()
        self._probed = False
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kasou-seccomp", daemon=True)

    @classmethod
    def prepare(cls) -> None:
        """Load libseccomp and compile every program, starting no thread: call it before a
        chroot or pivot_root (the jail), or before unsharing namespaces that need a
        single-threaded process. ``start`` does it when nobody did."""
        with cls._instance_lock:
            if cls._prepared is not None:
                return
            import pyseccomp  # type: ignore[import-untyped]

            lists = load_lists()
            programs = {role: compile_filter(lists[role]) for role in lists}
            for role in ROLES:  # for a thread whose chain has a listener already
                programs[f"{role}-silent"] = compile_filter(lists[role], pyseccomp.KILL_PROCESS)
            # SECCOMP_RET_USER_NOTIF, not a kill: in a thread it starts, the newer role
            # filter's notification must win (equal actions: the newest filter decides); in
            # the supervisor itself, which has no listener, a call outside fails with ENOSYS.
            programs["supervisor"] = compile_filter(lists["supervisor"])
            arch = pyseccomp.system_arch()
            names = {}
            for number in range(512):  # x86_64 numbers are below 512 (x32 is refused)
                try:
                    names[number] = pyseccomp.resolve_syscall(arch, number).decode()
                except ValueError:
                    continue  # a hole in the table
            cls._prepared = (programs, names)

    @classmethod
    def start(cls) -> Seccomp:
        """The process's ``Seccomp``, started on first use (before the threads it will
        filter exist)."""
        cls.prepare()
        with cls._instance_lock:
            if cls._instance is None:
                assert cls._prepared is not None
                instance = cls(*cls._prepared)
                instance._thread.start()
                instance._ready.wait()
                if instance._failure is not None:
                    raise SeccompError(f"the seccomp supervisor failed: {instance._failure}")
                cls._instance = instance
            return cls._instance

    @classmethod
    def active(cls) -> Seccomp | None:
        """The process's ``Seccomp`` once ``start`` ran, else ``None``."""
        return cls._instance

    def hook(self, role: Role) -> Callable[[], None]:
        """What a thread of ``role`` calls first on its own thread (``on_start``)."""
        return lambda: self.enter(role)

    def enter(self, role: Role) -> None:
        """Install ``role``'s filter on the calling thread, with a listener this supervisor
        reads. A thread that already entered a role keeps it."""
        me = threading.get_native_id()
        if me in self._entered:
            return
        try:
            fd = _install(self._programs[role], listener=True)
        except SeccompError as error:
            # A chain that already has a listener (a thread started by a filtered thread
            # outside ``spawn``): still filter it, without the report.
            log.warning("seccomp: %s; %s thread filtered without a report", error, role)
            _install(self._programs[f"{role}-silent"], listener=False)
            fd = -1
        self._entered.add(me)
        if fd >= 0:
            os.set_inheritable(fd, False)
            self._listeners.add(fd)
            self._epoll.register(fd, select.EPOLLIN)
        if self._probe == role and not self._probed:
            self._probed = True
            os.getppid()  # the test hook: PROBE_SYSCALL is in no list

    def spawn(self, function: Callable[[], _T]) -> _T:
        """Run ``function`` on the supervisor thread and return what it returns: threads it
        starts begin with a chain that has no listener (see the module docstring)."""
        if threading.current_thread() is self._thread:
            return function()
        call = _Call(function)
        self._calls.put(call)
        os.eventfd_write(self._wake, 1)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _run(self) -> None:
        set_thread_name("kasou-seccomp")
        try:
            _install(self._programs["supervisor"], listener=False)
        except BaseException as error:
            self._failure = error
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, events in ready:
                if fd == self._wake:
                    self._serve_calls()
                elif events & select.EPOLLIN:
                    self._report(fd)
                elif events & (select.EPOLLHUP | select.EPOLLERR):
                    # Every thread under that filter has ended (seccomp_unotify(2)).
                    self._epoll.unregister(fd)
                    self._listeners.discard(fd)
                    os.close(fd)

    def _serve_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                call.result = call.function()
            except BaseException as error:
                call.error = error
            call.done.set()

    def _report(self, fd: int) -> None:
        notification = ctypes.create_string_buffer(_NOTIF.size)
        if _ioctl(fd, _SECCOMP_IOCTL_NOTIF_RECV, notification) != 0:
            if ctypes.get_errno() in (errno.ENOENT, errno.EINTR):
                return  # the caller was interrupted meanwhile; it will call again
            return
        _, tid, _, number, *_ = _NOTIF.unpack(notification.raw)
        name = self._names.get(number, "unknown")
        message = (
            f"kasou: seccomp: thread {_thread_name(tid)} made a forbidden system call: "
            f"{name} ({number}); stopping\n"
        )
        try:
            os.write(2, message.encode())
        finally:
            os.kill(os.getpid(), signal.SIGKILL)


def _probe_role() -> str | None:
    """The role the test hook makes misbehave (only with ``KASOU_TEST_HOOKS=1``)."""
    if os.environ.get("KASOU_TEST_HOOKS") != "1":
        return None
    return os.environ.get("KASOU_SECCOMP_PROBE") or None


def _main(argv: list[str]) -> int:
    """``python -m kasou.jail.seccomp``: each list's size, after compiling it."""
    lists = load_lists()
    for role, names in lists.items():
        compile_filter(names)
        sys.stdout.write(f"{role}: {len(names)} system calls\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
