"""The jailer: a supervisor outside, the VMM inside new namespaces as an unprivileged user.

See the package docstring for the shape; this module does the work in that order."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import signal
import socket
import stat
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType

from kasou.errors import ConfigError, HostError, KasouError
from kasou.jail import _libc
from kasou.jail._config import JailConfig, JailPlan, check_jail

__all__ = ["run_jailed", "sweep"]

_MARKER = "supervisor"  # in each jail folder: "pid starttime", then what to undo
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_NPROC = 1024  # threads of the jail uid, all its VMs together (setrlimit(2): RLIMIT_NPROC)
_NOFILE = 4096
# Host nodes made in the jail: (path, mode, group-only). /dev/null too: libraries assume it.
_DEVICES = (
    ("/dev/kvm", 0o660, True),
    ("/dev/net/tun", 0o660, True),
    ("/dev/urandom", 0o666, False),
    ("/dev/null", 0o666, False),
)


def run_jailed(
    config: JailConfig,
    plan: JailPlan,
    before_drop: Callable[[], Sequence[int]],
    body: Callable[[], int],
) -> int:
    """Run ``body`` (the VMM) in a jail; return the exit status it ends with.

    ``before_drop`` runs inside, still root, and returns the fds to keep open (TAPs).
    Raises ``KasouError`` before anything is left on the host."""
    check_jail(config)
    base = _make_base(config.base)
    sweep(base)
    folder = base / f"{plan.name}-{os.getpid()}"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        raise ConfigError(
            "jail-dir", f"{folder} exists: another kasou owns it, or remove it"
        ) from None
    except OSError as error:
        raise ConfigError("jail-dir", f"cannot make {folder}: {error.strerror}") from None
    marker = folder / _MARKER
    try:
        marker.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        _lend(config, plan, folder, marker)
        return _supervise(config, plan, folder, before_drop, body)
    finally:
        _clean(folder)


def sweep(base: Path) -> None:
    """Remove the jail folders in ``base`` whose supervisor is gone (a kill -9), undoing
    what each lent (owners of files, socket links)."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for folder in entries:
        try:
            words = (folder / _MARKER).read_text().split()
            pid, started = int(words[0]), words[1]
        except (OSError, ValueError, IndexError):
            continue  # not a jail folder, or one still being made
        if _start_time(pid) != started:
            _clean(folder)


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (proc(5)): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            return file.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"


def _make_base(base: Path) -> Path:
    base = base.absolute()
    existed = base.is_dir()
    try:
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        probe = base / f".probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        if not existed:
            with contextlib.suppress(OSError):
                base.rmdir()
        raise ConfigError(
            "jail-dir", f"{base} is not a writable folder ({error.strerror}): give another"
        ) from None
    return base


def _lend(config: JailConfig, plan: JailPlan, folder: Path, marker: Path) -> None:
    """Prepare the host side: readable files, lent files, socket folders and links. Each
    change is written to ``marker`` before it is made, so any end can undo it."""
    (folder / "root").mkdir(mode=0o755)
    for path in plan.read_only:
        info = path.stat()
        readable = (
            info.st_mode & 0o004
            or (info.st_gid == config.gid and info.st_mode & 0o040)
            or (info.st_uid == config.uid and info.st_mode & 0o400)
        )
        if not readable:
            raise ConfigError(
                "jail", f"{path} is not readable by the jail's uid {config.uid}: chmod o+r it"
            )
    for path in plan.writable:
        if not path.exists():
            path.touch(mode=0o644)
        info = path.stat()
        with marker.open("a") as file:
            file.write(f"owner {info.st_uid} {info.st_gid} {os.fsencode(path).hex()}\n")
        os.chown(path, config.uid, config.gid)
    for group in plan.delegated:  # removed by the supervisor's owner of the group
        for path in (group, *group.iterdir()):
            os.chown(path, config.uid, config.gid)
    for path, inside in _socket_folders(plan, folder):
        if not inside.exists():
            inside.mkdir(parents=True, mode=0o700)
            os.chown(inside, config.uid, config.gid)
        _free_socket_path(path)
        with marker.open("a") as file:
            file.write(f"link {os.fsencode(path).hex()}\n")
        os.symlink(inside / path.name, path)


def _socket_folders(plan: JailPlan, folder: Path) -> list[tuple[Path, Path]]:
    """Each socket with its folder in the jail folder (``sock/N``): one per host folder, so
    sockets that share a folder on the host (a control socket and its console) share it in
    the jail too, where one bind would otherwise hide the other."""
    numbers: dict[Path, int] = {}
    pairs: list[tuple[Path, Path]] = []
    for path in plan.sockets:
        number = numbers.setdefault(path.absolute().parent, len(numbers))
        pairs.append((path, folder / "sock" / str(number)))
    return pairs


def _free_socket_path(path: Path) -> None:
    """The host path must be free: a stale socket or link is replaced, a live one refused."""
    if not path.parent.is_dir():
        raise ConfigError("jail", f"{path.parent} does not exist: make it, or give another")
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    if not path.is_socket():
        raise ConfigError("jail", f"{path} exists and is not a socket: remove it first")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise ConfigError("jail", f"{path} is served by another process: stop it, or pick another")


def _clean(folder: Path) -> None:
    """Undo what the marker lists, then remove the folder (no mounts: they lived in the
    child's mount namespace only)."""
    try:
        lines = (folder / _MARKER).read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        words = line.split()
        with contextlib.suppress(OSError, ValueError, IndexError):
            if words[0] == "owner":
                path = os.fsdecode(bytes.fromhex(words[3]))
                os.chown(path, int(words[1]), int(words[2]))
            elif words[0] == "link":
                link = Path(os.fsdecode(bytes.fromhex(words[1])))
                if link.is_symlink() and Path(os.readlink(link)).is_relative_to(folder):
                    link.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _supervise(
    config: JailConfig,
    plan: JailPlan,
    folder: Path,
    before_drop: Callable[[], Sequence[int]],
    body: Callable[[], int],
) -> int:
    """Fork the VMM as PID 1 of a new PID namespace, forward stop signals, wait."""
    alive_read, alive_write = os.pipe()  # closes in the child when the supervisor dies
    _libc.unshare(_libc.CLONE_NEWPID)  # the next child is PID 1 of a new namespace
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        os.close(alive_write)
        status = 1
        try:
            _enter(config, plan, folder, alive_read, before_drop)
            status = body()
        except KasouError as error:
            sys.stderr.write(f"kasou: error: {error}\n")
            status = 2
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(alive_read)

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    previous = {signum: signal.signal(signum, forward) for signum in _STOP_SIGNALS}
    try:
        _, status = os.waitpid(child, 0)  # PEP 475: retried after each forwarded signal
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(alive_write)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _orphaned(alive: int) -> bool:
    """Whether the supervisor is gone (its end of the pipe closed)."""
    poller = select.poll()
    poller.register(alive, select.POLLIN)
    return bool(poller.poll(0))


def _enter(
    config: JailConfig,
    plan: JailPlan,
    folder: Path,
    alive: int,
    before_drop: Callable[[], Sequence[int]],
) -> None:
    """In the child: namespaces, the jail's file system, pivot_root, the drop."""
    _libc.set_parent_death_signal(signal.SIGKILL)
    if _orphaned(alive):  # the supervisor died before PDEATHSIG was set
        os._exit(1)
    flags = _libc.CLONE_NEWNS | _libc.CLONE_NEWIPC | _libc.CLONE_NEWUTS
    if not plan.network:
        flags |= _libc.CLONE_NEWNET
    _libc.unshare(flags)
    # Nothing mounted from here on propagates back to the host (mount_namespaces(7)).
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE)
    root = folder / "root"
    _build_root(config, plan, folder, root)
    cwd = os.getcwd()
    os.mkdir(root / ".old")
    _libc.pivot_root(root, root / ".old")
    os.chdir("/")
    _libc.umount2("/.old", _libc.MNT_DETACH)
    os.rmdir("/.old")
    # Relative paths in the config resolve as on the host where the jail has that folder
    # (paths are kept, so it does when a file the VMM needs lies in it).
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    # The root itself is read-only; the binds and /tmp keep their own flags.
    _libc.mount(None, "/", None, _libc.MS_REMOUNT | _libc.MS_BIND | _libc.MS_RDONLY)
    socket.sethostname(plan.name)
    keep = set(before_drop())
    _limit(plan)
    _drop(config)
    _libc.set_parent_death_signal(signal.SIGKILL)  # the drop cleared it
    if _orphaned(alive):
        os._exit(1)
    _close_fds(keep)


def _build_root(config: JailConfig, plan: JailPlan, folder: Path, root: Path) -> None:
    """A tmpfs at ``root`` (this namespace only) with each needed path at its host path."""
    _libc.mount("tmpfs", root, "tmpfs", _libc.MS_NOSUID, "mode=0755,size=16m")
    inside = _Inside(root)
    inside.tmpfs("/tmp", "mode=1777,size=64m")
    binds: list[tuple[Path, Path, bool]] = []  # (host source, jail path, read-only)
    binds += [(path, path, True) for path in _runtime_paths()]
    binds += [(path.absolute(), path.absolute(), True) for path in plan.read_only]
    binds += [(path.absolute(), path.absolute(), False) for path in plan.writable]
    binds += [(path, path, False) for path in plan.delegated]
    shared = {inside: path.absolute().parent for path, inside in _socket_folders(plan, folder)}
    binds += [(inside, host, False) for inside, host in shared.items()]
    # Parents before what lies in them; a path already visible through a read-only folder
    # bound before needs no bind of its own.
    for source, target, read_only in sorted(binds, key=lambda bind: len(bind[1].parts)):
        inside.bind(source, target, read_only)
    for node, mode, group_only in _DEVICES:
        inside.device(node, mode, config.gid if group_only else 0)
    inside.proc()


class _Inside:
    """Mount points under the jail root, at the host paths they stand for."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def at(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")

    def tmpfs(self, path: str, options: str) -> None:
        target = self.at(path)
        target.mkdir(parents=True, exist_ok=True)
        flags = _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
        _libc.mount("tmpfs", target, "tmpfs", flags, options)

    def bind(self, source: Path, path: Path, read_only: bool) -> None:
        target = self.at(path)
        if read_only and os.path.lexists(target):
            return  # visible already, through a folder bound read-only
        if not os.path.lexists(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                target.mkdir()
            else:
                target.touch()
        _libc.mount(source, target, None, _libc.MS_BIND | _libc.MS_REC)
        flags = _libc.MS_REMOUNT | _libc.MS_BIND | _libc.MS_NOSUID | _libc.MS_NODEV
        _libc.mount(None, target, None, flags | (_libc.MS_RDONLY if read_only else 0))

    def device(self, path: str, mode: int, gid: int) -> None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            if path == "/dev/kvm":
                raise HostError("/dev/kvm does not exist: load kvm") from None
            return
        target = self.at(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(target, stat.S_IFCHR | mode, info.st_rdev)
        os.chown(target, 0, gid)
        os.chmod(target, mode)  # mknod's mode went through the umask

    def proc(self) -> None:
        # A fresh procfs shows this PID namespace only (pid_namespaces(7)).
        target = self.at("/proc")
        target.mkdir()
        flags = _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
        _libc.mount("proc", target, "proc", flags)


def _runtime_paths() -> list[Path]:
    """The VMM's "binary", read-only: the interpreter's prefixes, the import path, kasou's
    folder and the folders of the shared libraries mapped now (ld.so, libc, libffi...)."""
    import kasou

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(kasou.__file__).parent}
    paths.update(Path(entry) for entry in sys.path if entry and os.path.isdir(entry))
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
                paths.add(Path(fields[5].strip()).parent)
    return sorted(_real(paths))


def _real(paths: Iterable[Path]) -> set[Path]:
    """Each path and, where it is reached through links, the path it resolves to."""
    result: set[Path] = set()
    for path in paths:
        if path.exists():
            result.add(path.absolute())
            result.add(path.resolve())
    # /lib64 and /lib are links to usr/ on a merged-/usr system: the resolved folder is in.
    return result


def _limit(plan: JailPlan) -> None:
    """setrlimit(2): no core files, bounded files, threads and file sizes."""
    _, hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = _NOFILE if hard_files == resource.RLIM_INFINITY else min(_NOFILE, hard_files)
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    resource.setrlimit(resource.RLIMIT_NPROC, (_NPROC, _NPROC))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (plan.file_size_limit, plan.file_size_limit))


def _drop(config: JailConfig) -> None:
    """To the jail id with no capabilities (capabilities(7)): the bounding set first (it
    needs CAP_SETPCAP), then groups, gid, uid (a uid change from 0 clears the permitted and
    effective sets), then the inheritable set, then no_new_privs."""
    _libc.drop_bounding_set()
    os.setgroups([])
    os.setresgid(config.gid, config.gid, config.gid)
    os.setresuid(config.uid, config.uid, config.uid)
    _libc.clear_capabilities()
    _libc.set_no_new_privs()


def _close_fds(keep: set[int]) -> None:
    """Close every fd but 0-2 and ``keep``."""
    low = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        os.closerange(low, fd)
        low = fd + 1
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        limit = _NOFILE
    os.closerange(low, max(limit, _NOFILE))
