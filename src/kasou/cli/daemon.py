"""``kasoud``: the host daemon's process, serving ``kasou.api`` over a Unix socket and,
optionally, over TCP with a bearer token and TLS.

The Unix socket (default ``/run/kasou/kasoud.sock``) is created mode 0660 in a 0755
directory: who may open it may drive every VM, so no token is asked there. A stale socket
left by a kasoud that died is replaced; one that still answers is refused ("kasoud already
runs on PATH"). The TCP listener needs ``--token-file`` (and takes ``--tls-cert``/
``--tls-key``).

SIGTERM or SIGINT stops serving and closes the daemon; the VMs keep running (each is its own
process) and the next kasoud re-attaches to them, so kasoud can be restarted or upgraded
under running VMs. With ``--shutdown-vms``, SIGTERM first shuts every VM down within
``--shutdown-deadline`` seconds (host shutdown).

Slow or stalled clients: a request whose head, or a body gone silent, has not arrived
within ``--read-timeout`` seconds is cut off (``_kasoud_http``), an idle keep-alive
connection after 5 s, a request head over 16 KiB is refused; none holds a worker thread.

Heavy imports (FastAPI, uvicorn, the daemon) happen after the arguments are parsed, so
``kasoud --help`` answers at once. This module owns the process (sockets, signals, logging),
not the routes (``kasou.api``) or the VMs (``kasou.daemon``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kasou.errors import ConfigError, HostError, KasouError

if TYPE_CHECKING:
    import uvicorn

    from kasou.daemon import Daemon

__all__ = ["DEFAULT_SOCKET", "DEFAULT_STATE_DIR", "main"]

DEFAULT_SOCKET = Path("/run/kasou/kasoud.sock")
DEFAULT_STATE_DIR = Path("/var/lib/kasou")
_SOCKET_MODE = 0o660
_GRACE = 3  # seconds open requests (event streams, consoles) get once serving stops
_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
_MAX_HEAD = 16 << 10  # bytes of a request's head (request line and headers)
_BACKLOG = 1024  # connections waiting to be accepted (capped by net.core.somaxconn)

log = logging.getLogger("kasou.kasoud")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kasoud",
        description="kasou's host daemon: runs and watches VMs, serves the REST API.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where VMs' records and runtime files live (default %(default)s)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="the API's Unix socket, mode 0660 (default %(default)s)",
    )
    parser.add_argument("--tcp", metavar="HOST:PORT", help="also serve on TCP (needs --token-file)")
    parser.add_argument(
        "--token-file", type=Path, help="file holding the bearer token TCP clients must send"
    )
    parser.add_argument("--tls-cert", type=Path, help="TLS certificate (PEM) for --tcp")
    parser.add_argument("--tls-key", type=Path, help="TLS private key (PEM) for --tcp")
    parser.add_argument(
        "--shutdown-vms",
        action="store_true",
        help="on SIGTERM, shut every VM down too (host shutdown); otherwise VMs keep running",
    )
    parser.add_argument(
        "--shutdown-deadline",
        type=float,
        default=30.0,
        help="seconds --shutdown-vms gives the VMs before stopping them (default %(default)s)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request head (or a stalled body) has not arrived "
        "within this (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what kasoud logs to stderr (default %(default)s)",
    )
    parser.add_argument(
        "--print-openapi",
        action="store_true",
        help="write the API's OpenAPI schema (JSON) to stdout and exit",
    )
    return parser


def _tcp_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--tcp", f"{value!r} is not HOST:PORT: give one like 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise ConfigError("--token-file", f"cannot read {path}: {error.strerror}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(
            "--token-file",
            f"{path} must hold one token of at least 16 characters without spaces "
            "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe())')",
        )
    return token


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.read_timeout <= 3600:
        raise ConfigError("--read-timeout", "give seconds between 0 and 3600, e.g. 10")
    if args.tcp is None:
        for flag, value in (
            ("--token-file", args.token_file),
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
        ):
            if value is not None:
                raise ConfigError(flag, "only means something with --tcp HOST:PORT")
        return
    if args.token_file is None:
        raise ConfigError("--tcp", "a TCP listener needs --token-file: clients must authenticate")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert", "TLS needs both --tls-cert and --tls-key")


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0660, its directory made (0755) if missing.
    A socket file nobody answers on is replaced; one that answers means another kasoud."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise HostError(
                f"{path} exists and is not a socket: remove it or pick another --socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its kasoud is gone
        else:
            raise HostError(f"kasoud already runs on {path}: stop it first or use another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bound under a umask that keeps it closed to others from its first moment.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, _SOCKET_MODE)
        sock.listen(_BACKLOG)
    except OSError as error:
        sock.close()
        raise HostError(f"cannot listen on {path}: {error.strerror}") from error
    sock.setblocking(False)
    return sock


def _print_openapi() -> int:
    from kasou.api import create_app

    # The schema comes from the routes alone; no daemon is asked anything while building it.
    app = create_app(cast("Daemon", None))
    json.dump(app.openapi(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _servers(daemon: Daemon, args: argparse.Namespace) -> list[uvicorn.Server]:
    import uvicorn

    from kasou.api import create_app
    from kasou.cli._kasoud_http import with_read_timeout

    class Server(uvicorn.Server):
        # kasoud handles SIGTERM/SIGINT itself, once for both listeners; uvicorn's own
        # handlers would re-raise the signal after serving and kill the process before the
        # daemon is closed.
        def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
            return contextlib.nullcontext()

    common: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": _GRACE,
        "lifespan": "off",
        "ws_max_size": 1 << 20,
        # Slow or stalled clients: a connection idle between requests closes after
        # timeout_keep_alive; one stalled inside a request after --read-timeout (uvicorn
        # has no such timeout: _kasoud_http adds it); a request head over 16 KiB is 400.
        "http": with_read_timeout(args.read_timeout),
        "timeout_keep_alive": _KEEP_ALIVE,
        "h11_max_incomplete_event_size": _MAX_HEAD,
        "backlog": _BACKLOG,
    }
    servers: list[uvicorn.Server] = [Server(uvicorn.Config(create_app(daemon), **common))]
    if args.tcp is not None:
        host, port = _tcp_address(args.tcp)
        app = create_app(daemon, token=_read_token(args.token_file))
        tls: dict[str, Any] = {}
        if args.tls_cert is not None:
            tls = {"ssl_certfile": str(args.tls_cert), "ssl_keyfile": str(args.tls_key)}
        servers.append(Server(uvicorn.Config(app, host=host, port=port, **common, **tls)))
    return servers


async def _serve(servers: list[uvicorn.Server], unix: socket.socket) -> tuple[int, float]:
    """Serve until SIGTERM or SIGINT; return that signal's number and when it came
    (``time.monotonic()``)."""
    loop = asyncio.get_running_loop()
    received: list[tuple[int, float]] = []

    def stop(number: int) -> None:
        received.append((number, time.monotonic()))
        for server in servers:
            if server.should_exit:
                server.force_exit = True  # a second signal: do not wait for open requests
            server.should_exit = True

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop, number)
    try:
        await asyncio.gather(
            servers[0].serve(sockets=[unix]), *(server.serve() for server in servers[1:])
        )
    finally:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)
    return received[0] if received else (0, time.monotonic())


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.tcp is not None:
        _tcp_address(args.tcp)
        _read_token(args.token_file)
    from kasou.daemon import Daemon

    unix = bind_unix(args.socket)
    try:
        daemon = Daemon.open(args.state_dir)
    except BaseException:
        unix.close()
        args.socket.unlink(missing_ok=True)
        raise
    try:
        servers = _servers(daemon, args)
        log.info("kasoud serving on %s%s", args.socket, f" and {args.tcp}" if args.tcp else "")
        number, when = asyncio.run(_serve(servers, unix))
        if number == signal.SIGTERM and args.shutdown_vms:
            # The deadline counts from SIGTERM: closing the API's connections took some of it.
            left = max(1.0, args.shutdown_deadline - (time.monotonic() - when))
            log.info("host shutdown: stopping every VM within %.1f s", left)
            daemon.host_shutdown(left)
    finally:
        daemon.close()
        with contextlib.suppress(OSError):
            unix.close()
        args.socket.unlink(missing_ok=True)
    log.info("kasoud stopped; running VMs carry on")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kasoud`` console script."""
    args = _parser().parse_args(argv)
    if args.print_openapi:
        return _print_openapi()
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s kasoud %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _run(args)
    except KasouError as error:
        sys.stderr.write(f"kasoud: error: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
