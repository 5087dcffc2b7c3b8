"""``kasou exec`` and ``kasou cp``: commands run in the guest, files copied in and out, through
the guest agent.

Both ask the VM's control socket for its status first. Where it names a vsock device, they
talk to the agent over vsock (``kasou.client.agent``): output streams as the command writes
it, stdin is forwarded (when it is not a terminal, or with ``-i``), SIGINT/SIGTERM/SIGHUP go
to the command, and ``-t`` gives it a terminal. Without vsock, ``kasou exec`` falls back to the
control socket's ``exec`` over COM2 (output at the end, stdin read whole, no terminal) and
``kasou cp`` says it needs vsock.

The typer commands in ``cli/app.py`` parse the options and call these; errors are raised as
``KasouError`` for app.py to print as one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from kasou.errors import ConfigError

__all__ = ["cp_command", "exec_command"]

READY_TIMEOUT_S = 30.0
"""How long a command waits for the guest's agent to listen (a guest still booting)."""

COM2_TIMEOUT_S = 60.0
"""``--timeout``'s default over COM2, where a command cannot be interrupted otherwise."""


def _status(sock: Path) -> dict[str, Any]:
    """The VM's status, once it has a VM to describe: while one is being built (the first
    moments of ``kasou run``, a reboot) the status is only ``{"state": "booting"}``."""
    import time

    from kasou.client import ControlClient

    deadline = time.monotonic() + READY_TIMEOUT_S
    with ControlClient(sock) as client:
        status = client.request("status")
        while status.get("state") == "booting" and time.monotonic() < deadline:
            time.sleep(0.1)  # nothing announces the VM's creation: ask again
            status = client.request("status")
    return status


def _vsock_uds(status: dict[str, Any]) -> Path | None:
    """The Unix socket of the VM's vsock device, if the VM's status names one."""
    vsock = status.get("vsock")
    if isinstance(vsock, dict) and isinstance(vsock.get("uds"), str):
        return Path(vsock["uds"])
    return None


def _open_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def exec_command(
    sock: Path, command: list[str], *, timeout: float | None, interactive: bool, tty: bool
) -> int:
    """Run ``command`` in the guest of the VM at control socket ``sock``; return its status."""
    uds = _vsock_uds(_status(sock))
    if uds is None:
        return _exec_over_com2(sock, command, timeout=timeout, interactive=interactive, tty=tty)
    from kasou.client.agent import open_session

    # -t implies -i; without either, stdin goes along unless it is the user's terminal.
    forward = _open_fd(0) and (interactive or tty or not os.isatty(0))
    env = {"TERM": os.environ["TERM"]} if tty and os.environ.get("TERM") else None
    sys.stdout.flush()
    sys.stderr.flush()
    with open_session(uds, timeout=READY_TIMEOUT_S) as session:
        return session.exec(
            command,
            stdin=0 if forward else None,
            stdout=1,
            stderr=2,
            tty=tty,
            env=env,
            timeout=timeout,
        )


def _exec_over_com2(
    sock: Path, command: list[str], *, timeout: float | None, interactive: bool, tty: bool
) -> int:
    from kasou.client import ControlClient

    if tty:
        raise ConfigError(
            "tty", "-t needs the VM's vsock device (kasou run --vsock cid=N,uds=PATH)"
        )
    read = sys.stdin is not None and (interactive or not sys.stdin.isatty())
    stdin = sys.stdin.read() if read else ""
    with ControlClient(sock) as client:
        result = client.execute(command, stdin=stdin, timeout=timeout or COM2_TIMEOUT_S)
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    return int(result["status"])


def cp_command(sock: Path, paths: list[str]) -> int:
    """``kasou cp SRC... DEST``: guest paths are written ``:PATH``; either every source is in
    the guest (a copy to the host) or the destination is (a copy to the guest)."""
    if len(paths) < 2:
        raise ConfigError("cp", "name a source and a destination, like ./dir :/root/")
    *sources, dest = paths
    to_guest = dest.startswith(":")
    if to_guest and any(source.startswith(":") for source in sources):
        raise ConfigError(
            "cp", "copy from the host into the guest or back, not from guest to guest"
        )
    if not to_guest and not all(source.startswith(":") for source in sources):
        raise ConfigError(
            "cp",
            "one side must be the guest: write guest paths as :PATH "
            "(a host name starting with ':' as ./:NAME)",
        )
    uds = _vsock_uds(_status(sock))
    if uds is None:
        raise ConfigError("cp", "kasou cp needs the VM's vsock device (kasou run --vsock ...)")
    from kasou.client.agent import open_session
    from kasou.client.copy import copy_from_guest, copy_to_guest

    with open_session(uds, timeout=READY_TIMEOUT_S) as session:
        if to_guest:
            copy_to_guest(session, [Path(source) for source in sources], dest[1:])
        else:
            copy_from_guest(session, [source[1:] for source in sources], dest)
    return 0
