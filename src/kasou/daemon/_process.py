"""One VM process as the daemon watches it: a pidfd, its start time and its ``exit`` file.

A pid alone is not a process: after a daemon restart the pid in the store may belong to
someone else. ``VmProcess.attach`` only takes a pid whose start time (``/proc/PID/stat``
field 22, in clock ticks since boot) is the one recorded when the VM started, and then holds
a pidfd (pidfd_open(2)), which names that process for good: signals go through it
(pidfd_send_signal(2)) and it polls readable when the process ends.

The exit status comes from the ``exit`` file the VM writes as it ends (``kasou.cli.template``);
for a VM that is the daemon's child (the daemon is a child subreaper) ``waitpid`` also reaps
it and gives the status of one killed by a signal. Neither: it was killed and we cannot say
how.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from pathlib import Path

__all__ = ["VmProcess", "listens", "read_status", "readable", "start_ticks"]

_SO_ACCEPTCON = 0x10000  # a listening socket, in /proc/net/unix's Flags (linux/net.h)
_TCP_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column (include/net/tcp_states.h)


def readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` polls readable within ``timeout`` seconds (None: no limit). poll(2),
    not select(2): kasoud holds an fd or more per VM, and select refuses fds past 1023."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # proc(5): "pid (comm) state ..."; comm may hold spaces and parentheses, so split after
    # the last ')'. starttime is field 22, the 20th after comm.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class VmProcess:
    """A running (or just ended) VM process, named by a pidfd."""

    def __init__(self, pid: int, ticks: int, pidfd: int, exit_path: Path) -> None:
        self.pid = pid
        self.ticks = ticks
        self._pidfd = pidfd
        self.exit_path = exit_path

    @classmethod
    def attach(cls, pid: int, ticks: int | None, exit_path: Path) -> VmProcess | None:
        """The process ``pid`` if it still runs and started at ``ticks`` (None: take the
        one there now, for a VM just forked and not yet reaped); else None."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # Read the start time after opening the pidfd: if it matches now, the pidfd names it.
        now = start_ticks(pid)
        if now is None or (ticks is not None and now != ticks):
            os.close(pidfd)
            return None
        return cls(pid, now, pidfd, exit_path)

    def fileno(self) -> int:
        return self._pidfd

    def ended(self) -> bool:
        """True once the process has ended (its pidfd polls readable)."""
        if self._pidfd < 0:
            return True
        return readable(self._pidfd, 0)

    def signal(self, number: int = signal.SIGKILL) -> None:
        if self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, number)

    def collect(self) -> tuple[int | None, str]:
        """Reap the ended process and say how it ended: (exit status or None, why).
        A status below zero is a signal's number, negated."""
        waited: int | None = None
        try:
            found, status = os.waitpid(self.pid, os.WNOHANG)
            if found == self.pid:
                waited = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass  # not our child (re-attached after a daemon restart): init reaps it
        written = read_status(self.exit_path)
        self.close()
        if written is not None:
            return written, f"exited with status {written}"
        if waited is not None and waited < 0:
            name = signal.Signals(-waited).name if -waited in signal.valid_signals() else ""
            return waited, f"killed by signal {-waited} {name}".rstrip()
        if waited is not None:
            return waited, f"exited with status {waited} before writing its exit file"
        return None, "ended without an exit status (killed)"

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def read_status(path: Path) -> int | None:
    """The status a VM wrote to its ``exit`` file; None without a readable one."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def listens(pid: int, url: str) -> bool:
    """Whether process ``pid`` listens on ``url`` (``unix:PATH`` or ``tcp://HOST:PORT``): a
    VM waiting for a migration (``kasou run --incoming``) is ready for its sender once this
    holds. Read from /proc (proc(5): the process's fd links and its namespace's net/unix,
    net/tcp, net/tcp6), never by connecting: the VM takes the first connection as the
    migration."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    sockets = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    if url.startswith("unix:"):
        return _listens_unix(pid, Path(url[len("unix:") :]), sockets)
    port = url.rpartition(":")[2]
    if not url.startswith("tcp://") or not port.isdigit():
        return False
    for table in ("tcp", "tcp6"):
        for fields in _proc_table(pid, table):
            # sl local_address rem_address st ... uid timeout inode: the inode is field 9
            if (
                len(fields) > 9
                and fields[3] == _TCP_LISTEN
                and fields[9] in sockets
                and int(fields[1].rpartition(":")[2], 16) == int(port)
            ):
                return True
    return False


def _listens_unix(pid: int, path: Path, sockets: set[str]) -> bool:
    # listen_unix (kasou.event.unix) binds under a hidden name beside the path and renames it
    # into place once it listens; /proc shows the name it was bound to. The path is the
    # process's once that name is gone and a socket is at the path.
    hidden = f".{path.name}."
    for fields in _proc_table(pid, "unix"):
        # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) < 8 or fields[6] not in sockets:
            continue
        try:
            listening = int(fields[3], 16) & _SO_ACCEPTCON
        except ValueError:
            continue
        bound = Path(fields[7])
        if not listening or bound.parent != path.parent:
            continue
        if bound == path or (bound.name.startswith(hidden) and not bound.exists()):
            return path.is_socket()
    return False


def _proc_table(pid: int, name: str) -> list[list[str]]:
    """The rows of /proc/PID/net/NAME, split on white space, without the header."""
    try:
        with open(f"/proc/{pid}/net/{name}", encoding="ascii", errors="replace") as table:
            return [line.split(maxsplit=7 if name == "unix" else -1) for line in table][1:]
    except OSError:
        return []
