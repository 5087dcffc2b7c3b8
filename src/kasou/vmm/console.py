"""The serial console on the host side: the terminal, a file, or nothing.

On a terminal, stdin is put in raw mode so the guest's shell sees every key, and restored on
every way out (normal end, an error, a signal, ``atexit``). Ctrl-A X quits, as in QEMU;
Ctrl-A Ctrl-A sends one Ctrl-A to the guest. Input the UART's FIFO cannot take yet waits
here and is retried; nothing typed is dropped.
"""

from __future__ import annotations

import atexit
import os
import termios
import tty
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


def _read_all(fd: int, limit: int = 1 << 20) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


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
        self._stdin_open = False
        if config.kind == "file" and config.path is not None:
            self._file = open(config.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self.interactive = config.kind == "stdio" and os.isatty(0)

    def write(self, data: bytes) -> None:
        """Guest output (called on a vCPU thread, from the UART's THR write)."""
        if self.config.kind == "stdio":
            try:
                os.write(1, data)
            except (BlockingIOError, BrokenPipeError):
                pass  # a reader that went away must not stop the guest
        elif self._file is not None:
            self._file.write(data)

    def attach(self, loop: EventLoop, serial: SerialInput) -> None:
        """Start feeding host input to ``serial`` from ``loop`` (again after a reboot)."""
        self._serial = serial
        self._pending = b""
        if self._loop is loop and self._stdin_open:
            return
        self._loop = loop
        if self.config.kind != "stdio":
            return
        if self.interactive and self._saved_tty is None:
            self._saved_tty = termios.tcgetattr(0)
            atexit.register(self.restore)
            tty.setraw(0)
        os.set_blocking(0, False)
        self._stdin_open = True
        try:
            loop.add_reader(0, self._on_stdin)
        except PermissionError:
            # A regular file or /dev/null: epoll refuses it. Its contents are all there
            # already, so they are queued at once and fed as the UART takes them.
            self._stdin_open = False
            self._pending = _read_all(0)
            loop.call_soon(self._feed)

    def _on_stdin(self, events: int) -> None:
        if self._pending:
            return  # still waiting for room in the UART; the retry timer reads on
        try:
            data = os.read(0, 256)
        except BlockingIOError:
            return
        if not data:
            self._close_stdin()
            return
        if self.interactive:
            data = self._filter_escapes(data)
        self._pending = data
        self._feed()

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
        if self._serial is None or not self._pending:
            return
        taken = self._serial.enqueue_input(self._pending)
        self._pending = self._pending[taken:]
        if self._pending and self._loop is not None:
            self._loop.call_later(RETRY_SECONDS, self._feed)

    def _close_stdin(self) -> None:
        if self._stdin_open and self._loop is not None:
            self._loop.remove(0)
        self._stdin_open = False

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
        self.restore()
        if self._file is not None:
            self._file.close()
            self._file = None
