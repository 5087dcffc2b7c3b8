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

__all__ = ["VmProcess", "read_status", "start_ticks"]


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
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

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
