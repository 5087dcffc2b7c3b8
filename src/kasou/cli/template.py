"""The warm template: a process that has imported what a VM needs and forks one per request.

``kasoud`` (``kasou.daemon``) starts it as ``python -m kasou.cli.template FD PARENT`` with one
end of a ``SOCK_SEQPACKET`` socket pair as FD. It first says ``{"ready": true, "spare": N}``;
each packet it reads then is a spawn request, JSON ``{"argv": [...], "dir": PATH}``, with at
most one fd (SCM_RIGHTS): a pipe's write end, passed on to the VM, which writes ``B`` to it
once its vCPUs run and closes it (closes it at once when it cannot tell: ``--jail``,
``--incoming``), so that kasoud waits for it without asking it anything while it builds. It
answers ``{"pid": N, "spare": M}`` or ``{"error": TEXT, "spare": M}``, and says
``{"spare": M}`` alone whenever it forks a new spare between two requests (``spare``: the
process kept for the next VM, or null; the daemon reaps it once the template has gone). A VM
forked from here skips Python's start and kasou's imports, which is most of ``kasou run``'s
time to the first guest instruction.

Ahead of each request (request -> first KVM_RUN is the figure that counts), the template
keeps a *spare*: the next VM's process, forked before it is asked for (``_REFILL_DELAY``
after the last one became a VM: a few ms, so that VM's build has begun, and so that a spare
is ready for a request that follows soon; at once if a request comes sooner). Each spare is
double-forked: the middle child forks it and exits at once, so it is nobody's child here but
is re-parented to the daemon (a child subreaper, prctl(2) PR_SET_CHILD_SUBREAPER) while the
daemon lives, and to init after. While it waits it does what no VM's settings decide:
setsid(2) (it survives the daemon's death and no terminal signal reaches it), stdin from
/dev/null, every fd but its socket to the template closed, the signal handlers and mask of a
fresh Python, and its seccomp filters' reporter and spawner started (``Seccomp.start``; the
programs were compiled here once, ``Seccomp.prepare(precompile=True)``). A spare forked
ahead then gets the VM's build ready, guessing the VM is like the last one
(``kasou.vmm.builder.prepare``: the KVM VM made, with the last VM's guest RAM size, its
irqchip and PIT, its vCPUs, and its kernel read ahead; a VM unlike the guess builds its
own), and starts the VM's event loop thread and vCPU threads, filtered and waiting for
their work (``Seccomp.park``: the request pays neither their creation nor their filters).
The template rehearsed a build once (``builder.rehearse``), so what every build makes
alike (CPUID, page tables, the usual ACPI tables, first calls) is made for all. A request
turns it into that VM: the working folder is its folder, stdout and stderr (and the seccomp
reports) go to ``stderr.log``, then ``kasou run``'s parser (built here once) and
``kasou.cli.fastrun.run_vm`` run, and its exit status is written to ``exit`` (atomically:
``exit.tmp`` renamed) before ``os._exit``. A VM that leaves no ``exit`` was killed. A spare
whose template ends (its socket closes) ends too. A request that may ask for a jail gets a
new spare without filters started: a jailed VMM starts them inside its jail.

The template dies with the daemon (PR_SET_PDEATHSIG); the VMs do not. It does not decide
anything: what to run is the daemon's business.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from kasou._sys.libc import set_thread_name

if TYPE_CHECKING:
    from kasou.jail.seccomp import Seccomp

__all__ = ["main"]

_BOOTED = b"B"  # written to the pipe of a VM whose vCPUs run (kasou.daemon._template)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_MAX_REQUEST = 1 << 20
_REFILL_DELAY = 0.005  # seconds after a launch before the next spare is forked
_MAX_PARKED = 8  # vCPU threads a spare starts ahead at most (a VM with more starts the rest)


# ``kasou run ARGV`` in a spare; the int (or None) is the fd it closes once its vCPUs run.
_Run = Callable[[list[str], int | None], int]


def _preload() -> tuple[_Run, Callable[[list[str]], _Guess]]:
    """Import what ``kasou run`` imports for a guest-kit VM and the default guest, and make
    what every VM would otherwise make again; return ``kasou run`` for the VMs to call, and
    what reads the guest RAM size and kernel from its arguments."""
    import encodings.ascii  # noqa: F401  (a codec looked up by name: imported on first use)

    import kasou.cli.fastrun
    import kasou.client.control
    import kasou.devices.virtio
    import kasou.errors
    import kasou.image
    import kasou.resources
    import kasou.vmm.agent
    import kasou.vmm.builder
    import kasou.vmm.control
    import kasou.vmm.runner
    import kasou.vmm.vm
    from kasou.jail.seccomp import Seccomp, SeccompError

    try:
        # libseccomp loaded, the allow-lists read, every call named, every program compiled:
        # once, for all VMs. Nothing starts here; each VM fills in its own values (its
        # reporter's pid and socket) and installs its filters (jail/seccomp.py).
        Seccomp.prepare(precompile=True)
    except SeccompError:
        pass  # each VM reports it when it starts its filters
    parse = kasou.cli.fastrun.parser()  # argparse's, built once: ~2 ms a VM saves
    with contextlib.suppress(kasou.errors.KasouError, OSError):  # each VM reports it
        # What every build makes alike, made once for all (its KVM VM closed again: a KVM
        # VM is its maker's process's).
        kasou.vmm.builder.rehearse()

    def run(argv: list[str], booted: int | None) -> int:
        # kasou.cli.fastrun.run_command, with the parser built above, and ``booted`` closed
        # once the VM's vCPUs run (a "B" written first), or at once for a VM that cannot
        # tell (the daemon waits for its end of the pipe: kasou.daemon._template).
        def started(running: bool) -> None:
            assert booted is not None
            with contextlib.suppress(OSError):  # the daemon gave up waiting
                if running:
                    os.write(booted, _BOOTED)
            os.close(booted)

        options = vars(parse.parse_args(argv))
        return kasou.cli.fastrun.run_vm(options, None if booted is None else started)

    def guess(argv: list[str]) -> _Guess:
        from kasou.memory import parse_size

        if not argv:  # no VM yet: nothing to go by
            return _Guess(None, None)
        try:
            options = vars(parse.parse_known_args(argv)[0])
            kernel = options.get("kernel")
            vcpus = options.get("vcpus")
            return _Guess(
                parse_size(str(options["memory"])),
                str(kernel) if kernel else None,
                min(vcpus, _MAX_PARKED) if isinstance(vcpus, int) and vcpus > 0 else 1,
            )
        except (ValueError, KeyError, SystemExit):
            return _Guess(None, None)

    return run, guess


class _Guess(NamedTuple):
    """What the next VM likely has, as the last one did (None: not known)."""

    memory: int | None
    kernel: str | None
    vcpus: int = 1


def _prepare_vm(guess: _Guess) -> None:
    """The next VM's KVM VM made, with the guest RAM, vCPUs and kernel it likely has
    (``kasou.vmm.builder.prepare``). No build is rehearsed here: that would take the CPU
    from the VM just launched (measured: a slower start for both, on two cores)."""
    from kasou.errors import KasouError
    from kasou.vmm.builder import prepare

    with contextlib.suppress(KasouError, OSError):  # the VM's own build reports it
        prepare(memory=guess.memory, kernel=guess.kernel, vcpus=guess.vcpus)


def _park_threads(guard: Seccomp, guess: _Guess) -> None:
    """The VM's event loop thread and its vCPU threads (as many as ``guess`` has) started
    ahead, filtered and waiting for their work (``Seccomp.park``); what the VM does not
    take waits unused until it ends."""
    from kasou.jail.seccomp import SeccompError

    with contextlib.suppress(SeccompError, RuntimeError):  # the VM starts its own, as usual
        guard.park("control")
        guard.park("vcpu", guess.vcpus)


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


def _become_vm(
    run: _Run, argv: list[str], directory: str, guard: Seccomp | None, booted: int | None
) -> NoReturn:
    """Runs in the spare once its request came: never returns."""
    status = 1
    try:
        os.chdir(directory)
        # Its scratch files (a restored disk's overlay, a seed) go in the VM's folder, which
        # kasoud removes with the VM, even after the VM process was killed.
        tempfile.tempdir = directory
        # ps and top show the VM by name (comm, 15 bytes), not as another template.
        set_thread_name(f"kasou-{os.path.basename(directory)}"[:15])
        log = os.open("stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        if guard is not None:
            guard.report_to(2)  # its reporter was forked with the template's log as fd 2
        status = run(argv, booted)
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
        if guard is not None:  # os._exit runs no atexit handler: reap the reporter here
            with contextlib.suppress(OSError):
                guard.close()
        os._exit(status & 0xFF)


def _wait_for_request(
    run: _Run,
    channel: socket.socket,
    seccomp: bool,
    ahead: Callable[[], _Guess] | None,
) -> NoReturn:
    """The spare's life until its request: what does not depend on the VM is done first
    (with ``seccomp``, the filters' reporter and spawner: ``Seccomp.start``, which ``kasou
    run`` then finds started; with ``ahead`` as well, the KVM VM made, with the guest RAM
    and kernel ``ahead()`` guesses, unless the request is there already), then it waits;
    it ends if the template's end of ``channel`` closes first."""
    guard = None
    try:
        mine = channel.fileno()
        os.setsid()
        set_thread_name("kasou-spare")  # in ps and top until it is a VM
        os.closerange(3, mine)  # the daemon's channel and the template's other fds
        os.closerange(mine + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if seccomp:
            from kasou.jail.seccomp import Seccomp, SeccompError

            with contextlib.suppress(SeccompError):  # kasou run tries again, and reports it
                guard = Seccomp.start()
        if seccomp and ahead is not None and not select.select([channel], [], [], 0)[0]:
            guess = ahead()
            if guard is not None:
                _park_threads(guard, guess)
            # After the filters' reporter was forked (it holds no KVM VM); not for a jailed
            # VMM, which opens /dev/kvm inside its jail.
            _prepare_vm(guess)
        request, fds, _, _ = socket.recv_fds(channel, _MAX_REQUEST, 1)
        booted = fds[0] if fds else None  # the template's own packet: one fd at most
        if not request:  # the template ended
            if guard is not None:
                guard.close()
            os._exit(0)
        fields = json.loads(request)  # the template's own packet: checked there
        channel.close()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    _become_vm(run, fields["argv"], fields["dir"], guard, booted)


class _Spare:
    """The next VM's process, forked (twice) before its request: see the module docstring."""

    def __init__(
        self,
        run: _Run,
        seccomp: bool = True,
        ahead: Callable[[], _Guess] | None = None,
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        read_end, write_end = os.pipe()
        try:
            middle = os.fork()
        except OSError:
            for fd in (read_end, write_end):
                os.close(fd)
            ours.close()
            theirs.close()
            raise
        if middle == 0:
            try:
                os.close(read_end)
                ours.close()
                spare = os.fork()
                if spare == 0:
                    os.close(write_end)
                    _wait_for_request(run, theirs, seccomp, ahead)
                os.write(write_end, str(spare).encode())
            finally:
                os._exit(0)
        theirs.close()
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            text = reader.read()
        os.waitpid(middle, 0)
        if not text:
            ours.close()
            raise OSError("the middle child ended without forking the VM")
        self.pid = int(text)
        self._channel = ours

    def launch(self, argv: list[str], directory: str, booted: int | None) -> None:
        """Make it the VM ``argv`` in ``directory``, passing it ``booted`` (OSError if it is
        gone)."""
        packet = json.dumps({"argv": argv, "dir": directory}).encode()
        try:
            socket.send_fds(self._channel, [packet], [] if booted is None else [booted])
        finally:
            self._channel.close()

    def close(self) -> None:
        """Let it end unused (its socket closes)."""
        self._channel.close()


class _Spares:
    """One spare kept ready; ``launch`` hands it a request, ``refill`` forks the next."""

    def __init__(self, run: _Run, guess: Callable[[list[str]], _Guess]) -> None:
        self._run = run
        self._guess = guess
        self._next: _Spare | None = None
        self._last: list[str] = []  # the last VM's arguments: the next is likely alike

    @property
    def pid(self) -> int | None:
        return self._next.pid if self._next is not None else None

    def refill(self) -> None:
        if self._next is None:
            try:
                # Forked ahead of its request: it has time to get the VM's build ready,
                # guessing the guest RAM and kernel are the last VM's (it reads them itself).
                last = self._last
                self._next = _Spare(self._run, ahead=lambda: self._guess(last))
            except OSError as error:  # the next request tries again, and reports it
                sys.stderr.write(f"kasou template: cannot fork a spare VM process: {error}\n")

    def launch(self, argv: list[str], directory: str, booted: int | None) -> int:
        """The pid of the process that now becomes the VM (it gets ``booted``)."""
        self._last = argv
        if _may_jail(argv):
            spare = _Spare(self._run, seccomp=False)
            try:
                spare.launch(argv, directory, booted)
            finally:
                spare.close()
            return spare.pid
        for attempt in range(2):
            spare, self._next = self._next or _Spare(self._run), None
            try:
                spare.launch(argv, directory, booted)
                return spare.pid
            except OSError:
                if attempt:  # a fresh spare failed too
                    raise
        raise AssertionError("unreachable")


def _may_jail(argv: list[str]) -> bool:
    """Whether ``argv`` may ask for a jail (``--jail`` or any abbreviation argparse takes):
    a jailed VMM starts its filters inside its jail, so it gets a spare that has none."""
    return any(word.startswith("--j") for word in argv)


def _answer(spares: _Spares, request: bytes, booted: int | None) -> dict[str, object]:
    try:
        fields = json.loads(request)
        argv, directory = fields["argv"], fields["dir"]
        if not isinstance(argv, list) or not all(isinstance(word, str) for word in argv):
            return {"error": "argv must be a list of strings"}
        if not isinstance(directory, str) or not os.path.isdir(directory):
            return {"error": f"{directory!r} is not a folder"}
        return {"pid": spares.launch(argv, directory, booted)}
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
    spares = _Spares(*_preload())
    gc.collect()
    gc.freeze()  # keep the collector off the pages the VMs share with the template
    spares.refill()
    channel.send(json.dumps({"ready": True, "spare": spares.pid}).encode())
    while True:
        if spares.pid is None:
            # The next spare is forked once the VM just launched had a head start (a fork
            # of this process beside it would slow its start), unless a request comes first.
            waiting, _, _ = select.select([channel], [], [], _REFILL_DELAY)
            if not waiting:
                spares.refill()
                channel.send(json.dumps({"spare": spares.pid}).encode())
                if spares.pid is None:  # cannot fork now: the next request tries again
                    waiting, _, _ = select.select([channel], [], [])
        request, fds, _, _ = socket.recv_fds(channel, _MAX_REQUEST, 1)
        if not request:  # the daemon closed its end
            return 0
        try:
            answer = _answer(spares, request, fds[0] if fds else None)
        finally:
            for fd in fds:  # the VM has its own copy now
                os.close(fd)
        answer["spare"] = spares.pid
        channel.send(json.dumps(answer).encode())


if __name__ == "__main__":
    sys.exit(main())
