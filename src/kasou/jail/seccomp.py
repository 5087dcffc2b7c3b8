"""seccomp-bpf allow-lists, one per thread role, and the reporter of forbidden calls.

This module owns the lists (``syscalls/*.txt``: data, recorded from what kasou's threads
really call by ``tests/tools/seccomp_record.py``), their compilation into BPF through
libseccomp (pyseccomp), their installation on each thread (seccomp(2)) and the report when a
thread makes a call outside its list. It does not decide which thread has which role: the
VMM passes ``hook(role)`` to the threads it starts (an ``on_start`` callable run first on the
thread) and calls ``enter("control")`` on its main thread. Filters are a process's: only a
VMM that owns its process (``kasou run``, on the main thread) uses them.

Roles
-----
``vcpu`` (threads in KVM_RUN and the exits handled there), ``device`` (the virtio event
loops), ``control`` (the main thread, the runner's event loop: console, control socket,
agent, and the workers it spawns: snapshots, migration). Every list also holds ``base.txt``:
what any Python thread may call at any moment (signal return, allocator, locks, exit), and
what this module's own code calls on a filtered thread, which a recording without filters
does not see (``own`` in ``Seccomp.__init__``): ``sendmsg`` on the reporter's socket only,
and for the main thread ``kill`` and ``wait4`` of the reporter only.

Reporting, from another process
-------------------------------
A call outside the list returns ``SECCOMP_RET_USER_NOTIF``: the calling thread blocks in the
system call until a supervisor answers through the filter's listener fd
(seccomp_unotify(2)). That supervisor cannot be a thread of the VMM: the blocked thread often
holds Python's GIL (``os.getppid()`` and many other calls do not release it), so no other
Python thread of the process would ever run. ``Seccomp.start`` therefore forks a *reporter*
process first (single-threaded, from the main thread, before any filter and any VM thread):
it keeps only fd 2 and its end of a ``SOCK_SEQPACKET`` socket pair, dies with the VMM's
main thread (``PR_SET_PDEATHSIG``), ignores the stop signals a terminal sends the whole
group (the VMM handles them) and runs under a small filter of its own. Each role thread,
right after installing its filter, sends the listener fd over the socket (``SCM_RIGHTS``)
and closes its own copy, so no thread of the VMM can answer (and so allow) a notification.
The reporter polls every listener; on a notification it names the thread
(``/proc/<vmm>/task/<tid>/comm``), writes ``kasou: seccomp: thread NAME made a forbidden
system call: NAME (NR); stopping`` to stderr and kills the VMM with SIGKILL. When the VMM
ends normally it kills and reaps the reporter (``atexit``); on a kill -9 of the VMM,
``PR_SET_PDEATHSIG`` ends it; in a jail (``kasou run --jail``) the VMM is PID 1 of its PID
namespace and the reporter its child, which the kernel ends with it.
``SECCOMP_RET_KILL_PROCESS`` alone prints nothing where no audit daemon runs, and
``SECCOMP_RET_TRAP`` would have to report from a signal handler on the faulting thread,
which Python cannot do safely.

Order of installation, and why
------------------------------
A filter applies to the thread that installs it and to every thread that thread creates
afterwards; filters stack (a call passes only if every filter in the chain allows it), and
the kernel allows one notification listener per chain (``EBUSY`` otherwise;
seccomp_unotify(2)). Each role thread needs its own listener, so it must start from a chain
without one:

1. ``Seccomp.start`` (main thread, before any other thread of the VM) forks the reporter,
   compiles every program and starts the spawner thread ``kasou-seccomp``. The spawner
   installs a filter allowing the union of all roles, without a listener (a call outside
   fails with ENOSYS there): it only starts threads.
2. Role threads are started *by the spawner* (``spawn``): their chain is [union, role],
   which allows exactly the role's list (role is a subset of the union), and has no
   listener yet, so each installs its role's filter with its own listener at its start.
3. The main thread installs the ``control`` filter after the first boot's threads started
   (``enter``). On a guest reboot it builds again under that filter, but it never creates
   the new VM's threads itself: ``spawn`` does. Threads that a filtered thread creates
   directly (control workers from the control loop, the console output thread from a vCPU)
   keep their creator's list and report through their creator's listener.

Compiled once, filled in per VM
-------------------------------
Compiling the seven programs through libseccomp costs a VM several milliseconds of its start,
yet they differ between two VMs only in the two numbers a VM learns as it starts: its end of
the reporter's socket and the reporter's pid (the argument checks of ``own`` above). A warm
template (``kasou.cli.template``) calls ``prepare(precompile=True)``: each program is
compiled twice, with two sets of stand-in values, and kept with the places where the two
compilations differ, which must be exactly the ``k`` fields of comparisons against a
stand-in (struct sock_filter, linux/filter.h). A VM forked from it writes its own numbers
there instead of compiling. Anything else differing (libseccomp shaping the program by the
value) leaves the VM compiling its own, as ``kasou run`` does.

Threads started ahead
---------------------
Starting a role thread through the spawner and installing its filter costs a VM about a
millisecond of its start. A VMM forked before it knows its VM (the template's spare) calls
``park(role, count)``: the spawner starts those threads at once (their chain is [union], as
in step 2), each installs its role's filter, hands its listener over and waits. The VM's
code then takes one (``unpark``) and gives it the function its thread would have run
(``_Parked.run``): the thread runs it under the filter it already has, and ends with it. A
thread never given work just waits until the process ends. The test hook's probe is made
when the work calls ``enter``, not when the filter went on.

Test hook
---------
With ``KASOU_TEST_HOOKS=1`` and ``KASOU_SECCOMP_PROBE=<role>`` in the environment, the first
thread of that role calls ``getppid`` (in no list) right after installing its filter, so
tests can watch the report and the kill. Without ``KASOU_TEST_HOOKS=1`` the probe is ignored.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import logging
import os
import queue
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any, Literal, NoReturn, TypeVar

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
# What the spawner needs beyond the roles: starting a thread, and what the new thread does
# before its role filter is on (naming itself, no_new_privs, seccomp).
_SPAWNER_OWN = frozenset(
    {"clone3", "set_robust_list", "rseq", "prctl", "seccomp", "gettid", "sigaltstack"}
)
# What the reporter calls once its own filter is on (anything else kills it).
_REPORTER_CALLS = frozenset(
    {
        "epoll_wait", "epoll_pwait", "epoll_ctl", "recvmsg", "ioctl", "openat", "read",
        "close", "write", "kill", "exit_group", "exit", "getpid", "getppid", "rt_sigreturn",
        "mmap", "munmap", "brk", "mremap", "madvise", "futex", "restart_syscall",
        "clock_gettime",
    }
)  # fmt: skip

# linux/seccomp.h, linux/prctl.h; x86_64 syscall numbers (arch/x86/entry/syscalls).
_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_BPF_INSN = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
# struct seccomp_notif: u64 id, u32 pid, u32 flags, struct seccomp_data (int nr, u32 arch,
# u64 instruction_pointer, u64 args[6]).
_NOTIF = struct.Struct("<QIIiIQ6Q")
assert _NOTIF.size == 80
# _IOWR('!', 0, struct seccomp_notif)
_SECCOMP_IOCTL_NOTIF_RECV = (3 << 30) | (_NOTIF.size << 16) | (ord("!") << 8) | 0
# struct seccomp_notif_resp: u64 id, s64 val, s32 error, u32 flags; _IOWR('!', 1, ...).
_RESP = struct.Struct("<QqiI")
_SECCOMP_IOCTL_NOTIF_SEND = (3 << 30) | (_RESP.size << 16) | (ord("!") << 8) | 1
_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE
_FD = struct.Struct("i")  # one fd in an SCM_RIGHTS message (unix(7))
_LISTENER, _REPORT_TO = b"L", b"E"  # what an fd sent to the reporter is
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the VMM's to handle
_K = struct.Struct("<HBBI")  # struct sock_filter; k is its last field
# Two sets of stand-ins for (channel fd, reporter pid) in precompiled programs: no file
# descriptor or pid reaches them (pid_max is at most 2**22; fds are small), and no constant
# of a libseccomp program for x86_64 (syscall numbers, AUDIT_ARCH_X86_64 0xc000003e,
# __X32_SYSCALL_BIT 0x40000000) equals one.
_STAND_INS = ((0x5EC0_0F01, 0x5EC0_0F02), (0x5EC0_0F03, 0x5EC0_0F04))


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
    """Each role's allow-list (its file plus ``base.txt``), and ``"spawner"``: the union of
    the roles and what the spawner needs to start threads."""
    folder = resources.files("kasou.jail") / "syscalls"
    base = parse_list((folder / "base.txt").read_text(), "base.txt")
    lists: dict[str, frozenset[str]] = {}
    for role in ROLES:
        name = f"{role}.txt"
        lists[role] = base | parse_list((folder / name).read_text(), name)
    lists["spawner"] = frozenset().union(*lists.values(), _SPAWNER_OWN)
    return lists


def _pyseccomp() -> Any:
    """pyseccomp, imported without the two ``ldconfig -p`` runs its import makes through
    ctypes.util.find_library (a fork and exec each, ~3 ms of every start, and nothing to find
    after a pivot_root): the sonames Debian's libc6 and libseccomp2 install are tried first,
    and the real search only if they do not load."""
    module = sys.modules.get("pyseccomp")
    if module is not None:
        return module
    import ctypes.util

    search = ctypes.util.find_library
    sonames = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}

    def find(name: str) -> str | None:
        soname = sonames.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
            except OSError:
                pass
            else:
                return soname
        return search(name)

    ctypes.util.find_library = find
    try:
        import pyseccomp  # type: ignore[import-untyped]
    finally:
        ctypes.util.find_library = search
    return pyseccomp


def compile_filter(
    allowed: Iterable[str],
    otherwise: int | None = None,
    only: Iterable[tuple[str, int, int]] = (),
) -> bytes:
    """A BPF program (struct sock_filter[]) for x86_64 that allows ``allowed``, allows each
    ``(name, argument, value)`` of ``only`` when that argument (0-based) equals ``value``
    (unless ``name`` is allowed outright), and returns ``otherwise`` (default:
    ``SECCOMP_RET_USER_NOTIF``) for every other call."""
    pyseccomp = _pyseccomp()

    arch = pyseccomp.system_arch()
    action = pyseccomp.NOTIFY if otherwise is None else otherwise
    rules = pyseccomp.SyscallFilter(action)
    names = frozenset(allowed)
    for name in sorted(names | {name for name, _, _ in only}):
        if pyseccomp.resolve_syscall(arch, name) < 0:
            raise SeccompError(f"{name!r} is no system call on this architecture")
    for name in sorted(names):
        rules.add_rule(pyseccomp.ALLOW, name)
    for name, argument, value in only:
        if name not in names:
            rules.add_rule(pyseccomp.ALLOW, name, pyseccomp.Arg(argument, pyseccomp.EQ, value))
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


class _Blueprint:
    """A compiled program whose argument checks compare against stand-ins: ``fill`` writes
    a VM's own values in their place (see "Compiled once, filled in per VM")."""

    __slots__ = ("program", "slots")

    def __init__(self, program: bytes, slots: tuple[tuple[int, int], ...]) -> None:
        self.program = program
        self.slots = slots  # (byte offset of a k field, index of the value it takes)

    @classmethod
    def compare(cls, first: bytes, second: bytes) -> _Blueprint | None:
        """The blueprint of one program compiled with each set of ``_STAND_INS`` (``first``
        and ``second``); None when the two differ anywhere but in a stand-in's k field."""
        if len(first) != len(second):
            return None
        slots = []
        for offset in range(0, len(first), _BPF_INSN):
            one, two = _K.unpack_from(first, offset), _K.unpack_from(second, offset)
            if one == two:
                continue
            if one[:3] != two[:3] or one[3] not in _STAND_INS[0]:
                return None
            index = _STAND_INS[0].index(one[3])
            if two[3] != _STAND_INS[1][index]:
                return None
            slots.append((offset + _K.size - 4, index))
        return cls(first, tuple(slots))

    def fill(self, values: tuple[int, int]) -> bytes:
        program = bytearray(self.program)
        for offset, index in self.slots:
            struct.pack_into("<I", program, offset, values[index])
        return bytes(program)


def _reporter_program() -> bytes:
    """The reporter's own filter: nobody to report to, so a call outside kills it."""
    return compile_filter(_REPORTER_CALLS, _pyseccomp().KILL_PROCESS)


def _own_calls(channel: int, reporter: int) -> dict[str, list[tuple[str, int, int]]]:
    """What this module's code calls on each role's thread (see the module docstring): the
    argument values its filters allow, by role."""
    send = ("sendmsg", 0, channel)
    return {
        "vcpu": [send],
        "device": [send],
        "control": [send, ("kill", 0, reporter), ("wait4", 0, reporter)],
    }


def _compile_programs(
    lists: Mapping[str, frozenset[str]], channel: int, reporter: int
) -> dict[str, bytes]:
    """Every VMM program: each role's (with a listener), its silent twin (for a thread
    whose chain has a listener already) and the spawner's."""
    pyseccomp = _pyseccomp()

    own = _own_calls(channel, reporter)
    programs: dict[str, bytes] = {
        role: compile_filter(lists[role], only=own[role]) for role in ROLES
    }
    for role in ROLES:
        programs[f"{role}-silent"] = compile_filter(lists[role], pyseccomp.KILL_PROCESS, own[role])
    programs["spawner"] = compile_filter(lists["spawner"], only=own["control"])
    return programs


def _precompile(lists: Mapping[str, frozenset[str]]) -> dict[str, _Blueprint] | None:
    """Every program of ``_compile_programs`` as a blueprint, or None if any cannot be."""
    first, second = (_compile_programs(lists, *values) for values in _STAND_INS)
    blueprints = {}
    for name, program in first.items():
        blueprint = _Blueprint.compare(program, second[name])
        if blueprint is None:
            return None
        blueprints[name] = blueprint
    return blueprints


# --- the reporter process ---------------------------------------------------------------


def _report_forever(channel: int, vmm: int, names: Mapping[int, str], program: bytes) -> NoReturn:
    """The reporter's whole life, in the forked child: never returns."""
    status = 0
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != vmm:  # the VMM died before PDEATHSIG was set
            os._exit(0)
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        os.closerange(0, 2)
        os.closerange(3, channel)
        os.closerange(channel + 1, max(channel + 1, os.sysconf("SC_OPEN_MAX")))
        set_thread_name("kasou-seccomp")
        poller = select.epoll()
        poller.register(channel, select.EPOLLIN)
        sock = socket.socket(fileno=channel)  # before the filter: it asks getsockname
        record = _record_path()
        _install(program, listener=False)
        _serve(sock, poller, vmm, names, record)
    except BaseException:
        status = 1
    os._exit(status)


def _serve(
    sock: socket.socket,
    poller: select.epoll,
    vmm: int,
    names: Mapping[int, str],
    record: str | None = None,
) -> None:
    """Take listener fds from ``sock``; report (and kill the VMM) on a notification;
    return when the VMM closed its end. With ``record`` (the lists' recording mode), append
    the report to that file and let the call go on instead. Reports go to fd 2 until the
    VMM sends another (``report_to``)."""
    size = socket.CMSG_SPACE(_FD.size * 8)
    channel = sock.fileno()
    out = 2
    while True:
        try:
            ready = poller.poll()
        except InterruptedError:
            continue
        for fd, events in ready:
            if fd == channel:
                data, ancillary, _, _ = sock.recvmsg(16, size)
                if not data:
                    return  # the VMM ended
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[: len(payload) - len(payload) % _FD.size])
                        if data == _REPORT_TO:
                            out = fds[0]
                            continue
                        for listener in fds:
                            poller.register(listener, select.EPOLLIN)
            elif events & select.EPOLLIN:
                message = _notification(fd, vmm, names, record is not None)
                if message is not None and record is not None:
                    log_fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    try:
                        os.write(log_fd, message.encode())
                    finally:
                        os.close(log_fd)
                elif message is not None:
                    try:
                        os.write(out, message.encode())
                    finally:
                        os.kill(vmm, signal.SIGKILL)
                    return
            else:  # every thread under that filter has ended (seccomp_unotify(2))
                poller.unregister(fd)
                os.close(fd)


def _notification(
    listener: int, vmm: int, names: Mapping[int, str], let_through: bool = False
) -> str | None:
    """The report of the notification waiting on ``listener`` (None if it went away: the
    caller was interrupted meanwhile, and will call again). ``let_through``: the call goes
    on as if allowed (SECCOMP_USER_NOTIF_FLAG_CONTINUE, seccomp_unotify(2))."""
    buffer = ctypes.create_string_buffer(_NOTIF.size)  # zeroed, as NOTIF_RECV requires
    if _ioctl(listener, _SECCOMP_IOCTL_NOTIF_RECV, buffer) != 0:
        return None
    ident, tid, _, number, *_ = _NOTIF.unpack(buffer.raw)
    if let_through:
        answer = ctypes.create_string_buffer(_RESP.pack(ident, 0, 0, _CONTINUE), _RESP.size)
        _ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, answer)
    thread = f"tid {tid}"
    try:
        comm = os.open(f"/proc/{vmm}/task/{tid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            thread = os.read(comm, 64).decode(errors="replace").strip() or thread
        finally:
            os.close(comm)
    except OSError:
        pass
    return (
        f"kasou: seccomp: thread {thread} made a forbidden system call: "
        f"{names.get(number, 'unknown')} ({number}); stopping\n"
    )


# --- the VMM's side ---------------------------------------------------------------------


class _Call:
    __slots__ = ("done", "error", "function", "result")

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class _Parked:
    """A thread of one role started ahead (``Seccomp.park``): it installs its role's filter,
    waits for the one function it is to run (``run``), and ends when that returns."""

    def __init__(self, seccomp: Seccomp, role: Role) -> None:
        self._seccomp = seccomp
        self._role = role
        self._work: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name="kasou-parked", daemon=True)

    def run(self, target: Callable[[], object], name: str) -> None:
        """Have the thread run ``target`` as the thread ``name`` (it names the OS thread
        itself, as every kasou thread does first)."""
        self.thread.name = name
        self._work.put(target)

    def _main(self) -> None:
        set_thread_name("kasou-parked")  # in ps and top until it has its work
        # A filter that fails here fails again in the work's own ``enter``, which reports it.
        with contextlib.suppress(SeccompError):
            self._seccomp._filter(self._role)
        self._work.get()()


class Seccomp:
    """The process's filters: the programs, the reporter process and the spawner thread."""

    _instance: Seccomp | None = None
    _instance_lock = threading.Lock()
    _prepared: tuple[dict[str, frozenset[str]], dict[int, str]] | None = None
    # Set by prepare(precompile=True): the reporter's program and the VMM's blueprints.
    _precompiled: tuple[bytes, dict[str, _Blueprint] | None] | None = None

    def __init__(self, lists: Mapping[str, frozenset[str]], names: Mapping[int, str]) -> None:
        """Fork the reporter and compile the programs (``start`` calls it)."""
        precompiled = self._precompiled
        if precompiled is not None:
            reporter_program, blueprints = precompiled
        else:
            reporter_program, blueprints = _reporter_program(), None
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        vmm = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as error:
            self._channel.close()
            theirs.close()
            raise SeccompError(f"cannot start the seccomp reporter: {error}") from error
        if pid == 0:
            _report_forever(theirs.fileno(), vmm, names, reporter_program)
        theirs.close()
        self._reporter = pid
        channel = self._channel.fileno()
        if blueprints is not None:
            self._programs = {
                name: blueprint.fill((channel, pid)) for name, blueprint in blueprints.items()
            }
        else:
            self._programs = _compile_programs(lists, channel, pid)
        self._entered: set[int] = set()  # native ids of threads that installed a role
        self._probe = _probe_role()
        self._probed = False
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._parked: dict[Role, list[_Parked]] = {role: [] for role in ROLES}
        self._parked_lock = threading.Lock()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._spawner, name="kasou-seccomp", daemon=True)
        atexit.register(self._end)

    @classmethod
    def prepare(cls, precompile: bool = False) -> None:
        """Load libseccomp, read the lists and name every system call number, starting
        nothing: call it before a pivot_root (the jail), where libseccomp cannot be found.
        ``start`` does it when nobody did. With ``precompile`` (a warm template, which
        forks many VMMs) also compile every program once, to be filled in by each VMM
        (see "Compiled once, filled in per VM")."""
        with cls._instance_lock:
            if cls._prepared is None:
                cls._prepare()
            if precompile and cls._precompiled is None:
                assert cls._prepared is not None
                cls._precompiled = (_reporter_program(), _precompile(cls._prepared[0]))

    @classmethod
    def _prepare(cls) -> None:
        pyseccomp = _pyseccomp()

        lists = load_lists()
        compile_filter(lists["spawner"])  # every name resolves, the library works
        arch = pyseccomp.system_arch()
        names = {}
        for number in range(512):  # x86_64 numbers are below 512 (x32 is refused)
            try:
                names[number] = pyseccomp.resolve_syscall(arch, number).decode()
            except ValueError:
                continue  # a hole in the table
        cls._prepared = (lists, names)

    @classmethod
    def start(cls) -> Seccomp:
        """The process's ``Seccomp``, started on first use (on the main thread, before the
        threads it will filter exist)."""
        cls.prepare()
        with cls._instance_lock:
            if cls._instance is None:
                assert cls._prepared is not None
                instance = cls(*cls._prepared)
                instance._thread.start()
                instance._ready.wait()
                if instance._failure is not None:
                    instance._end()
                    raise SeccompError(f"the seccomp spawner failed: {instance._failure}")
                cls._instance = instance
            return cls._instance

    @classmethod
    def active(cls) -> Seccomp | None:
        """The process's ``Seccomp`` once ``start`` ran, else ``None``."""
        return cls._instance

    @property
    def reporter(self) -> int:
        """The reporter's process id."""
        return self._reporter

    def hook(self, role: Role) -> Callable[[], None]:
        """What a thread of ``role`` calls first on its own thread (``on_start``)."""
        return lambda: self.enter(role)

    def enter(self, role: Role) -> None:
        """Install ``role``'s filter on the calling thread and hand its listener to the
        reporter. A thread that already entered a role keeps it."""
        self._filter(role)
        if self._probe == role and not self._probed:
            self._probed = True
            os.getppid()  # the test hook: PROBE_SYSCALL is in no list

    def _filter(self, role: Role) -> None:
        """``enter`` without the test hook: what a parked thread does before its work."""
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
            try:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))]
                self._channel.sendmsg([_LISTENER], rights)
            except OSError as error:  # the reporter is gone: forbidden calls get ENOSYS
                log.warning("seccomp: cannot reach the reporter (%s)", error)
            finally:
                os.close(fd)  # no thread of the VMM may answer its own notifications

    def park(self, role: Role, count: int = 1) -> None:
        """Start ``count`` threads of ``role`` before there is work for them, each filtered
        and waiting (see "Threads started ahead"); ``unpark`` hands one its work."""

        def start() -> None:
            for _ in range(count):
                parked = _Parked(self, role)
                parked.thread.start()
                with self._parked_lock:
                    self._parked[role].append(parked)

        self.spawn(start)

    def unpark(self, role: Role) -> _Parked | None:
        """A thread ``park`` started for ``role``, to be given its work (``run``); None
        when none waits."""
        with self._parked_lock:
            waiting = self._parked[role]
            while waiting:
                parked = waiting.pop(0)
                if parked.thread.is_alive():
                    return parked
        return None

    def spawn(self, function: Callable[[], _T]) -> _T:
        """Run ``function`` on the spawner thread and return what it returns: threads it
        starts begin with a chain that has no listener (see the module docstring)."""
        if threading.current_thread() is self._thread:
            return function()
        call = _Call(function)
        self._calls.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _spawner(self) -> None:
        set_thread_name("kasou-seccomp")
        try:
            _install(self._programs["spawner"], listener=False)
        except BaseException as error:
            self._failure = error
            self._ready.set()
            return
        self._ready.set()
        while True:
            call = self._calls.get()
            try:
                call.result = call.function()
            except BaseException as error:
                call.error = error
            call.done.set()

    def report_to(self, fd: int) -> None:
        """Have the reporter write its reports to (a copy of) ``fd`` from now on, rather
        than to the fd 2 this process had when it started: for a VMM started ahead of its
        VM (``kasou.cli.template``), which gets its log only then."""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))]
        try:
            self._channel.sendmsg([_REPORT_TO], rights)
        except OSError as error:  # the reporter is gone: forbidden calls get ENOSYS
            log.warning("seccomp: cannot reach the reporter (%s)", error)

    def close(self) -> None:
        """End and reap the reporter now: for a VMM that leaves by ``os._exit``, which runs
        no ``atexit`` handler."""
        self._end()

    def _end(self) -> None:
        """At the VMM's exit: end and reap the reporter (no zombie, no stray process)."""
        if self._channel.fileno() < 0:
            return  # ended already (``close``): its pid may be another process's by now
        try:
            os.kill(self._reporter, signal.SIGKILL)
            os.waitpid(self._reporter, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self._channel.close()


def _record_path() -> str | None:
    """The lists' recording mode (tests/tools/seccomp_record.py): with ``KASOU_TEST_HOOKS=1``
    and ``KASOU_SECCOMP_RECORD=FILE``, calls outside the lists are written to FILE, one
    report line each, and let through. Never enforced otherwise."""
    if os.environ.get("KASOU_TEST_HOOKS") != "1":
        return None
    return os.environ.get("KASOU_SECCOMP_RECORD") or None


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
