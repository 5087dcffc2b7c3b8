"""Pinning threads to host CPUs: a thread's allowed CPUs and the CPU it last ran on.

Threads are named by their kernel id (``threading.Thread.native_id``); sched_setaffinity(2)
takes a thread id as well as a process id, and changes only that thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from kasou.errors import HostError

__all__ = ["last_cpu", "pin_thread", "thread_cpus"]


def pin_thread(tid: int, cpus: Iterable[int]) -> None:
    """Let thread ``tid`` of this process run on ``cpus`` only."""
    try:
        os.sched_setaffinity(tid, set(cpus))
    except ProcessLookupError:
        pass  # the thread ended (the VM is going away)
    except OSError as error:
        raise HostError(f"cannot pin thread {tid}: {error.strerror}") from error


def thread_cpus(tid: int) -> list[int] | None:
    """The CPUs thread ``tid`` may run on; None once it has ended."""
    try:
        return sorted(os.sched_getaffinity(tid))
    except OSError:
        return None


def last_cpu(tid: int, pid: int | str = "self") -> int | None:
    """The CPU thread ``tid`` last ran on: field 39, ``processor``, of
    /proc/PID/task/TID/stat (proc(5)); None once it has ended."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = text[text.rfind(b")") + 2 :].split()
    return int(fields[39 - 3]) if len(fields) > 36 else None
