"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): one device's register page.

This module owns the registers a driver programs (feature negotiation, the status state
machine of §3.1.1, queue setup, config space, interrupt status and acknowledge) and hands a
configured device its queues when the driver sets DRIVER_OK. It does not do device work:
that is the device's, on its reactor.

Doorbells. Each queue has a notifier eventfd made here; the builder registers it with KVM as
an ioeventfd on QueueNotify with the queue's index as datamatch, so a guest's notification
never leaves the kernel. A QueueNotify write that still reaches this model (no ioeventfd
wired, as in unit tests) signals the same eventfd: the vCPU thread does no device work either
way.

The driver's writes are untrusted: control registers take only aligned 32-bit accesses
(§4.2.2.2; others read as 0 and are dropped); queue fields change only while the queue is not
ready and the driver is not running; FEATURES_OK sticks only for a subset of what the device
offers that includes VERSION_1 (§2.2, §6.1); status bits never go back but through a reset;
a bad queue configuration at DRIVER_OK marks the device NEEDS_RESET instead of starting it.

Snapshots. ``save`` returns a ``VirtioMmioState``: the registers, each queue's
``VirtqueueState`` and the device's own state (``VirtioDevice.save_state``). ``restore`` puts
one into a freshly built transport of the same kind of device, before the vCPUs run. The
state is untrusted, so it is checked whole before anything changes: the device type, every
register within its width, a status the state machine can reach (FEATURES_OK only with a
subset of the offered features that includes VERSION_1, DRIVER_OK only after FEATURES_OK, a
failure's reason only with NEEDS_RESET), and, for a running device (DRIVER_OK, no failure),
every ready queue through ``Virtqueue.check``; a failure is a ``SnapshotError`` naming the
device and the field. A running device is then started as at DRIVER_OK, with its rings'
indexes where they were; on its reactor every live queue is served once (the driver may have
made buffers available after the device last looked) and a pending interrupt is raised
again. A state without device state (``device`` None) leaves the device's own as built.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from kasou.devices.trigger import Trigger
from kasou.devices.virtio.device import BAD_CHAIN_LIMIT, VirtioDevice
from kasou.devices.virtio.queue import U32, U64, QueueError, Virtqueue, VirtqueueState
from kasou.devices.virtio.spec import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    MMIO_MAGIC,
    MMIO_VERSION,
    VENDOR_ID,
    Interrupt,
    Reg,
    Status,
)
from kasou.errors import SnapshotError
from kasou.memory import GuestMemory

__all__ = ["MMIO_SIZE", "NOTIFY_OFFSET", "VirtioMmio", "VirtioMmioState"]

log = logging.getLogger(__name__)

MMIO_SIZE = 0x1000
"""Bytes of MMIO space one transport takes: registers, then the config space at 0x100."""

NOTIFY_OFFSET = int(Reg.QUEUE_NOTIFY)

MAX_REASON = 4096
"""The longest NEEDS_RESET reason a snapshot keeps (characters; a longer one is cut)."""


@dataclass(frozen=True)
class VirtioMmioState:
    """One virtio-mmio transport as saved. Field names are a snapshot format contract.

    ``device_type`` is the virtio device id (§5); ``status`` the device status (§2.1);
    ``interrupt_status`` the InterruptStatus bits not yet acknowledged; ``broken`` why the
    device went NEEDS_RESET, if it did; ``device`` the device's own state
    (``VirtioDevice.save_state``)."""

    device_type: int
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    broken: str | None
    queues: tuple[VirtqueueState, ...]
    device: bytes | None


class VirtioMmio:
    """The register page of one virtio device (a ``BusDevice`` on the MMIO bus)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, trigger: Trigger) -> None:
        self.device = device
        self._memory = memory
        self._trigger = trigger
        self.queues = [Virtqueue(i, size) for i, size in enumerate(device.queue_sizes)]
        self.notifiers = [
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in device.queue_sizes
        ]
        self._irq_lock = threading.Lock()
        self.interrupt_status = 0
        self.interrupts = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        with self._irq_lock:
            self.interrupt_status = 0
        for queue in self.queues:
            queue.reset()

    def close(self) -> None:
        """Release the notifier eventfds and the rings' views (after the device is closed)."""
        for queue in self.queues:
            queue.release()
        for fd in self.notifiers:
            os.close(fd)
        self.notifiers = []

    # --- Interrupt, for the device (any thread) -----------------------------------------

    def signal_used(self, queue: Virtqueue) -> None:
        if queue.needs_interrupt():
            self._raise(Interrupt.USED_BUFFER)

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._raise(Interrupt.CONFIG_CHANGE)

    def needs_reset(self, reason: str) -> None:
        # §2.1.2: set NEEDS_RESET and, once the driver runs, send a config change notification.
        self.status |= Status.NEEDS_RESET
        if self.status & Status.DRIVER_OK:
            self.signal_config()

    def _raise(self, bit: int) -> None:
        with self._irq_lock:
            self.interrupt_status |= bit
        self.interrupts += 1
        self._trigger.trigger()

    # --- snapshots ----------------------------------------------------------------------

    def save(self) -> VirtioMmioState:
        """The transport, its queues and its device as they stand (the VM paused, the
        device's reactor parked)."""
        with self._irq_lock:
            interrupt_status = self.interrupt_status
        broken = self.device.broken
        return VirtioMmioState(
            device_type=int(self.device.device_type),
            status=int(self.status),
            device_features_sel=self.device_features_sel,
            driver_features_sel=self.driver_features_sel,
            driver_features=self.driver_features,
            queue_sel=self.queue_sel,
            interrupt_status=interrupt_status,
            config_generation=self.config_generation,
            broken=None if broken is None else broken[:MAX_REASON],
            queues=tuple(queue.save() for queue in self.queues),
            device=self.device.save_state(),
        )

    def restore(self, state: VirtioMmioState) -> None:
        """Take back a saved transport (see the module's docstring). Raises
        ``SnapshotError`` naming the device and the field; nothing is changed then."""
        name = self.device.name
        if self.status or self.device.active or any(queue.ready for queue in self.queues):
            raise SnapshotError(
                f"{name}: a snapshot is restored only into a freshly built device, and this "
                "one has been set up by a driver"
            )
        problem = self._check_state(state)
        if problem:
            raise SnapshotError(
                f"{name}: saved virtio-mmio state: {problem}: the snapshot is damaged or was "
                "taken of a VM with other devices"
            )
        if state.device is not None:
            self.device.load_state(state.device)
        # Checked: from here nothing fails.
        status = Status(state.status)
        running = _running(state)
        features = state.driver_features
        for queue, saved in zip(self.queues, state.queues, strict=True):
            queue.restore(
                saved,
                self._memory,
                live=running and saved.ready,
                event_idx=bool(features & F_EVENT_IDX),
                indirect=bool(features & F_INDIRECT_DESC),
            )
        self.status = status
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.driver_features = features
        self.queue_sel = state.queue_sel
        self.config_generation = state.config_generation
        with self._irq_lock:
            self.interrupt_status = state.interrupt_status
        self.device.driver_features = features
        self.device.broken = state.broken
        if not running:
            # Nothing to serve until the driver sets DRIVER_OK (after a reset, if the device
            # is NEEDS_RESET): what ``load_state`` kept for an activation goes.
            self.device.on_reset()
            return
        # transport restored --DRIVER_OK--> the device serves its queues again.
        self.device.activate(self._memory, self.queues, self.notifiers, self, features)
        self.device.reactor.call_soon(self._resume)

    def _resume(self) -> None:
        """On the device's reactor, after its activation: serve every live queue once and
        raise a pending interrupt again (its edge may not have reached the guest before the
        snapshot)."""
        device = self.device
        for queue in self.queues:
            if device.active and queue.live:
                device.run_queue(queue)
        with self._irq_lock:
            pending = self.interrupt_status
        if pending:
            self._trigger.trigger()

    def _check_state(self, state: VirtioMmioState) -> str:
        """What is wrong with ``state`` for this transport, as "field: problem", or ""."""
        device = self.device
        kind = state.device_type
        if type(kind) is not int or kind != device.device_type:
            return (
                f"device_type: {kind!r}, but this is a {device.device_type.name.lower()} "
                f"device ({int(device.device_type)})"
            )
        for field, top in (
            ("status", U32),
            ("device_features_sel", U32),
            ("driver_features_sel", U32),
            ("driver_features", U64),
            ("queue_sel", U32),
            ("interrupt_status", int(Interrupt.USED_BUFFER | Interrupt.CONFIG_CHANGE)),
            ("config_generation", U32),
        ):
            value = getattr(state, field)
            if type(value) is not int or not 0 <= value <= top:
                return f"{field}: {value!r} is not a number from 0 to {top:#x}"
        broken = state.broken
        if broken is not None and (type(broken) is not str or len(broken) > MAX_REASON):
            return f"broken: not a reason of at most {MAX_REASON} characters"
        if state.device is not None and type(state.device) is not bytes:
            return "device: not bytes"
        problem = self._check_status(state)
        if problem:
            return problem
        queues = state.queues
        if not isinstance(queues, tuple) or len(queues) != len(self.queues):
            count = len(queues) if isinstance(queues, tuple) else queues
            return f"queues: {count!r} saved, but this device has {len(self.queues)}"
        running = _running(state)
        for queue, saved in zip(self.queues, queues, strict=True):
            where = f"queues[{queue.index}]"
            if not isinstance(saved, VirtqueueState):
                return f"{where}: not a queue's state"
            problem = Virtqueue.check_state(saved, BAD_CHAIN_LIMIT)
            if problem:
                return f"{where}.{problem}"
            if running and saved.ready:
                # The driver started the device with this queue: it passed ``activate``.
                probe = Virtqueue(queue.index, queue.max_size)
                probe.size, probe.desc_addr = saved.size, saved.desc_addr
                probe.avail_addr, probe.used_addr = saved.avail_addr, saved.used_addr
                try:
                    probe.check(self._memory)
                except QueueError as error:
                    return f"{where}: {error}"
        return ""

    def _check_status(self, state: VirtioMmioState) -> str:
        """Whether the driver could have brought the status there (``_write_status``): bits
        only ever added, each step allowed by the one before (§3.1.1, §2.1.2). Unknown bits
        and NEEDS_RESET itself are the driver's to write, and are taken."""
        status, features = state.status, state.driver_features
        if features and not status & Status.DRIVER:
            return f"driver_features: {features:#x} without the DRIVER status bit"
        if status & Status.FEATURES_OK:
            offered = self.device.device_features
            if features & ~offered:
                return (
                    f"driver_features: {features:#x} has bits {features & ~offered:#x} this "
                    "device does not offer"
                )
            if not features & F_VERSION_1:
                return f"driver_features: {features:#x} lacks VERSION_1 under FEATURES_OK"
        if status & Status.DRIVER_OK and not status & Status.FEATURES_OK:
            return f"status: {status:#x} has DRIVER_OK without FEATURES_OK"
        # Once started, only a failure sets a reason, and it sets NEEDS_RESET with it.
        failed = status & Status.DRIVER_OK and state.broken is not None
        if failed and not status & Status.NEEDS_RESET:
            return f"status: {status:#x} lacks NEEDS_RESET for a device that failed"
        return ""

    # --- the bus ------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if offset >= Reg.CONFIG:
            config = self.device.config()
            start = offset - Reg.CONFIG
            chunk = config[start : start + len(data)]
            data[:] = chunk + b"\0" * (len(data) - len(chunk))
            return
        if len(data) != 4 or offset % 4:
            data[:] = bytes(len(data))
            return
        data[:] = self._register(offset).to_bytes(4, "little")

    def _register(self, offset: int) -> int:
        queue = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == Reg.MAGIC:
            return MMIO_MAGIC
        if offset == Reg.VERSION:
            return MMIO_VERSION
        if offset == Reg.DEVICE_ID:
            return int(self.device.device_type)
        if offset == Reg.VENDOR_ID:
            return VENDOR_ID
        if offset == Reg.DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return (self.device.device_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF
        if offset == Reg.QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == Reg.QUEUE_READY:
            return int(queue.ready) if queue is not None else 0
        if offset == Reg.INTERRUPT_STATUS:
            with self._irq_lock:
                return self.interrupt_status
        if offset == Reg.STATUS:
            return int(self.status)
        if offset == Reg.CONFIG_GENERATION:
            return self.config_generation
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return 0xFFFFFFFF  # §4.2.2: no shared memory region with the selected id
        if queue is not None and offset in _QUEUE_ADDRESSES:
            name, high = _QUEUE_ADDRESSES[offset]
            value: int = getattr(queue, name)
            return (value >> 32) if high else value & 0xFFFFFFFF
        return 0  # write-only or reserved

    def write(self, offset: int, data: memoryview) -> None:
        if offset >= Reg.CONFIG:
            if self.status & Status.DRIVER:
                self.device.write_config(offset - Reg.CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte write at %#x dropped", len(data), offset)
            return
        value = int.from_bytes(data, "little")
        if offset == Reg.QUEUE_NOTIFY:
            if value < len(self.notifiers) and self.status & Status.DRIVER_OK:
                os.eventfd_write(self.notifiers[value], 1)
        elif offset == Reg.INTERRUPT_ACK:
            with self._irq_lock:
                self.interrupt_status &= ~value
        elif offset == Reg.STATUS:
            self._write_status(value)
        elif offset == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == Reg.QUEUE_SEL:
            self.queue_sel = value
        else:
            self._write_queue(offset, value)

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1: features are set between DRIVER and FEATURES_OK, never after.
        if self.status & Status.FEATURES_OK or not self.status & Status.DRIVER:
            return
        if self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue(self, offset: int, value: int) -> None:
        if self.queue_sel >= len(self.queues):
            return
        queue = self.queues[self.queue_sel]
        if self.status & Status.DRIVER_OK:
            return  # §4.2.3.2: queues are set up before DRIVER_OK
        if offset == Reg.QUEUE_READY:
            queue.ready = bool(value & 1)
            return
        if queue.ready:
            return  # a live queue's layout does not change under the driver's feet
        if offset == Reg.QUEUE_NUM:
            queue.size = value
        elif offset in _QUEUE_ADDRESSES:
            name, high = _QUEUE_ADDRESSES[offset]
            current: int = getattr(queue, name)
            keep, value = (0xFFFFFFFF, value << 32) if high else (~0xFFFFFFFF, value)
            setattr(queue, name, (current & keep) | value)

    def _write_status(self, value: int) -> None:
        if value == 0:
            # §4.2.2.1: writing 0 resets the device.
            if self.status & Status.DRIVER_OK:
                self.device.reset()
            self._reset_registers()
            return
        old = int(self.status)
        kept = old & ~Status.NEEDS_RESET
        if value & kept != kept:
            log.debug("virtio-mmio: status %#x -> %#x clears bits; ignored", old, value)
            return
        new = Status(value | (old & Status.NEEDS_RESET))
        if new & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            offered = self.device.device_features
            accepted = self.driver_features
            if accepted & ~offered or not accepted & F_VERSION_1:
                new &= ~Status.FEATURES_OK  # §3.1.1 step 6: the driver reads it back
        if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            if not new & Status.FEATURES_OK:
                new &= ~Status.DRIVER_OK
            else:
                self.status = new
                self._activate()
                return
        self.status = new

    def _activate(self) -> None:
        features = self.driver_features
        try:
            for queue in self.queues:
                if queue.ready:
                    queue.activate(
                        self._memory,
                        event_idx=bool(features & F_EVENT_IDX),
                        indirect=bool(features & F_INDIRECT_DESC),
                    )
        except QueueError as error:
            log.warning("virtio-mmio %s: %s", self.device.name, error)
            self.device.broken = str(error)
            self.needs_reset(str(error))
            return
        self.device.activate(self._memory, self.queues, self.notifiers, self, features)


def _running(state: VirtioMmioState) -> bool:
    """Whether the saved device was serving: the driver set DRIVER_OK, and neither its
    activation nor anything since failed (a failure leaves its reason in ``broken``, which
    only the next activation clears)."""
    return bool(state.status & Status.DRIVER_OK) and state.broken is None


# Queue address registers: (Virtqueue attribute, whether it is the high half).
_QUEUE_ADDRESSES = {
    int(Reg.QUEUE_DESC_LOW): ("desc_addr", False),
    int(Reg.QUEUE_DESC_HIGH): ("desc_addr", True),
    int(Reg.QUEUE_DRIVER_LOW): ("avail_addr", False),
    int(Reg.QUEUE_DRIVER_HIGH): ("avail_addr", True),
    int(Reg.QUEUE_DEVICE_LOW): ("used_addr", False),
    int(Reg.QUEUE_DEVICE_HIGH): ("used_addr", True),
}
