"""Listening Unix sockets for kasou's servers: the control socket, vsock's host side, the
virtio-console's second port.

``listen_unix`` owns the rules every one of them follows: a stale socket file (nobody listens
there any more) is replaced, a live one or a file that is not a socket is refused with a
``ConfigError`` naming the option, and the socket appears at its path only once it listens
(bound under a temporary name, then renamed), so a client that sees the path can connect at
once. It does not accept or serve connections.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from kasou.errors import ConfigError

__all__ = ["listen_unix"]


def listen_unix(path: Path, field: str, *, backlog: int = 8) -> socket.socket:
    """A non-blocking listening socket at ``path`` (mode 0600). ``field`` is the option the
    user gave the path with, for errors (``api-sock``, ``vsock``)."""
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(field, f"{path} exists and is not a socket: choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens there any more
        else:
            raise ConfigError(field, f"{path} is in use by another process: choose another path")
        finally:
            probe.close()
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(staging))
        os.chmod(staging, 0o600)
        listener.listen(backlog)
        listener.setblocking(False)
        os.rename(staging, path)
    except OSError as error:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise ConfigError(field, f"cannot listen on {path}: {error.strerror}") from error
    return listener
