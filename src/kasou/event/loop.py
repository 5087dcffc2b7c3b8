"""An epoll loop in one thread, woken by an eventfd for calls from other threads.

Handlers run on the loop thread, one at a time. A handler that raises is logged and
removed, so one misbehaving fd (a closed client socket, a device bug) cannot stop the loop
that every other device of the VM depends on.

Parking (for snapshots): ``park`` from another thread returns once the loop thread sits
inside a call of its own, between two handlers, and stays there until ``unpark``: while it
is parked no handler, timer or call runs, so the devices on the loop neither change their
state nor write guest RAM. Parks nest (a count); a loop that is not running has nothing to
park. Work that arrives meanwhile waits in the epoll set and the call queue.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from kasou._sys import set_thread_name
from kasou.errors import HostError

__all__ = ["EventLoop", "ParkedThread"]

log = logging.getLogger(__name__)

Handler = Callable[[int], None]  # called with the epoll event mask


class ParkedThread(Protocol):
    """A thread already started that waits for the one function it is to run (a seccomp
    filter already on it: ``kasou.jail.seccomp``, "Threads started ahead")."""

    @property
    def thread(self) -> threading.Thread: ...

    def run(self, target: Callable[[], object], name: str) -> None:
        """Run ``target`` on the thread, which is ``name`` from now on."""


class EventLoop:
    """epoll over fds with handlers; ``call_soon`` runs a function on the loop thread."""

    def __init__(
        self, name: str = "kasou-events", on_start: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        # Run first on the loop's thread, once it is named (a seccomp filter's installation).
        self.on_start = on_start
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._handlers: dict[int, Handler] = {}
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._epoll.register(self._wake, select.EPOLLIN)
        # Parking: ``_parks`` calls of ``park`` in force; each first park opens an epoch,
        # which the loop thread sits in (``_parked_in``) until unpark moves past it.
        self._park = threading.Condition()
        self._parks = 0
        self._park_epoch = 0
        self._parked_in = -1

    def add_reader(self, fd: int, handler: Handler, events: int = select.EPOLLIN) -> None:
        """Call ``handler(events)`` whenever ``fd`` is ready. Thread-safe."""
        self._handlers[fd] = handler
        self._epoll.register(fd, events)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (the caller still owns and closes it)."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: epoll dropped it by itself

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the loop thread at its next turn. Thread-safe."""
        self._calls.append(function)
        os.eventfd_write(self._wake, 1)

    def call_later(self, delay: float, function: Callable[[], None]) -> None:
        """Run ``function`` on the loop thread after ``delay`` seconds. Thread-safe."""
        when = time.monotonic() + delay
        self.call_soon(
            lambda: heapq.heappush(self._timers, (when, next(self._timer_order), function))
        )

    def start(self, parked: ParkedThread | None = None) -> None:
        """Run the loop in its own (daemon) thread: a new one, or ``parked``."""
        if parked is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            return
        self._thread = parked.thread
        parked.run(self._run, self.name)

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def park(self, timeout: float = 10.0) -> None:
        """Return once the loop thread is parked: waiting, between two handlers, until the
        matching ``unpark``. Nests: each ``park`` needs its ``unpark``. A loop that was never
        started or has stopped returns at once (and its ``unpark`` does nothing). Raises
        ``HostError`` if the loop does not get there within ``timeout`` seconds (a handler is
        stuck: a disk that does not answer), having undone this park; ``RuntimeError`` on the
        loop's own thread, which would wait for itself."""
        if self.in_loop_thread:
            raise RuntimeError(f"{self.name}: park() called on the loop's own thread")
        with self._park:
            if self._thread is None or self._stopping:
                return
            self._parks += 1
            if self._parks == 1:
                self._park_epoch += 1
                epoch = self._park_epoch
                self.call_soon(lambda: self._sit(epoch))
            if self._park.wait_for(self._parked_or_gone, timeout):
                return
            self._release_park()
        raise HostError(
            f"event loop {self.name} did not pause within {timeout:g} s: a device handler is "
            "still busy (a disk or socket not answering?); try again, or stop the VM"
        )

    def unpark(self) -> None:
        """Undo one ``park``; the loop runs on after the last one."""
        with self._park:
            if self._parks:
                self._release_park()

    def _release_park(self) -> None:
        self._parks -= 1
        if not self._parks:
            self._park_epoch += 1  # ends the epoch the loop sits in, or will never sit in
            self._park.notify_all()

    def _parked_or_gone(self) -> bool:
        return self._parked_in == self._park_epoch or self._stopping or self._thread is None

    def _sit(self, epoch: int) -> None:
        """The park itself, a call on the loop thread: wait while ``epoch`` lasts."""
        with self._park:
            if epoch != self._park_epoch:
                return  # unparked (or given up on) before the loop got here
            # running --park--> parked
            self._parked_in = epoch
            self._park.notify_all()
            while self._park_epoch == epoch and not self._stopping:
                self._park.wait()
            # parked --unpark--> running
            self._parked_in = -1

    def stop(self) -> None:
        """End the loop and wait for its thread; then release the epoll and eventfd."""
        with self._park:
            self._stopping = True  # a parked loop gets up and ends
            self._park.notify_all()
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)
            if not self.in_loop_thread:
                self._thread.join()
            self._thread = None
        if not self._epoll.closed:
            self._epoll.close()
            os.close(self._wake)

    def _run(self) -> None:
        set_thread_name(self.name)
        if self.on_start is not None:
            self.on_start()
        while not self._stopping:
            timeout = -1.0
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                ready = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            self._run_timers()
            for fd, events in ready:
                if fd == self._wake:
                    self._drain_calls()
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(events)
                except Exception:
                    log.exception("event handler for fd %d failed; it is removed", fd)
                    self.remove(fd)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, function = heapq.heappop(self._timers)
            self._call(function)

    def _call(self, function: Callable[[], None]) -> None:
        try:
            function()
        except Exception:
            log.exception("call on the event loop failed")

    def _drain_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._calls:
            self._call(self._calls.popleft())
