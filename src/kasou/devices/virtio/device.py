"""The shape every virtio device has, and its glue to an event loop.

A virtio device here is a subclass of ``VirtioDevice``: its id, queue sizes, feature bits and
config space, and ``process(queue)`` that pops chains, does the work and pushes them back.
The transport (``mmio.py``) owns the registers and calls ``activate`` when the driver sets
DRIVER_OK and ``reset`` when it writes 0 to the status.

Where the work runs. A device never runs on a vCPU thread. It is given a ``Reactor`` (the
VM's event loop, or a loop of its own: the builder decides, see docs/design.md) and, on
activation, registers each queue's notifier (an eventfd that KVM signals for the guest's
QueueNotify write: ioeventfd) and its own backend fds there. Used buffers reach the guest
through ``Interrupt`` (an irqfd behind it). So a doorbell never wakes Python on a vCPU.

Snapshots. The transport saves and restores what every device has (registers, queues);
``save_state`` and ``load_state`` carry what a device keeps beyond that, as a frozen
dataclass of plain data encoded by ``kasou.persist``. A snapshot is untrusted input, so
``load_state`` checks every field and raises ``SnapshotError`` naming the device and the
field, before it changes anything. What belongs to one activation (chains the device held,
a handshake's progress) waits in the device until ``on_activate`` takes it back; a device the
restore does not start drops it in ``on_reset``. Chains a device held are saved as their
heads and walked again (``Virtqueue.walk``); a head that no longer makes a chain goes back
to the driver unused, as any malformed chain does.

Faults. A malformed chain fails that request (``bad_chain`` returns it to the driver
unused); a driver that keeps sending them, or that breaks a ring, gets the device marked
NEEDS_RESET (§2.1.2) and the device stops until the driver resets it. A backend failure
fails the request with the device's own error status. No guest input raises out of a
handler.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from kasou.devices.virtio.queue import Chain, ChainError, RingError, Virtqueue
from kasou.devices.virtio.spec import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, DeviceType
from kasou.errors import SnapshotError
from kasou.memory import GuestMemory
from kasou.persist import decode_state

__all__ = ["BAD_CHAIN_LIMIT", "Interrupt", "Reactor", "VirtioDevice"]

log = logging.getLogger(__name__)

BAD_CHAIN_LIMIT = 64
"""Malformed chains a device forgives between two resets before it goes NEEDS_RESET."""

S = TypeVar("S")


class Reactor(Protocol):
    """An event loop as a device sees it (``kasou.event.EventLoop`` is one)."""

    def add_reader(
        self, fd: int, handler: Callable[[int], None], events: int = select.EPOLLIN
    ) -> None: ...

    def remove(self, fd: int) -> None: ...

    def call_soon(self, function: Callable[[], None]) -> None: ...

    def call_later(self, delay: float, function: Callable[[], None]) -> None: ...


class Interrupt(Protocol):
    """The transport's side of a device's interrupt and status (``mmio.py``)."""

    def signal_used(self, queue: Virtqueue) -> None:
        """Interrupt the driver for ``queue`` if it wants one (event idx, flags)."""

    def signal_config(self) -> None:
        """Tell the driver the config space changed."""

    def needs_reset(self, reason: str) -> None:
        """Mark the device NEEDS_RESET and tell the driver."""


class VirtioDevice:
    """A virtio device model; subclasses set the class attributes and ``process``."""

    device_type: ClassVar[DeviceType]
    name: str = "virtio"  # for messages; the builder names each instance (block0, net1)

    def __init__(self, reactor: Reactor, queue_sizes: Sequence[int], features: int = 0) -> None:
        self.reactor = reactor
        self.queue_sizes = tuple(queue_sizes)
        # Every kasou device is modern and handles indirect chains and event idx.
        self.device_features = features | F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
        self.driver_features = 0
        self.active = False
        self.broken: str | None = None  # why the device went NEEDS_RESET
        self.memory: GuestMemory | None = None
        self.queues: Sequence[Virtqueue] = ()
        self.interrupt: Interrupt | None = None
        self._watched: list[int] = []
        self._generation = 0  # activations so far: a late start of an old one does nothing

    # --- the transport's calls (vCPU thread, under the bus's device lock) ---------------

    def config(self) -> bytes:
        """The device-specific config space (§4.2.2: at offset 0x100 of the transport)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into the config space; read-only by default (ignored)."""

    def activate(
        self,
        memory: GuestMemory,
        queues: Sequence[Virtqueue],
        notifiers: Sequence[int],
        interrupt: Interrupt,
        features: int,
    ) -> None:
        """Start serving: the driver set DRIVER_OK with ``features`` accepted."""
        self.memory = memory
        self.queues = queues
        self.interrupt = interrupt
        self.driver_features = features
        self.broken = None
        self.active = True
        self._generation += 1
        generation = self._generation
        self.reactor.call_soon(lambda: self._started(generation, notifiers))

    def reset(self) -> None:
        """The driver reset the device: stop serving; ``activate`` may come again."""
        self.active = False
        self._generation += 1
        self.reactor.call_soon(self._stopped)
        self.on_reset()

    def close(self) -> None:
        """The VM is going away: release the backend (called once, after the vCPUs stop)."""
        self.active = False
        self._generation += 1  # a start still queued on the reactor does nothing
        self._unwatch(self._watched)
        self._watched = []

    # --- snapshots (the device quiesced: its reactor parked, the vCPUs paused) ------------

    def save_state(self) -> bytes | None:
        """What the device keeps beyond the transport's state, encoded with
        ``kasou.persist.encode_state``; ``None`` (the default) when it keeps nothing. Cannot
        fail."""
        return None

    def load_state(self, data: bytes) -> None:
        """Take back what ``save_state`` returned, on a freshly built device, before the
        transport starts it again. Raises ``SnapshotError`` naming the device and the field,
        having changed nothing."""
        raise SnapshotError(
            f"{self.name}: the snapshot has {len(data)} bytes of device state, but this device "
            "keeps none: the snapshot is damaged or was taken of another kind of device"
        )

    def decode_state(self, data: bytes, kind: type[S]) -> S:
        """``data`` decoded as a ``kind`` (shape and types checked; ``SnapshotError``)."""
        return decode_state(data, kind, what=self.name)

    def state_error(self, field: str, problem: str) -> SnapshotError:
        """The error for a saved device state whose ``field`` is wrong."""
        return SnapshotError(
            f"{self.name}: saved device state: {field}: {problem}: the snapshot is damaged"
        )

    def check_heads(self, field: str, heads: Sequence[int], queue: int) -> None:
        """Refuse (``state_error``) a saved list of held chains that cannot be: a head that
        is not a descriptor index of queue ``queue`` at its largest, or one head twice."""
        limit = self.queue_sizes[queue]
        for head in heads:
            if not 0 <= head < limit:
                raise self.state_error(field, f"head {head} is not below the queue's {limit}")
        if len(set(heads)) != len(heads):
            raise self.state_error(field, "a head held twice")

    def held_chains(self, queue: Virtqueue, heads: Sequence[int]) -> list[Chain]:
        """The chains at ``heads`` walked again (on the reactor, once the device is live);
        one that is malformed now goes back to the driver unused, and a head the restored
        queue is too small for is dropped (it cannot be the driver's)."""
        chains = []
        for head in heads:
            if head >= queue.size:
                log.warning(
                    "%s: held head %d is beyond queue %d; dropped", self.name, head, queue.index
                )
                continue
            try:
                chains.append(queue.walk(head))
            except ChainError as error:
                self.bad_chain(queue, error.with_traceback(None))
        return chains

    # --- for subclasses -----------------------------------------------------------------

    def on_activate(self) -> None:
        """Runs on the reactor once the device is live: register backend fds here."""

    def on_reset(self) -> None:
        """Runs on the reset's thread: forget per-activation state."""

    def process(self, queue: Virtqueue) -> None:
        """Serve what the driver made available on ``queue`` (on the reactor thread)."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """Per-device figures for the control socket's device list."""
        return {}

    def held_back(self) -> bool:
        """Whether ``process`` stopped for a rate limit and a timer will run the queue
        again (``run_queue`` then stops too); never, by default."""
        return False

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features & bit)

    def watch(self, fd: int, handler: Callable[[int], None], events: int = select.EPOLLIN) -> None:
        """Register a backend fd for as long as the device is active."""
        self._watch(fd, handler, events)

    def unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.remove(fd)
            self.reactor.remove(fd)

    def bad_chain(self, queue: Virtqueue, error: ChainError) -> None:
        """Return a malformed chain unused; past ``BAD_CHAIN_LIMIT`` the device gives up."""
        # The message, not the exception: its traceback holds views of guest RAM, which a
        # kept log record would keep alive past the VM's close.
        log.warning("%s: %s", self.name, str(error))
        queue.push(error.head, 0)
        queue.bad_chains += 1
        if queue.bad_chains > BAD_CHAIN_LIMIT:
            self.fail(f"more than {BAD_CHAIN_LIMIT} malformed chains on queue {queue.index}")

    def chains(self, queue: Virtqueue) -> Iterator[Chain]:
        """The chains the driver made available, while the device is active; malformed ones
        are returned to the driver (``bad_chain``) on the way."""
        while self.active:
            try:
                chain = queue.pop()
            except ChainError as error:
                self.bad_chain(queue, error)
                continue
            if chain is None:
                return
            yield chain

    def fail(self, reason: str) -> None:
        """Stop the device and mark it NEEDS_RESET (the driver must reset it)."""
        if not self.active:
            return
        log.warning("%s: needs reset: %s", self.name, reason)
        self.active = False
        self.broken = reason
        if self.interrupt is not None:
            self.interrupt.needs_reset(reason)

    def signal(self, queue: Virtqueue) -> None:
        if self.interrupt is not None:
            self.interrupt.signal_used(queue)

    def run_queue(self, queue: Virtqueue) -> None:
        """Run ``process`` until the driver has nothing more, with notifications off
        while working (§2.7.7 and §2.7.10), and a broken ring turning into NEEDS_RESET."""
        if not self.active or not queue.live:
            return
        try:
            while True:
                queue.disable_notifications()
                self.process(queue)
                # A throttled device (devices/ratelimit.py) leaves notifications off: its
                # timer, not the driver, brings it back.
                if not self.active or self.held_back() or not queue.enable_notifications():
                    break
        except RingError as error:
            self.fail(str(error))
            return
        except Exception as error:  # a device bug: this device stops, the VM goes on
            message = f"internal error: {type(error).__name__}: {error}"
        else:
            return
        # Outside the handler, as text: the exception's frames hold views of guest RAM.
        log.error("%s: %s", self.name, message)
        self.fail(message)

    # --- internals ----------------------------------------------------------------------

    def _notified(self, index: int, fd: int) -> Callable[[int], None]:
        queue = self.queues[index]
        generation = self._generation

        def handler(events: int) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass  # another handler turn already drained it
            # After a reset and a new activation, this handler may run once more before
            # ``_stopped`` takes it away: the new activation's ``_started`` serves the queue.
            if generation == self._generation:
                self.run_queue(queue)

        return handler

    def _started(self, generation: int, notifiers: Sequence[int]) -> None:
        if not self.active or generation != self._generation:
            return
        for queue, fd in zip(self.queues, notifiers, strict=True):
            if queue.live:
                self._watch(fd, self._notified(queue.index, fd))
        self.on_activate()
        # Chains made available before DRIVER_OK, or while the notifier was not yet watched.
        for queue in self.queues:
            if queue.live and queue.has_available():
                self.run_queue(queue)

    def _stopped(self) -> None:
        # Runs before the ``_started`` of any later activation (the reactor keeps order).
        watched, self._watched = self._watched, []
        self._unwatch(watched)

    def _watch(self, fd: int, handler: Callable[[int], None], events: int = select.EPOLLIN) -> None:
        self._watched.append(fd)
        self.reactor.add_reader(fd, handler, events)

    def _unwatch(self, fds: Sequence[int]) -> None:
        for fd in fds:
            self.reactor.remove(fd)
