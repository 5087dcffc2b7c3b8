"""``GET``/``PUT /v1/vms/{name}/files?path=P``: one file read from or written into a running
guest, through its agent (``kasou.client.agent``, on the VM's vsock socket ``api.sock.vsock``).

A read runs ``cat -- P`` in the guest and a write ``cat > P``, so the guest's own permissions
apply and kasoud never parses a guest file system. Both hold the whole file in a spooled
temporary file (in memory up to 1 MiB, then on disk), bounded by the API's 256 MiB body
limit. Directories and trees are ``kasou cp``'s work (tar through the agent), not this.

Needs the guest agent: the default guest has it; a guest without it gives 502 guest.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO

from kasou.client.agent import open_session
from kasou.errors import ConfigError, GuestError

__all__ = ["MAX_FILE", "read_guest_file", "write_guest_file"]

MAX_FILE = 256 << 20
_SPOOL = 1 << 20
_TIMEOUT = 120.0
_STDERR_KEPT = 4096


def _check_path(path: str) -> None:
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise ConfigError("path", f"{path!r} is not an absolute guest path: give one like /tmp/x")


def _vsock(api_sock: Path) -> Path:
    return Path(f"{api_sock}.vsock")


def read_guest_file(api_sock: Path, path: str) -> IO[bytes]:
    """The guest file ``path``, as a file rewound to its start (the caller closes it)."""
    _check_path(path)
    # Handed to the caller open, to stream from; closed here on every failure.
    data = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115
    errors = bytearray()
    size = 0

    def keep(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > MAX_FILE:
            raise GuestError(f"{path} is over {MAX_FILE} bytes: copy it with kasou cp")
        data.write(piece)

    try:
        with open_session(_vsock(api_sock), timeout=_TIMEOUT) as session:
            status = session.exec(
                ["cat", "--", path],
                stdout=keep,
                stderr=lambda piece: errors.extend(piece[: _STDERR_KEPT - len(errors)]),
                timeout=_TIMEOUT,
                forward_signals=False,
            )
    except BaseException:
        data.close()
        raise
    if status != 0:
        data.close()
        reason = errors.decode(errors="replace").strip() or f"cat exited with {status}"
        raise GuestError(f"cannot read {path} in the guest: {reason}")
    data.seek(0)
    return data


def write_guest_file(api_sock: Path, path: str, content: IO[bytes]) -> int:
    """Write ``content`` (read to its end) to the guest file ``path``; return its size."""
    _check_path(path)
    start = content.tell()
    content.seek(0, 2)
    size = content.tell() - start
    content.seek(start)
    errors = bytearray()
    with open_session(_vsock(api_sock), timeout=_TIMEOUT) as session:
        # The path is an argument, never part of the shell text: no quoting to get wrong.
        status = session.exec(
            ["sh", "-c", 'cat > "$1"', "sh", path],
            stdin=content,
            stderr=lambda piece: errors.extend(piece[: _STDERR_KEPT - len(errors)]),
            timeout=_TIMEOUT,
            forward_signals=False,
        )
    if status != 0:
        reason = errors.decode(errors="replace").strip() or f"sh exited with {status}"
        raise GuestError(f"cannot write {path} in the guest: {reason}")
    return size
