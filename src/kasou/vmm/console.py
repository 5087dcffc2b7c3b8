"""The serial console on the host side: the terminal, a file, or nothing.

On a terminal, stdin is put in raw mode so the guest's shell sees every key, and restored on
every way out (normal end, an error, a signal, ``atexit``). Ctrl-A X quits, as in QEMU;
Ctrl-A Ctrl-A sends one Ctrl-A to the guest. Input the UART's FIFO cannot take yet waits
here and is retried; nothing typed is dropped.

Guest output to stdout is written by a thread of its own (``_Output``): a terminal or pipe
that does not keep up (a pager, a reader that stopped reading) never blocks the vCPU that
wrote the byte. Up to ``OUTPUT_BACKLOG`` bytes wait for it; beyond that, output is dropped.
"""

from __future__ import annotations

import atexit
import os
import termios
import threading
import tty
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from kasou.event import EventLoop
from kasou.vmm.config import ConsoleConfig

__all__ = ["Console", "SerialInput"]

CTRL_A = 0x01
RETRY_SECONDS = 0.005


class SerialInput(Protocol):
    """What the console feeds: the UART's receive side."""

    def enqueue_input(self, data: bytes) -> int: ...


READ_SIZE = 4096
OUTPUT_BACKLOG = 1 << 20  # bytes of guest output that may wait for a slow stdout
OUTPUT_DRAIN_SECONDS = 2.0  # how long closing waits for what is still queued


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

    def write(self, data: bytes) -> None:
        """Guest output (called on a vCPU thread, from the UART's THR write)."""
        if self._output is not None:
            self._output.write(data)
        elif self._file is not None:
            self._file.write(data)

    def attach(self, loop: EventLoop, serial: SerialInput) -> None:
        """Start feeding host input to ``serial`` from ``loop`` (again after a reboot)."""
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
        if self._file is not None:
            self._file.close()
            self._file = None
