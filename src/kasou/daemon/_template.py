"""The daemon's side of the warm template (``kasou.cli.template``): start it, ask it to fork
VMs, stop it.

The template is a subprocess (``sys.executable -m kasou.cli.template``), so the daemon never
imports the CLI; the two talk over a ``SOCK_SEQPACKET`` socket pair, one JSON packet per
request and per answer. Requests are serialised by a lock: a fork takes a few milliseconds.
A template that died is started again at the next request.

What a VM does once forked, and how its end is seen, are ``kasou.cli.template``'s and
``_process``'s business. The template keeps a spare process for the next VM and names it in
its packets; once the template has gone, that spare ends too and is reaped here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from kasou.daemon._process import readable
from kasou.errors import HostError

__all__ = ["BOOTED", "Template"]

BOOTED = b"B"  # what a VM writes to the pipe ``spawn`` passes on once its vCPUs run

_READY_TIMEOUT = 60.0  # the template's imports; generous for a loaded host
_SPAWN_TIMEOUT = 30.0
_REAP_TIMEOUT = 5.0


class Template:
    """One warm template process; ``spawn`` returns the pid of a new VM process."""

    def __init__(self, log_path: Path) -> None:
        self._log_path = log_path
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._ready = False
        self._spare: int | None = None  # the process the template forked for the next VM

    def start(self) -> None:
        """Start the template without waiting for its imports (``spawn`` waits)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        env = dict(os.environ)
        source = str(Path(__file__).resolve().parents[2])  # the folder holding kasou/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
        with open(self._log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "kasou.cli.template",
                        str(theirs.fileno()),
                        str(os.getpid()),
                    ],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            except OSError as error:
                ours.close()
                raise HostError(f"cannot start the VM template: {error}") from error
            finally:
                theirs.close()
        self._channel = ours
        self._ready = False

    def _receive(self, timeout: float) -> dict[str, object]:
        """The next answer; the spare's pid is taken from it and from the notices of a new
        spare (``{"spare": N}`` alone) that come before it."""
        assert self._channel is not None
        self._channel.settimeout(timeout)
        while True:
            try:
                packet = self._channel.recv(1 << 16)
            except OSError as error:
                raise HostError(f"the VM template did not answer: {error}") from error
            if not packet:
                raise HostError(f"the VM template ended: see {self._log_path}")
            answer: dict[str, object] = json.loads(packet)
            spare = answer.get("spare")
            self._spare = spare if isinstance(spare, int) else None
            if answer.keys() - {"spare"}:
                return answer

    def _drain(self) -> None:
        """Tell the template to end and take the notices it sends until it has: the last
        names the spare to reap."""
        assert self._channel is not None
        with contextlib.suppress(OSError, ValueError, HostError):
            self._channel.shutdown(socket.SHUT_WR)  # the template's recv sees the end
            while True:
                self._receive(_REAP_TIMEOUT)  # raises HostError once the template ended

    def _stop(self) -> None:
        if self._channel is not None:
            self._drain()
            self._channel.close()
            self._channel = None
        if self._process is not None:
            try:
                self._process.wait(5.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._spare is not None:
            _reap(self._spare)
            self._spare = None

    def spawn(self, argv: list[str], directory: Path, booted: int | None = None) -> int:
        """Fork ``kasou run ARGV`` in ``directory``; return its pid. ``booted``, the write
        end of a pipe, is passed on to the VM (the caller closes its own copy), which
        writes ``BOOTED`` to it and closes it once it is built and its vCPUs run, or closes
        it at once when it cannot tell (``--jail``, ``--incoming``); its end comes too when
        the VM ends. Waiting for it takes nothing from the VM's start, where a look at its
        control socket would take a CPU and its interpreter's lock."""
        with self._lock:
            for attempt in range(2):
                if self._process is None or self._process.poll() is not None:
                    self._stop()
                    self._start()
                try:
                    if not self._ready:
                        self._receive(_READY_TIMEOUT)
                        self._ready = True
                    assert self._channel is not None
                    packet = json.dumps({"argv": argv, "dir": str(directory)}).encode()
                    socket.send_fds(self._channel, [packet], [] if booted is None else [booted])
                    answer = self._receive(_SPAWN_TIMEOUT)
                    break
                except (HostError, OSError):
                    self._stop()  # a dead or stuck template: one more try with a new one
                    if attempt:
                        raise
        pid = answer.get("pid")
        if not isinstance(pid, int):
            raise HostError(f"the VM template could not start the VM: {answer.get('error')}")
        return pid

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        with self._lock:
            self._stop()


def _reap(pid: int) -> None:
    """Reap the template's unused spare, which ends once the template has ended (its socket
    closes): a child of this process, a child subreaper (prctl(2)), or else init's."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone and reaped already
    try:
        readable(pidfd, _REAP_TIMEOUT)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    finally:
        os.close(pidfd)
