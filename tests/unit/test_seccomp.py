"""The seccomp allow-lists (kasou.jail.seccomp): they parse, resolve on x86_64 and compile,
and a thread under one is reported and its process killed when it calls outside it. Filters
are installed in child processes only, so this test process stays unfiltered."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap

import pytest

from kasou.jail.seccomp import (
    PROBE_SYSCALL,
    ROLES,
    SeccompError,
    compile_filter,
    load_lists,
    parse_list,
)

pyseccomp = pytest.importorskip("pyseccomp")


def test_every_list_parses_and_every_name_is_an_x86_64_system_call() -> None:
    lists = load_lists()
    arch = pyseccomp.system_arch()
    for role in ROLES:
        assert lists[role], role
        for name in lists[role]:
            assert pyseccomp.resolve_syscall(arch, name) >= 0, (role, name)
        assert len(compile_filter(lists[role])) % 8 == 0
    assert lists["spawner"] >= lists["vcpu"] | lists["device"] | lists["control"]


def test_the_vcpu_list_is_the_smallest_and_no_list_has_the_probe() -> None:
    lists = load_lists()
    assert len(lists["vcpu"]) < len(lists["device"])
    assert len(lists["vcpu"]) < len(lists["control"])
    for role in ROLES:
        assert PROBE_SYSCALL not in lists[role]
        assert not {"execve", "mount", "ptrace", "setuid", "fork"} & lists[role], role


def test_a_bad_list_line_is_refused_with_its_place() -> None:
    assert parse_list("read  # comment\n\nwrite\n") == {"read", "write"}
    with pytest.raises(SeccompError, match="list:2: 'rm -rf' is not"):
        parse_list("read\nrm -rf\n")
    with pytest.raises(SeccompError, match="no system call"):
        compile_filter(["read", "not_a_call"])


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, whose reaping is its new parent's
    business once kasou's process has gone, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _child(body: str) -> subprocess.CompletedProcess[str]:
    script = "import os, threading\nfrom kasou.jail.seccomp import Seccomp\n"
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _ended(pid: int, timeout: float = 10.0) -> None:
    """Block until ``pid`` is no longer a live process (its pidfd turns readable when it
    exits); fail if it still runs after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    assert not _running(pid), f"process {pid} still runs"


def test_a_call_outside_the_list_is_reported_and_kills_the_process() -> None:
    # getppid does not release the GIL: only a reporter outside the process can act.
    ran = _child("""
        guard = Seccomp.start()
        print(guard.reporter, flush=True)
        def victim():
            guard.enter("vcpu")
            os.write(1, b"allowed\\n")  # in the list
            os.getppid()  # not in it
            os.write(1, b"survived\\n")
        thread = guard.spawn(lambda: threading.Thread(target=victim, name="victim"))
        guard.spawn(thread.start)
        thread.join()
        print("joined", flush=True)
    """)
    assert ran.returncode == -9, ran
    lines = ran.stdout.split()
    assert lines[1:] == ["allowed"], ran.stdout
    assert ran.stderr.endswith("made a forbidden system call: getppid (110); stopping\n")
    assert ran.stderr.startswith("kasou: seccomp: thread kasou-seccomp "), ran.stderr
    # The reporter held the stderr pipe, so it was ending when run() saw the pipe close;
    # a process closes its files before it is a zombie, so give it that moment.
    _ended(int(lines[0]))


def test_the_reporter_ends_with_the_process_and_is_reaped() -> None:
    ran = _child("""
        guard = Seccomp.start()
        print(guard.reporter, os.getpid(), flush=True)
        guard.enter("control")
        print(open(f"/proc/{guard.reporter}/status").read().count("Seccomp:\\t2"), flush=True)
    """)
    assert ran.returncode == 0, ran.stderr
    reporter, parent, filtered = (int(word) for word in ran.stdout.split())
    assert filtered == 1  # the reporter runs under its own filter
    with pytest.raises(ProcessLookupError):  # killed and reaped at exit: no zombie left
        os.kill(reporter, 0)
    assert reporter != parent
