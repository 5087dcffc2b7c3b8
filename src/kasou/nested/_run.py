"""Running one command in the outer VM and tearing the VM down, whatever happens.

One run::

    host                                         outer VM (QEMU TCG, -cpu qemu64,+svm)
    private temp dir ── share/ ── 9p kasouctl ── /ctl: command.sh, mounts.sh in; status out
    /  (read-only) ─────────────── 9p hostroot ── /lower ─ overlay + tmpfs ─ chroot, command
    each shared folder ─────────── 9p kasoushare<N> ── the same path in the new root
    out.sock  <──────── virtio-serial port "kasou.out" ── the command's stdout and stderr
    console.log  <───── ttyS0 ── kernel console and /init's own messages
    127.0.0.1:HOSTPORT ── slirp, restrict=on ── virtio-net 10.0.2.15:GUESTPORT (with forwards)

QEMU runs in its own process group and session (so a Ctrl-C at the terminal reaches only the
caller) and is killed with the whole group on every way out of ``run_nested``: a timeout, an
exception, Ctrl-C (KeyboardInterrupt is re-raised) or SIGTERM (re-delivered after clean-up
when it arrives in the main thread). It also gets PR_SET_PDEATHSIG (through util-linux
setpriv), so it dies if the calling process is killed outright. The private temp dir is
always removed.

The command's output arrives over virtio-serial, not a serial console: no kernel message can
mix into it, it is not a tty (no CRLF translation; programs buffer as they do into a pipe), and
a blocking write in the guest returns only once QEMU has taken the bytes, so nothing is lost
when /init powers off right after the command ends (drivers/char/virtio_console.c,
__send_to_port, waits for the host to use the buffer).

This module does not build the kernel or initramfs (``_image``), choose how the command is
quoted (``_command``) or write the network's options (``_network``).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import platform
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from kasou.errors import ConfigError
from kasou.nested._command import SHARE_TAG_PREFIX, encode_command, encode_mounts
from kasou.nested._errors import NestedError
from kasou.nested._image import (
    CONTROL_TAG,
    HOST_ROOT_TAG,
    INITRAMFS,
    KERNEL,
    OUTPUT_PORT,
    cache_entry_if_built,
    find_busybox,
    prepare,
)
from kasou.nested._network import Forward, check_host_ports, netdev_options

__all__ = ["NestedResult", "nested_available", "qemu_command", "run_nested"]

_log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
_INSTALL_QEMU = "install it: apt-get install qemu-system-x86"
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directories the outer VM replaces with fresh file systems: a working directory there would
# not be what the caller sees.
_MASKED = ("/tmp", "/run", "/proc", "/sys", "/dev")
_CONSOLE_TAIL_LINES = 25
# The outer kernel's command line (Documentation/admin-guide/kernel-parameters.txt).
# panic=-1 reboots at once on a panic (init dying), which -no-reboot turns into QEMU's exit;
# quiet keeps the console (a file) short. The rest make booting under TCG about 2 s faster
# (6.4-7.0 s -> 4.4-5.0 s for run_nested(["true"]) here): mitigations=off skips speculation
# workarounds, which this throwaway test VM does not need; tsc=reliable and no_timer_check
# stop the kernel from doubting an emulated clock; audit=0, nowatchdog drop idle work.
_KERNEL_ARGS = (
    "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable no_timer_check audit=0 nowatchdog"
)


@dataclass(frozen=True)
class NestedResult:
    """How the command ended in the nested host."""

    status: int
    """The command's exit status; 128+N if signal N killed it (the shell's convention)."""
    output: str
    """Its stdout and stderr together, as written (undecodable UTF-8 replaced)."""
    wall_seconds: float
    """From starting QEMU to QEMU's exit: boot, the command, power-off."""


def nested_available() -> str | None:
    """None if ``run_nested`` can work on this host, else why not and what to install."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"the nested host needs x86-64 Linux, not {sys.platform} on {platform.machine()}"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is missing: {_INSTALL_QEMU}"
    if find_busybox() is None:
        return "a static busybox is missing: install it: apt-get install busybox-static"
    if cache_entry_if_built() is None:
        missing = [tool for tool in ("apt-cache", "apt-get", "dpkg-deb") if not shutil.which(tool)]
        if missing:
            return (
                f"the outer VM's kernel is not cached, and building it needs Debian's apt: "
                f"{', '.join(missing)} missing"
            )
    return None


def _default_cpus() -> int:
    # One vCPU. Two (MTTCG, one host thread each) were slower for kasou's own work here
    # (the e2e tier: 100-120 s against 65 s with one; the inner guest still gets its two
    # vCPUs), and twice in about twenty runs the outer VM stopped making progress (once with
    # an RCU stall on its second vCPU); none did with one. ``cpus=2`` remains available.
    return 1


def _opt(value: str | Path) -> str:
    """A value inside a QEMU option string: commas are doubled (qemu-options, "-device")."""
    return str(value).replace(",", ",,")


def qemu_command(
    qemu: str,
    entry: Path,
    workdir: Path,
    *,
    memory_mib: int,
    cpus: int,
    shares: Sequence[str] = (),
    forwards: Sequence[Forward] = (),
) -> list[str]:
    """QEMU's argv for one run: the kernel and initramfs from cache ``entry``, the host root,
    ``workdir/share`` and each of ``shares`` over 9p, output to ``workdir/out.sock``, console
    to ``workdir/console.log``; with ``forwards``, a NIC that carries just them."""
    accel = "tcg,thread=multi" if cpus > 1 else "tcg"
    folders: list[str] = []
    for index, path in enumerate(shares):
        folders += [
            "-virtfs",
            f"local,path={_opt(path)},mount_tag={SHARE_TAG_PREFIX}{index},"
            "security_model=none,multidevs=remap",
        ]
    return [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-accel", accel,
        # TCG emulates AMD-V (SVM), so kvm-amd loads inside and /dev/kvm is a real KVM.
        "-cpu", "qemu64,+svm",
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-kernel", str(entry / KERNEL),
        "-initrd", str(entry / INITRAMFS),
        "-append", _KERNEL_ARGS,
        "-serial", f"file:{_opt(workdir / 'console.log')}",
        "-virtfs",
        f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,"
        "multidevs=remap",
        "-virtfs",
        f"local,path={_opt(workdir / 'share')},mount_tag={CONTROL_TAG},security_model=none",
        "-device", "virtio-serial-pci,id=kasouserial",
        "-chardev", f"socket,id=kasouout,path={_opt(workdir / 'out.sock')}",
        "-device", f"virtserialport,bus=kasouserial.0,chardev=kasouout,name={OUTPUT_PORT}",
        *folders,
        *netdev_options(forwards),
    ]  # fmt: skip


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_shares(shares: Sequence[Path | str]) -> list[str]:
    """The shared folders as real paths, parents first; ``ConfigError`` for an unusable one."""
    if isinstance(shares, str | bytes):
        raise ConfigError("shares", "give the shared folders as a list of paths")
    real: list[str] = []
    for share in shares:
        path = Path(share)
        if not path.is_absolute() or not path.is_dir():
            raise ConfigError("shares", f"{share} is not an existing directory on this host")
        resolved = os.path.realpath(path)
        if resolved == "/" or any(_under(resolved, d) for d in ("/proc", "/sys", "/dev")):
            raise ConfigError("shares", f"{share} cannot be shared: pick a folder of files")
        if resolved not in real:
            real.append(resolved)
    # A share inside another is mounted after it, or the outer mount would hide it.
    return sorted(real, key=lambda path: path.count("/"))


def _check_request(
    command: Sequence[str],
    *,
    cwd: Path,
    timeout: float,
    memory_mib: int,
    cpus: int,
    shares: Sequence[str],
) -> None:
    if isinstance(command, str | bytes):
        raise ConfigError("command", "give the program and its arguments as a list of strings")
    if not command:
        raise ConfigError("command", "the command is empty: give a program and its arguments")
    if not timeout > 0:
        raise ConfigError("timeout", f"must be a positive number of seconds, not {timeout}")
    if memory_mib < 512:
        raise ConfigError("memory", f"the outer VM needs at least 512 MiB, not {memory_mib}")
    if not 1 <= cpus <= 64:
        raise ConfigError("cpus", f"must be between 1 and 64, not {cpus}")
    if not cwd.is_absolute() or not cwd.is_dir():
        raise ConfigError("cwd", f"{cwd} is not an existing directory on this host")
    real = os.path.realpath(cwd)
    for masked in ("/proc", "/sys", "/dev"):
        if _under(real, masked):
            raise ConfigError(
                "cwd", f"{cwd} is under {masked}, which the nested host has its own of"
            )


def _masked_cwd(cwd: Path, shares: Sequence[str]) -> str | None:
    """The folder to share when ``cwd`` lies under one the nested host replaces with a fresh
    file system (/tmp, /run) and no share covers it: the top folder below that one
    (/tmp/ci-checkout for /tmp/ci-checkout/tests), so the rest of a checkout there (its
    virtual environment, say) is visible too. None when nothing needs sharing."""
    real = os.path.realpath(cwd)
    if any(_under(real, share) for share in shares):
        return None
    for masked in ("/tmp", "/run"):
        if _under(real, masked) and real != masked:
            top = os.path.relpath(real, masked).split(os.sep)[0]
            return os.path.join(masked, top)
    return None


def run_nested(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = 1200,
    memory_mib: int = 3072,
    cpus: int | None = None,
    stream: bool = True,
    env: Mapping[str, str] | None = None,
    shares: Sequence[Path] = (),
    forwards: Sequence[Forward] = (),
) -> NestedResult:
    """Run ``command`` as root in a nested host that has a real /dev/kvm; return how it ended.

    The command sees this host's file system (read-only underneath, writable through an
    in-memory overlay that is discarded afterwards), with fresh /tmp, /run, /proc, /sys and
    /dev, in ``cwd`` (default: the current directory), with PATH and HOME from this process
    plus ``env``. Each folder in ``shares`` is mounted writable at its own path (over the
    fresh /tmp too), so results can come back; a ``cwd`` under /tmp or /run is shared the same
    way, or it would be hidden. Each of ``forwards`` makes a TCP port of this host
    (127.0.0.1 only) reach a port of the nested host, which otherwise has no network; the
    nested host still reaches nothing outside. Its stdout and stderr are collected and, with
    ``stream``, copied to
    ``sys.stdout`` as they arrive. The first call builds the outer kernel and initramfs
    (``prepare``). ``timeout`` counts from QEMU's start and covers the boot.

    Raises ``ConfigError`` for an unusable argument (a forwarded host port already taken, too)
    and ``NestedError`` when the nested host
    is unavailable, fails to boot, or runs past ``timeout`` (QEMU is then killed).
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    cpus = _default_cpus() if cpus is None else cpus
    folders = _check_shares(shares)
    _check_request(
        command, cwd=cwd, timeout=timeout, memory_mib=memory_mib, cpus=cpus, shares=folders
    )
    masked = _masked_cwd(cwd, folders)
    if masked is not None:
        # A checkout under /tmp (CI clones there) would vanish behind the fresh /tmp inside:
        # share it, so the command finds its files (and its writes land on the host).
        folders.append(masked)
    variables = {
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
        "HOME": os.environ.get("HOME", "/root"),
        **(env or {}),
    }
    try:
        script = encode_command(list(command), cwd=str(cwd), env=variables)
    except ValueError as error:
        raise ConfigError("command", str(error)) from error
    try:
        mounts = encode_mounts(folders)
    except ValueError as error:
        raise ConfigError("shares", str(error)) from error
    forwards = list(forwards)
    check_host_ports(forwards)
    reason = nested_available()
    if reason is not None:
        raise NestedError(f"the nested host cannot run here: {reason}")
    entry = prepare(_log.info)  # the first call downloads and builds: say so in the log
    qemu = shutil.which(QEMU)
    assert qemu is not None  # nested_available checked it

    with _sigterm_raises(), _private_dir() as workdir:
        share = workdir / "share"
        share.mkdir()
        (share / "command.sh").write_bytes(script)
        (share / "mounts.sh").write_bytes(mounts)
        argv = qemu_command(
            qemu,
            entry,
            workdir,
            memory_mib=memory_mib,
            cpus=cpus,
            shares=folders,
            forwards=forwards,
        )
        _log.debug("starting the outer VM: %s", argv)
        sink = _Streamer() if stream else None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            socket_path = str(workdir / "out.sock")
            if len(os.fsencode(socket_path)) >= 108:  # sizeof(sun_path), unix(7)
                raise NestedError(
                    f"the temporary directory path {workdir} is too long for a Unix socket: "
                    "set TMPDIR to a shorter directory"
                )
            listener.bind(socket_path)
            listener.listen(1)
            chunks: list[bytes] = []
            started = time.monotonic()
            process = None
            try:
                with (workdir / "qemu.log").open("wb") as qemu_log:
                    process = subprocess.Popen(
                        _die_with_parent(argv),
                        stdin=subprocess.DEVNULL,
                        stdout=qemu_log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                finished = _collect(process, listener, started + timeout, chunks, sink)
            finally:
                if process is not None:
                    _kill_group(process)
            wall = time.monotonic() - started
        output = b"".join(chunks).decode("utf-8", errors="replace")
        if not finished:
            raise NestedError(
                f"the outer VM hung for {timeout:g} s and was killed{_timeout_context(workdir)}",
                output=output,
            )
        return NestedResult(_read_status(workdir, process, output), output, wall)


def _collect(
    process: subprocess.Popen[bytes],
    listener: socket.socket,
    deadline: float,
    chunks: list[bytes],
    sink: _Streamer | None,
) -> bool:
    """Gather the command's output until QEMU exits; False if ``deadline`` passed first."""
    pidfd = os.pidfd_open(process.pid)
    try:
        with selectors.DefaultSelector() as selector:
            # QEMU connects to the socket while it starts (chardev set-up), before the guest
            # runs; if it exits first (a bad option, a missing file), its pidfd turns readable.
            selector.register(listener, selectors.EVENT_READ)
            selector.register(pidfd, selectors.EVENT_READ)
            connection = None
            while connection is None:
                events = selector.select(deadline - time.monotonic())
                if not events:
                    return False
                if any(key.fileobj is listener for key, _ in events):
                    connection, _ = listener.accept()
                else:
                    break
            if connection is not None:
                with connection:
                    selector.unregister(listener)
                    selector.unregister(pidfd)
                    selector.register(connection, selectors.EVENT_READ)
                    while True:
                        if not selector.select(deadline - time.monotonic()):
                            return False
                        data = connection.recv(1 << 16)
                        if not data:  # QEMU closed the socket: it is exiting.
                            break
                        chunks.append(data)
                        if sink is not None:
                            sink.write(data)
        if sink is not None:
            sink.close()
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            return False
        return True
    finally:
        os.close(pidfd)


def _read_status(workdir: Path, process: subprocess.Popen[bytes], output: str) -> int:
    share = workdir / "share"
    try:
        return int((share / "status").read_text().strip())
    except (OSError, ValueError):
        pass
    error_file = share / "error"
    if error_file.exists():
        what = f"the outer VM's /init failed: {error_file.read_text().strip()}"
    elif (share / "started").exists():
        what = "the outer VM stopped while the command ran (a crash or out of memory?)"
    else:
        what = f"the outer VM stopped before running the command (QEMU exit {process.returncode})"
    raise NestedError(what + _diagnostics(workdir), output=output)


def _timeout_context(workdir: Path) -> str:
    if (workdir / "share" / "started").exists():
        # the outer kernel's own warnings (a stalled RCU, a hung task) say why, if it knew
        return "; the command was still running: give it a longer timeout" + _diagnostics(workdir)
    return "; it had not started the command (stuck while booting)" + _diagnostics(workdir)


def _diagnostics(workdir: Path) -> str:
    parts = []
    for name, label in (("qemu.log", "QEMU said"), ("console.log", "console")):
        try:
            text = (workdir / name).read_text(errors="replace").strip()
        except OSError:
            continue
        if text:
            tail = "\n".join(text.splitlines()[-_CONSOLE_TAIL_LINES:])
            parts.append(f"\n{label}:\n{tail}")
    return "".join(parts)


class _Streamer:
    """Copies output to ``sys.stdout`` as text, decoding UTF-8 across chunk boundaries."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._broken = False

    def write(self, data: bytes) -> None:
        self._emit(self._decoder.decode(data))

    def close(self) -> None:
        self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> None:
        if not text or self._broken:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError):
            self._broken = True  # a closed stdout: keep collecting, stop copying


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill QEMU's whole process group (QEMU leads it) unless QEMU has been reaped already,
    then reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run through util-linux ``setpriv --pdeathsig KILL``, which sets
    PR_SET_PDEATHSIG (prctl(2)) and execs it, so QEMU dies if this process is killed outright
    (a pre-exec hook in Python would do the same, but is unsafe in a threaded caller)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


@contextlib.contextmanager
def _private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kasou-nested-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Terminated(BaseException):
    """SIGTERM arrived during a run; raised to unwind through the clean-up code."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``_Terminated`` so ``finally`` clauses run; on the way
    out the signal is handed to the handler that was there before (by default, this process
    dies of SIGTERM as it would have). Only the main thread can set handlers (signal(2) in
    Python's ``signal`` docs); elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # a handler set outside Python: restore the default instead
        previous = signal.SIG_DFL
    if previous == signal.SIG_IGN:
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signal.SIGTERM, None)
            raise NestedError("the run was stopped by SIGTERM") from None
        os.kill(os.getpid(), signal.SIGTERM)
        raise NestedError("the run was stopped by SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
