"""The serial console on the host side: the terminal, a file, a Unix socket, or nothing.

On a terminal, stdin is put in raw mode so the guest's shell sees every key, and restored on
every way out (normal end, an error, a signal, ``atexit``). Ctrl-A X quits, as in QEMU;
Ctrl-A Ctrl-A sends one Ctrl-A to the guest. Input the UART's FIFO cannot take yet waits
here and is retried; nothing typed is dropped.

Guest output to stdout is written by a thread of its own (``_Output``): a terminal or pipe
that does not keep up (a pager, a reader that stopped reading) never blocks the vCPU that
wrote the byte. Up to ``OUTPUT_BACKLOG`` bytes wait for it; beyond that, output is dropped.

On a socket (``sock:PATH[,log=FILE]``, ``_SocketConsole``) the listener and its clients live
on the runner's event loop, non-blocking. A vCPU only appends output to a buffer; the loop
takes what gathered there within ``FLUSH_DELAY`` (a UART writes a byte per exit), appends it
to the log file (a reader tailing the log sees a line at once) and to each client's queue,
and sends what the client takes. Every client gets the bytes written from the moment it
connects, no history (the log has that). A client that does not keep up loses what exceeds
``CLIENT_BACKLOG`` (counted); it never slows the guest or the other clients. What any client
sends is the UART's input, raw (no Ctrl-A escapes), fed with the same retry as stdin; while
input waits for room in the UART no client is read, so a fast sender fills its own socket
buffer. The socket file (0600) is removed at the end, if it is still the one made here.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import termios
import threading
import tty
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from kasou.errors import ConfigError
from kasou.event import EventLoop
from kasou.vmm.config import ConsoleConfig

__all__ = ["Console", "SerialInput"]

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

CTRL_A = 0x01
RETRY_SECONDS = 0.005


class SerialInput(Protocol):
    """What the console feeds: the UART's receive side."""

    def enqueue_input(self, data: bytes) -> int: ...


READ_SIZE = 4096
OUTPUT_BACKLOG = 1 << 20  # bytes of guest output that may wait for a slow stdout
OUTPUT_DRAIN_SECONDS = 2.0  # how long closing waits for what is still queued
CLIENT_BACKLOG = 256 << 10  # bytes of output that may wait for one socket client
MAX_CLIENTS = 32  # socket clients at once; more are turned away
FLUSH_DELAY = 0.002  # seconds of socket-console output gathered into one write


class _Output:
    """Bytes for fd 1, written by a (daemon) thread started on the first write."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._ready = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dropped = 0  # bytes that found the backlog full

    def write(self, data: bytes) -> None:
        """Queue ``data`` (called on a vCPU thread; never blocks on stdout)."""
        with self._ready:
            if self._closed or self._queued + len(data) > OUTPUT_BACKLOG:
                self.dropped += len(data)
                return
            self._chunks.append(data)
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kasou-console-out", daemon=True
                )
                self._thread.start()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._chunks or self._closed)
                if not self._chunks:
                    return
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._queued = 0
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(1, view) :]
            except BlockingIOError:
                pass  # a non-blocking stdout that is full: this output is lost
            except OSError:
                with self._ready:  # the reader went away (EPIPE): drop from now on
                    self._closed = True
                return

    def close(self) -> None:
        """Write what is queued (waiting at most ``OUTPUT_DRAIN_SECONDS``), then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(OUTPUT_DRAIN_SECONDS)


class _Client:
    """One socket client: its connection and the output waiting for it."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.fd = connection.fileno()
        self.pending = bytearray()  # output the socket has not taken yet
        self.registered = False  # in the loop's epoll set (with ``events``, maybe 0)
        self.events = 0
        self.eof = False  # it sent all it will (shutdown or close): read no more
        self.hung_up = False  # closed for good: send no more; what it sent is still read


class _SocketConsole:
    """COM1 on a Unix socket (see the module docstring). Output comes from any thread
    (``write``); everything else runs on the loop given to ``attach``, and ``close`` once
    that loop has stopped, as ``vmm.runner.run`` does."""

    def __init__(self, config: ConsoleConfig) -> None:
        from kasou.event.unix import listen_unix  # sockets: only for a socket console

        assert config.path is not None
        self.path = config.path
        self._log_fd: int | None = None
        if config.log is not None:
            try:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                self._log_fd = os.open(config.log, flags, 0o600)
            except OSError as error:
                raise ConfigError(
                    "console", f"cannot open the log {config.log}: {error.strerror}"
                ) from None
        try:
            self._listener = listen_unix(self.path, "console")
        except BaseException:
            self._close_log()
            raise
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)  # so close() removes only our socket
        self._lock = threading.Lock()  # guards _out, _flush_armed, _loop, _closed
        self._out = bytearray()  # output not yet handed to the log and the clients
        self._flush_armed = False
        self._closed = False
        self._loop: EventLoop | None = None
        self._serial: SerialInput | None = None
        self._input = b""  # what a client sent that the UART has not taken yet
        self._retry_armed = False
        self._clients: dict[int, _Client] = {}
        self._log_failed = False
        self._dropped_behind = 0  # output the loop did not take in time (under _lock)
        self._dropped_clients = 0  # output that found a client's backlog full (loop only)

    # --- output: a vCPU thread queues, the loop writes ---

    def write(self, data: bytes) -> None:
        """Queue guest output (called on a vCPU thread; never blocks on a client)."""
        with self._lock:
            if self._closed:
                return
            if len(self._out) + len(data) > OUTPUT_BACKLOG:
                self._dropped_behind += len(data)  # the loop is stuck: drop, do not grow
                return
            self._out += data
            loop = self._loop if not self._flush_armed else None
            if loop is not None:
                self._flush_armed = True
        if loop is not None:
            # A guest writes COM1 a byte per exit: gather what comes in FLUSH_DELAY.
            loop.call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        with self._lock:
            data = bytes(self._out)
            self._out.clear()
            self._flush_armed = False
        if data:
            self._write_log(data)
            for client in list(self._clients.values()):
                self._queue(client, data)

    def _write_log(self, data: bytes) -> None:
        if self._log_fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._log_fd, view) :]
        except OSError as error:
            if not self._log_failed:  # once: a full disk would repeat it for every line
                log.warning("console log: %s; output is lost until it works", error.strerror)
            self._log_failed = True

    def _queue(self, client: _Client, data: bytes) -> None:
        if client.hung_up:
            return
        room = CLIENT_BACKLOG - len(client.pending)
        if len(data) > room:
            self._dropped_clients += len(data) - room
            data = data[:room]
        client.pending += data
        if not client.events & select.EPOLLOUT:  # else the loop sends once it has room
            self._send(client)
            self._update(client)

    def _send(self, client: _Client) -> None:
        """Give ``client`` what its socket takes now (the rest waits for EPOLLOUT)."""
        if not client.pending:
            return
        try:
            sent = client.connection.send(client.pending)
        except BlockingIOError:
            return
        except OSError:  # the client went away (EPIPE, ECONNRESET)
            self._drop(client)
            return
        del client.pending[:sent]

    # --- clients ---

    def attach(self, loop: EventLoop, serial: SerialInput) -> None:
        """Serve clients on ``loop`` and feed ``serial`` (again after a reboot: the same
        loop, a new UART; input not yet taken by the old one is dropped)."""
        with self._lock:
            first = self._loop is None
            self._loop = loop
            flush = bool(self._out) and not self._flush_armed
            if flush:
                self._flush_armed = True
        loop.call_soon(lambda: self._attach(loop, serial, first))
        if flush:  # output written before the loop was known
            loop.call_soon(self._flush)

    def _attach(self, loop: EventLoop, serial: SerialInput, first: bool) -> None:
        self._serial = serial
        self._input = b""
        if first:
            loop.add_reader(self._listener.fileno(), self._on_accept)
        self._update_all()

    def _on_accept(self, events: int) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:  # out of fds: clients wait in the listen backlog
                log.warning("console socket: cannot accept a client: %s", error.strerror)
                return
            if len(self._clients) >= MAX_CLIENTS:
                connection.close()
                continue
            connection.setblocking(False)
            client = _Client(connection)
            self._clients[client.fd] = client
            self._update(client)

    def _update(self, client: _Client) -> None:
        """Watch ``client`` for what it can do now: be read while the UART takes input,
        be written while output waits for it. A client with neither stays watched with an
        empty mask, which still reports its hang-up (epoll_ctl(2): EPOLLHUP is always
        reported), unless it has hung up already: that would repeat forever."""
        if self._loop is None or self._clients.get(client.fd) is not client:
            return
        wanted = 0
        if not client.eof and not self._input:
            wanted |= select.EPOLLIN
        if client.pending and not client.hung_up:
            wanted |= select.EPOLLOUT
        register = bool(wanted) or not client.hung_up
        if register == client.registered and wanted == client.events:
            return
        if client.registered:
            self._loop.remove(client.fd)
        if register:
            self._loop.add_reader(client.fd, lambda events: self._on_client(client, events), wanted)
        client.registered, client.events = register, wanted

    def _update_all(self) -> None:
        for client in list(self._clients.values()):
            self._update(client)

    def _on_client(self, client: _Client, events: int) -> None:
        if events & (select.EPOLLHUP | select.EPOLLERR):
            client.hung_up = True  # what it sent before is still read, as the UART takes it
            client.pending.clear()
        if events & select.EPOLLOUT and not client.hung_up:
            self._send(client)
        if events & select.EPOLLIN and not client.eof and not self._input:
            self._receive(client)
        if self._clients.get(client.fd) is not client:
            return
        if client.eof and client.hung_up:
            self._drop(client)
        else:
            self._update(client)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.connection.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            client.eof = True  # it may still read: output goes on until it closes
            return
        self._input = data
        self._give()

    def _give(self) -> None:
        """Hand waiting input to the UART; retry in ``RETRY_SECONDS`` while it has no room.
        Clients are read again once it took everything."""
        if self._serial is not None and self._input:
            taken = self._serial.enqueue_input(self._input)
            self._input = self._input[taken:]
        if self._input and self._loop is not None and not self._retry_armed:
            self._retry_armed = True  # one retry at a time, across a reboot's attach too
            self._loop.call_later(RETRY_SECONDS, self._retry)
        self._update_all()

    def _retry(self) -> None:
        self._retry_armed = False
        self._give()

    def _drop(self, client: _Client) -> None:
        """Forget ``client`` quietly: it went away, or it is closed with the console."""
        if self._clients.get(client.fd) is not client:
            return
        del self._clients[client.fd]
        if client.registered and self._loop is not None:
            self._loop.remove(client.fd)
        client.registered = False
        client.connection.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def dropped(self) -> int:
        """Output bytes some client did not get (its backlog was full, or the loop was far
        behind, which the log misses too)."""
        with self._lock:
            return self._dropped_behind + self._dropped_clients

    # --- the end ---

    def close(self) -> None:
        """Hand the last output to the log (and, if they take it at once, the clients),
        close every client and the listener, and remove the socket file. Call it once the
        loop has stopped. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            data = bytes(self._out)
            self._out.clear()
        if data:
            self._write_log(data)
        for client in list(self._clients.values()):
            if not client.hung_up:
                client.pending += data
                self._send(client)  # what its socket takes now; the loop is gone
            self._drop(client)
        if self._loop is not None:
            self._loop.remove(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None


class Console:
    """COM1's host end for one ``kasou run`` (it outlives guest reboots)."""

    def __init__(self, config: ConsoleConfig, on_quit: Callable[[], None]) -> None:
        self.config = config
        self._on_quit = on_quit
        self._file: BinaryIO | None = None
        self._saved_tty: list[Any] | None = None
        self._escape = False
        self._pending = b""
        self._serial: SerialInput | None = None
        self._loop: EventLoop | None = None
        # How stdin is read: "poll" (a terminal, pipe or socket: epoll says when), "file" (a
        # regular file or /dev/null, which epoll refuses: read as the UART takes input), or
        # None once it reached its end. While input waits for room in the UART, stdin is not
        # watched, so a paste cannot spin the event loop.
        self._source: str | None = None
        self._watching = False
        if config.kind == "file" and config.path is not None:
            self._file = open(config.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self.interactive = config.kind == "stdio" and os.isatty(0)
        self._output = _Output() if config.kind == "stdio" else None
        self._socket = _SocketConsole(config) if config.kind == "sock" else None

    def write(self, data: bytes) -> None:
        """Guest output (called on a vCPU thread, from the UART's THR write)."""
        if self._output is not None:
            self._output.write(data)
        elif self._socket is not None:
            self._socket.write(data)
        elif self._file is not None:
            self._file.write(data)

    def counters(self) -> dict[str, int]:
        """A socket console's clients now and the output bytes some client missed."""
        if self._socket is None:
            return {"clients": 0, "dropped": 0}
        return {"clients": self._socket.clients, "dropped": self._socket.dropped}

    def attach(self, loop: EventLoop, serial: SerialInput) -> None:
        """Start feeding host input to ``serial`` from ``loop`` (again after a reboot)."""
        if self._socket is not None:
            self._socket.attach(loop, serial)
            return
        self._serial = serial
        self._pending = b""
        if self._loop is loop:
            loop.call_soon(self._refill)
            return
        self._loop = loop
        if self.config.kind != "stdio":
            return
        if self.interactive and self._saved_tty is None:
            self._saved_tty = termios.tcgetattr(0)
            atexit.register(self.restore)
            tty.setraw(0)
        os.set_blocking(0, False)
        self._source = "poll"
        try:
            self._watch(True)
        except PermissionError:
            self._source = "file"
            loop.call_soon(self._refill)

    def _watch(self, on: bool) -> None:
        if self._loop is None or on == self._watching:
            return
        if on:
            self._loop.add_reader(0, self._on_stdin)
        else:
            self._loop.remove(0)
        self._watching = on

    def _on_stdin(self, events: int) -> None:
        self._read()

    def _read(self) -> None:
        try:
            data = os.read(0, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._close_stdin()
            return
        if self.interactive:
            data = self._filter_escapes(data)
        self._pending = data
        self._watch(False)
        self._feed()

    def _refill(self) -> None:
        """The UART took everything: read on."""
        if self._source == "poll":
            self._watch(True)
        elif self._source == "file":
            self._read()

    def _filter_escapes(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X")):
                    self._on_quit()
                    return bytes(out)
                out.append(byte)  # Ctrl-A Ctrl-A (or any other key) passes the key on
            elif byte == CTRL_A:
                self._escape = True
            else:
                out.append(byte)
        return bytes(out)

    def _feed(self) -> None:
        if self._serial is None:
            return
        if self._pending:
            taken = self._serial.enqueue_input(self._pending)
            self._pending = self._pending[taken:]
        if self._pending:
            if self._loop is not None:
                self._loop.call_later(RETRY_SECONDS, self._feed)
        else:
            self._refill()

    def _close_stdin(self) -> None:
        self._watch(False)
        self._source = None

    def restore(self) -> None:
        """Give the terminal back as it was. Safe to call more than once."""
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved_tty)
            except termios.error:
                pass
            self._saved_tty = None
        if self.config.kind == "stdio":
            try:
                os.set_blocking(0, True)
            except OSError:
                pass

    def close(self) -> None:
        self._close_stdin()
        if self._output is not None:
            self._output.close()  # the guest's last words, before the terminal is restored
        self.restore()
        if self._socket is not None:
            self._socket.close()
        if self._file is not None:
            self._file.close()
            self._file = None
