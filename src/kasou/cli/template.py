"""The warm template: a process that has imported what a VM needs and forks one per request.

``kasoud`` (``kasou.daemon``) starts it as ``python -m kasou.cli.template FD PARENT`` with one
end of a ``SOCK_SEQPACKET`` socket pair as FD. Each packet it reads is a spawn request, JSON
``{"argv": [...], "dir": PATH}``; it answers ``{"pid": N}`` or ``{"error": TEXT}``. A VM
forked from here skips Python's start and kasou's imports, which is most of ``kasou run``'s
time to the first guest instruction.

Each VM is double-forked: the middle child forks the VM and exits at once, so the VM is
nobody's child here but is re-parented to the daemon (a child subreaper, prctl(2)
PR_SET_CHILD_SUBREAPER) while the daemon lives, and to init after; it calls setsid(2) so it
survives the daemon's death and no terminal signal reaches it. In the VM: the working folder
is its folder, stdin is /dev/null, stdout and stderr go to ``stderr.log``, every other fd is
closed, the signal handlers and mask are those of a fresh Python, then
``kasou.cli.fastrun.run_command(argv)`` runs and its exit status is written to ``exit``
(atomically: ``exit.tmp`` renamed) before ``os._exit``. A VM that leaves no ``exit`` was
killed.

The template dies with the daemon (PR_SET_PDEATHSIG); the VMs do not. It does not decide
anything: what to run is the daemon's business.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import sys
import traceback

from kasou._sys.libc import set_thread_name

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_MAX_REQUEST = 1 << 20


def _preload() -> None:
    """Import what ``kasou run`` imports for a guest-kit VM and the default guest."""
    import kasou.cli.fastrun
    import kasou.client.control
    import kasou.devices.virtio
    import kasou.image
    import kasou.resources
    import kasou.vmm.agent
    import kasou.vmm.builder
    import kasou.vmm.control
    import kasou.vmm.runner
    import kasou.vmm.vm  # noqa: F401
    from kasou.jail.seccomp import Seccomp, SeccompError

    try:
        # libseccomp loaded, the allow-lists read, every call named: once, for all VMs.
        # Nothing starts here; each VM compiles and installs its own filters.
        Seccomp.prepare()
    except SeccompError:
        pass  # each VM reports it when it starts its filters


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the daemon died before the prctl took hold
        os._exit(0)


def _exit_status(leave: SystemExit) -> int:
    if leave.code is None:
        return 0
    if isinstance(leave.code, int):
        return leave.code
    sys.stderr.write(f"{leave.code}\n")
    return 1


def _become_vm(argv: list[str], directory: str) -> None:
    """Runs in the grandchild: never returns."""
    status = 1
    try:
        os.setsid()
        os.chdir(directory)
        # ps and top show the VM by name (comm, 15 bytes), not as another template.
        set_thread_name(f"kasou-{os.path.basename(directory)}"[:15])
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open("stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        from kasou.cli.fastrun import run_command

        status = run_command(argv)
    except SystemExit as leave:
        status = _exit_status(leave)
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with open("exit.tmp", "w", encoding="ascii") as written:
            written.write(f"{status}\n")
        os.replace("exit.tmp", "exit")
    finally:
        os._exit(status & 0xFF)


def _spawn(argv: list[str], directory: str) -> int:
    """Double-fork a VM; return its pid once the middle child is reaped."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            vm = os.fork()
            if vm == 0:
                os.close(write_end)
                _become_vm(argv, directory)
            os.write(write_end, str(vm).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        text = reader.read()
    os.waitpid(middle, 0)
    if not text:
        raise OSError("the middle child ended without forking the VM")
    return int(text)


def _answer(request: bytes) -> dict[str, object]:
    try:
        fields = json.loads(request)
        argv, directory = fields["argv"], fields["dir"]
        if not isinstance(argv, list) or not all(isinstance(word, str) for word in argv):
            return {"error": "argv must be a list of strings"}
        if not isinstance(directory, str) or not os.path.isdir(directory):
            return {"error": f"{directory!r} is not a folder"}
        return {"pid": _spawn(argv, directory)}
    except (ValueError, KeyError, TypeError) as error:
        return {"error": f"a bad spawn request: {error}"}
    except OSError as error:
        return {"error": f"cannot fork the VM: {error}"}


def main(args: list[str] | None = None) -> int:
    words = sys.argv[1:] if args is None else args
    if len(words) != 2 or not all(word.isdigit() for word in words):
        sys.stderr.write("usage: python -m kasou.cli.template FD PARENT_PID (kasoud runs it)\n")
        return 2
    channel = socket.socket(fileno=int(words[0]))
    _die_with(int(words[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the daemon's group is its to handle
    _preload()
    gc.collect()
    gc.freeze()  # keep the collector off the pages the VMs share with the template
    channel.send(b'{"ready": true}')
    while True:
        request = channel.recv(_MAX_REQUEST)
        if not request:  # the daemon closed its end
            return 0
        channel.send(json.dumps(_answer(request)).encode())


if __name__ == "__main__":
    sys.exit(main())
