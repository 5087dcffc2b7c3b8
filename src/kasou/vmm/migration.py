"""Live migration: a running VM sent to another kasou over TCP or a Unix socket.

The source (``Migration``, started by the control socket's ``migrate`` request) copies guest
RAM while the guest runs (pre-copy), then pauses it and sends what is left with every
device's state; the destination (``run_incoming``, ``kasou run --incoming URL``) builds the
VM from them and runs it. The stream is frames (``kasou.persist``: kind, length, CRC-32)::

    source                                   destination
    hello, CONFIG (config, layout)  ──▶      checks the config, allocates RAM, opens disks
                                    ◀──      ACK (or ERROR: the source runs on)
    PAGES ... (round 0: every non-zero page; then the pages dirtied during the last round,
               KVM's dirty log with the devices' writes, vmm/dirty.py)
    -- the guest is paused: the last dirty pages, DISK (scratch disks), STATE (sections)
                                    ◀──      READY (the VM is built, not started)
    GO                              ──▶      starts the vCPUs
                                    ◀──      RUNNING
    DONE; the source VM ends        ──▶      runs on

Rounds go on while the pages left would take longer to send than the downtime target
(``downtime``, default 300 ms) at the bandwidth measured. A guest that dirties memory faster
than the link carries is throttled (auto-converge): its vCPUs are made to sleep a growing
share of each 10 ms slice (20 %, then 10 % more per round, at most 99 %), as QEMU does.

Faults. Until RUNNING arrives the source can always go back: any error, a dropped link or a
cancel resumes the guest as it was. The destination runs nothing before GO, and stops the
VM it started if DONE does not follow RUNNING (the link dropped in between): both sides end
with one running VM, the source's, in every case but a link lost after DONE was sent. The
destination treats the stream as untrusted: every frame is CRC-checked and bounded, every
page address must lie inside guest RAM.

Downtime is measured on the source as the gap in guest execution: from the pause to the
destination's RUNNING (one network round trip more than the true gap).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasou.errors import ConfigError, KasouError, MigrationError, SnapshotError
from kasou.memory import GuestMemory, PageBitmap
from kasou.persist import (
    check_stream_hello,
    decode_state,
    encode_state,
    frame_header,
    pack_sections,
    read_frame,
    stream_hello,
    unpack_sections,
)
from kasou.vmm.config import DiskConfig, NetConfig, VsockConfig
from kasou.vmm.lifecycle import VmState
from kasou.vmm.vcpu import ExitKind, GuestExit
from kasou.vmm.vm import Vm

if TYPE_CHECKING:
    from kasou.vmm.dirty import DirtyTracker

__all__ = ["Migration", "MigrationPlan", "parse_url", "run_incoming"]

log = logging.getLogger(__name__)

CONFIG, ACK, PAGES, DISK, STATE, READY, GO, RUNNING, DONE, ERROR = range(1, 11)
PAGE_SIZE = 4096
BATCH = 4 << 20  # bytes of pages in one frame
_RUN = struct.Struct("<QIB")  # guest-physical address, pages, kind (0 data, 1 zeros)
_DATA, _ZEROS = 0, 1
MAX_ROUNDS = 30
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 60.0  # the destination's answer to CONFIG and STATE (it builds the VM)
THROTTLE_SLICE = 0.010
THROTTLE_START, THROTTLE_STEP, THROTTLE_MAX = 0.20, 0.10, 0.99


def parse_url(url: str) -> tuple[int, Any]:
    """``tcp://HOST:PORT`` or ``unix:PATH`` as (address family, address)."""
    if url.startswith("unix:") and len(url) > len("unix:"):
        return socket.AF_UNIX, url[len("unix:") :]
    if url.startswith("tcp://"):
        host, _, port = url[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return family, (host, int(port))
    raise ConfigError("url", f"{url!r}: give tcp://HOST:PORT or unix:PATH")


class _Channel:
    """Frames over a connected stream socket; a closed or failed link is a MigrationError."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.sent = 0
        self.received = 0

    def send(self, kind: int, payload: bytes | memoryview = b"") -> None:
        try:
            self.sock.sendall(frame_header(kind, payload))
            if len(payload):
                self.sock.sendall(payload)
        except OSError as error:
            raise MigrationError(
                f"the link to {self.peer} failed: {error.strerror or error}"
            ) from None
        self.sent += len(payload) + 9

    def receive(self, timeout: float | None = None) -> tuple[int, bytes]:
        self.sock.settimeout(timeout)
        try:
            kind, payload = read_frame(self._exactly)
        except TimeoutError:
            raise MigrationError(f"{self.peer} did not answer within {timeout:.0f} s") from None
        except OSError as error:
            raise MigrationError(
                f"the link to {self.peer} failed: {error.strerror or error}"
            ) from None
        self.received += len(payload) + 9
        if kind == ERROR:
            raise MigrationError(f"{self.peer}: {payload.decode(errors='replace')}")
        return kind, payload

    def expect(self, kind: int, timeout: float | None = None) -> bytes:
        got, payload = self.receive(timeout)
        if got != kind:
            raise MigrationError(f"{self.peer} sent frame {got} where {kind} was due")
        return payload

    def _exactly(self, size: int) -> bytes:
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            count = self.sock.recv_into(view[done:])
            if count == 0:
                raise MigrationError(f"{self.peer} closed the connection")
            done += count
        return bytes(data)

    def close(self) -> None:
        self.sock.close()


# --- the source --------------------------------------------------------------------------


class Migration:
    """Sends ``vm`` to ``url``; ``start`` runs it in a thread, ``progress`` reports it."""

    def __init__(
        self,
        vm: Vm,
        url: str,
        *,
        downtime: float = 0.3,
        extra: Callable[[], Mapping[str, bytes]] | None = None,
    ) -> None:
        if vm.state is not VmState.RUNNING:
            raise MigrationError(f"the VM is {vm.state.value}: only a running VM migrates")
        self.family, self.address = parse_url(url)
        self.vm = vm
        self.url = url
        self._extra = extra  # the owner's sections, sent with the VM's (the agent channel)
        self.downtime_target = downtime
        self.phase = "connecting"
        self.round = 0
        self.pages_sent = 0
        self.bytes_sent = 0
        self.dirty_pages = 0
        self.dirty_rate = 0.0  # bytes per second the guest dirtied in the last round
        self.bandwidth = 0.0  # bytes per second sent in the last round
        self.expected_downtime = 0.0
        self.throttle = 0.0
        self.throttle_max = 0.0  # the most the guest was slowed down, for the report
        self.downtime = 0.0
        self.error: str | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._cancelled = threading.Event()
        # Set once a client has read the final progress: the source's kasou waits a moment
        # for that before it exits, so `kasou migrate` gets the figures.
        self.reported = threading.Event()
        self._committed = False  # GO was sent: too late to cancel
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._throttler: threading.Thread | None = None

    def start(self, on_done: Callable[[], None] = lambda: None) -> None:
        def main() -> None:
            try:
                self._run()
            except BaseException as error:  # every failure leaves the VM running
                self.error = str(error) if isinstance(error, KasouError) else repr(error)
                if self._cancelled.is_set():
                    self.phase, self.error = "cancelled", "cancelled; the VM runs on here"
                else:
                    self.phase = "failed"
                if not isinstance(error, KasouError):
                    log.exception("migration to %s failed", self.url)
            finally:
                self.finished = time.monotonic()
                on_done()

        self._thread = threading.Thread(target=main, name="kasou-migrate", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self) -> bool:
        """Abandon the migration (the VM runs on here); False once it cannot be."""
        if self.finished is not None or self._committed:
            return False
        self._cancelled.set()
        sock = self._socket
        if sock is not None:
            # A send blocked on a slow or stalled link returns at once with an error.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def progress(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        if self.finished is not None:
            self.reported.set()
        return {
            "url": self.url,
            "phase": self.phase,
            "round": self.round,
            "memory": self.vm.memory.size,
            "pages_sent": self.pages_sent,
            "bytes_sent": self.bytes_sent,
            "dirty_pages": self.dirty_pages,
            "dirty_rate": round(self.dirty_rate),
            "bandwidth": round(self.bandwidth),
            "expected_downtime": round(self.expected_downtime, 4),
            "downtime_target": self.downtime_target,
            "throttle": round(self.throttle, 2),
            "throttle_max": round(self.throttle_max, 2),
            "downtime": round(self.downtime, 4),
            "seconds": round(end - self.started, 3),
            "error": self.error,
        }

    def _check_cancel(self) -> None:
        if self._cancelled.is_set():
            raise MigrationError("cancelled; the VM runs on here")

    def _run(self) -> None:
        from kasou.vmm.dirty import DirtyTracker
        from kasou.vmm.snapshot import encode_config

        vm = self.vm
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self.address)
        except OSError as error:
            sock.close()
            raise MigrationError(
                f"cannot connect to {self.url}: {error.strerror or error} (is "
                "`kasou run --incoming` listening there?)"
            ) from None
        if self.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = _Channel(sock, self.url)
        self._socket = sock
        if vm.dirty is None:
            vm.dirty = DirtyTracker(vm.vm_fd, vm.memory)
        tracker = vm.dirty
        vm.last_snapshot = None  # the dirty log is now the migration's: no diff after it
        try:
            sock.sendall(stream_hello())
            plan = MigrationPlan(
                config=encode_config(vm.config),
                layout=tuple(vm.memory.layout),
                vcpus=len(vm.vcpus),
            )
            channel.send(CONFIG, encode_state(plan))
            channel.expect(ACK, REPLY_TIMEOUT)
            tracker.start()
            tracker.collect()
            self.phase = "copying"
            started = time.monotonic()
            self._send_batches(channel, _all_pages(vm.memory))
            self.bandwidth = channel.sent / max(time.monotonic() - started, 1e-6)
            while True:
                self._check_cancel()
                self.round += 1
                round_started = time.monotonic()
                dirty = tracker.collect()
                self.dirty_pages = sum(bitmap.count() for bitmap in dirty)
                since = round_started - started
                self.dirty_rate = self.dirty_pages * PAGE_SIZE / max(since, 1e-6)
                left = self.dirty_pages * PAGE_SIZE
                self.expected_downtime = left / max(self.bandwidth, 1.0)
                if self.expected_downtime <= self.downtime_target or self.round >= MAX_ROUNDS:
                    break
                self._auto_converge()
                started = time.monotonic()
                sent_before = channel.sent
                self._send_batches(channel, _dirty_pages(vm.memory, dirty))
                elapsed = time.monotonic() - started
                self.bandwidth = (channel.sent - sent_before) / max(elapsed, 1e-6)
            self._stop_and_copy(channel, tracker, dirty)
        finally:
            self._stop_throttle()
            tracker.stop()
            channel.close()

    def _send_batches(self, channel: _Channel, batches: Iterator[tuple[bytes, int]]) -> None:
        for payload, pages in batches:
            self._check_cancel()
            channel.send(PAGES, payload)
            self.pages_sent += pages
            self.bytes_sent = channel.sent

    def _stop_and_copy(
        self, channel: _Channel, tracker: DirtyTracker, dirty: Sequence[PageBitmap]
    ) -> None:
        """Pause the guest; send the pages still dirty (``dirty``, left by the last round,
        and what was written since), the scratch disks and every state; hand over."""
        from kasou.vmm.snapshot import quiesced, save_machine

        vm = self.vm
        self.phase = "stop-and-copy"
        with quiesced(vm) as _:
            paused_at = time.monotonic()
            self._stop_throttle()
            last = tracker.collect()
            for index, more in enumerate(dirty):
                last[index] |= more
            self._send_batches(channel, _dirty_pages(vm.memory, last))
            for index, disk in enumerate(vm.config.disks):
                transport = vm.devices.get(f"block{index}")
                if transport is not None:
                    transport.device.backend.flush()
                if disk.scratch:
                    _send_disk(channel, index, disk.path)
            sections = save_machine(vm)
            if self._extra is not None:
                sections.update(self._extra())
            channel.send(STATE, pack_sections(sections))
            channel.expect(READY, REPLY_TIMEOUT)
            self._check_cancel()
            self._committed = True
            channel.send(GO)
            channel.expect(RUNNING, REPLY_TIMEOUT)
            self.downtime = time.monotonic() - paused_at
            # The destination runs the guest now: this one must never run again.
            vm.stop(f"migrated to {self.url}")
        try:
            channel.send(DONE)
        except MigrationError:
            log.warning("the destination did not get DONE; it stops its copy of the VM")
        self.bytes_sent = channel.sent
        self.phase = "completed"
        sys.stderr.write(
            f"kasou: migrated to {self.url} in {time.monotonic() - self.started:.2f} s, "
            f"downtime {self.downtime * 1000:.0f} ms, {self.bytes_sent / 2**20:.1f} MiB sent\n"
        )

    def _auto_converge(self) -> None:
        """Throttle the vCPUs when the guest dirties memory faster than half the link."""
        if self.round < 2 or self.dirty_rate <= 0.5 * self.bandwidth:
            return
        if self.throttle == 0.0:
            self.throttle = THROTTLE_START
        else:
            self.throttle = min(THROTTLE_MAX, self.throttle + THROTTLE_STEP)
        self.throttle_max = max(self.throttle_max, self.throttle)
        if self._throttler is None:
            self._throttler = threading.Thread(
                target=self._throttle_loop, name="kasou-throttle", daemon=True
            )
            self._throttler.start()

    def _throttle_loop(self) -> None:
        """Each slice, park every vCPU on its own thread for ``throttle`` of the time."""
        while self.throttle > 0.0 and self.vm.state is VmState.RUNNING:
            share = self.throttle
            nap = THROTTLE_SLICE * share / (1.0 - share)
            for vcpu in self.vm.vcpus:
                vcpu.call(lambda fd, nap=nap: time.sleep(nap))  # type: ignore[misc]
            time.sleep(THROTTLE_SLICE + nap)

    def _stop_throttle(self) -> None:
        self.throttle = 0.0
        if self._throttler is not None:
            self._throttler.join(1.0)
            self._throttler = None


def _send_disk(channel: _Channel, index: int, path: Path) -> None:
    """A scratch disk (the default guest's overlay): its bytes, in frames."""
    with open(path, "rb") as file:
        offset = 0
        while True:
            data = file.read(BATCH)
            channel.send(DISK, struct.pack("<HQ", index, offset) + data)
            if not data:
                return
            offset += len(data)


def _all_pages(memory: GuestMemory) -> Iterator[tuple[bytes, int]]:
    """Round 0: every page that is not all zeros (the destination's RAM is zeros); pages the
    guest never touched are skipped without being read (``nonzero_pages``)."""
    from kasou.memory import nonzero_pages

    return _page_batches(memory, lambda index: nonzero_pages(memory, index))


def _dirty_pages(memory: GuestMemory, dirty: Sequence[Any]) -> Iterator[tuple[bytes, int]]:
    """The pages in ``dirty`` (one bitmap per region)."""
    return _page_batches(memory, lambda index: dirty[index].runs())


def _page_batches(
    memory: GuestMemory, runs: Callable[[int], Iterable[tuple[int, int]]]
) -> Iterator[tuple[bytes, int]]:
    """PAGES payloads of at most about ``BATCH`` bytes, with their page counts, for the runs
    ``(first_page, count)`` that ``runs(region_index)`` gives."""
    pieces: list[bytes] = []
    size = pages = 0
    batch_pages = BATCH // PAGE_SIZE
    for index, region in enumerate(memory.regions):
        for run_first, run_count in runs(index):
            first, count = run_first, run_count
            while count:
                take = min(count, batch_pages)
                start = first * PAGE_SIZE
                data = region.mapping[start : start + take * PAGE_SIZE]
                pieces += [_RUN.pack(region.gpa + start, take, _DATA), data]
                size += len(data)
                pages += take
                first += take
                count -= take
                if size >= BATCH:
                    yield b"".join(pieces), pages
                    pieces, size, pages = [], 0, 0
    if pieces:
        yield b"".join(pieces), pages


# --- the destination ---------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationPlan:
    """The first frame: what the destination must be able to build before any page."""

    config: bytes  # the source's VmConfig, JSON (vmm/snapshot.py encode_config)
    layout: tuple[tuple[int, int], ...]
    vcpus: int


def _store_pages(memory: GuestMemory, payload: bytes) -> int:
    """Write one PAGES frame into guest RAM; every run is checked first (untrusted)."""
    view = memoryview(payload)
    offset = pages = 0
    while offset < len(view):
        if offset + _RUN.size > len(view):
            raise MigrationError("the stream is corrupt: a page run is cut short")
        gpa, count, kind = _RUN.unpack_from(view, offset)
        offset += _RUN.size
        size = count * PAGE_SIZE
        if kind not in (_DATA, _ZEROS) or gpa % PAGE_SIZE or not memory.contains(gpa, size):
            raise MigrationError(
                f"the stream is corrupt: pages {gpa:#x}+{size:#x} are not inside guest RAM"
            )
        if kind == _ZEROS:
            memory.fill(gpa, size)
            continue
        if offset + size > len(view):
            raise MigrationError("the stream is corrupt: a page run is cut short")
        memory.view(gpa, size)[:] = view[offset : offset + size]
        offset += size
        pages += count
    return pages


def _listen(url: str) -> socket.socket:
    family, address = parse_url(url)
    if family == socket.AF_UNIX:
        from kasou.event.unix import listen_unix

        listener = listen_unix(Path(address), "incoming")
        listener.setblocking(True)
        return listener
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise ConfigError("incoming", f"cannot listen on {url}: {error.strerror}") from None
    listener.listen(1)
    return listener


def run_incoming(
    url: str,
    *,
    scratch: list[Path],
    disks: Sequence[DiskConfig] | None = None,
    nets: Sequence[NetConfig] | None = None,
    vsock: VsockConfig | None = None,
    api_sock: Path | None = None,
    console: str | None = None,
    clone: bool = False,
    accept_timeout: float | None = None,
) -> GuestExit:
    """``kasou run --incoming URL``: wait for one migration, then run the VM it brings until
    it ends. Disks, interfaces and sockets given here replace the source's (on one host the
    destination needs its own TAP and sockets). Raises ``MigrationError`` when the stream
    fails before the VM runs: nothing is left behind."""
    from kasou.vmm.runner import run

    if clone:
        raise ConfigError("clone", "--clone is for --restore; a migrated VM is the same VM")
    listener = _listen(url)
    with _stop_signals_interrupt():
        try:
            sys.stderr.write(f"kasou: waiting for a migration on {url}\n")
            listener.settimeout(accept_timeout)
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                raise MigrationError(f"no migration arrived on {url}") from None
            except KeyboardInterrupt:
                return GuestExit(ExitKind.STOPPED, "stopped while waiting for a migration")
        finally:
            listener.close()
            if url.startswith("unix:"):
                Path(url[len("unix:") :]).unlink(missing_ok=True)
        channel = _Channel(sock, f"the source ({peer or 'unix socket'})")
        started = time.monotonic()
        try:
            image = _receive(channel, scratch, disks, nets, vsock, api_sock, console)
        except KeyboardInterrupt:
            channel.close()
            return GuestExit(
                ExitKind.STOPPED, "stopped while a VM was arriving; it stays at its source"
            )
        except BaseException:
            channel.close()
            raise
    received = time.monotonic() - started

    def before_start(vm: Vm) -> None:
        channel.send(READY)
        channel.expect(GO, REPLY_TIMEOUT)

    def on_boot(vm: Vm) -> None:
        try:
            channel.send(RUNNING)
            channel.expect(DONE, REPLY_TIMEOUT)
        except MigrationError as error:
            vm.stop("the source did not confirm the migration")
            raise MigrationError(
                f"{error}; the source keeps the VM, this copy was stopped"
            ) from None
        finally:
            channel.close()
        sys.stderr.write(
            f"kasou: received the VM in {received:.2f} s ({channel.received / 2**20:.1f} MiB);"
            " running\n"
        )

    try:
        return run(image.config, restore=image, before_start=before_start, on_boot=on_boot)
    finally:
        channel.close()


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """While no VM runs yet, SIGTERM and SIGHUP interrupt like Ctrl-C (KeyboardInterrupt),
    so a destination told to stop cleans up (its socket, what arrived) and exits 0 as a
    stopped ``kasou run`` does. The runner installs its own handlers once a VM runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _receive(
    channel: _Channel,
    scratch: list[Path],
    disks: Sequence[DiskConfig] | None,
    nets: Sequence[NetConfig] | None,
    vsock: VsockConfig | None,
    api_sock: Path | None,
    console: str | None,
) -> Any:
    """Everything up to STATE: the VM's config checked, RAM filled, scratch disks written."""
    from dataclasses import replace

    from kasou.arch.x86_64 import layout as memory_layout
    from kasou.vmm.config import parse_console
    from kasou.vmm.snapshot import MachineImage, decode_config, preload_restore_modules

    preload_restore_modules()  # before any page arrives: not in the downtime
    check_stream_hello(channel._exactly(len(stream_hello())))
    plan = decode_state(channel.expect(CONFIG), MigrationPlan, what="migration plan")
    memory: GuestMemory | None = None
    try:
        try:
            saved = decode_config(plan.config)
            if tuple(plan.layout) != tuple(memory_layout.ram_layout(saved.memory)):
                raise MigrationError("the memory layout does not match the config")
            if plan.vcpus != saved.vcpus:
                raise MigrationError("the vCPU count does not match the config")
            config = _incoming_config(saved, disks, nets, vsock, api_sock, scratch)
            if console is not None:
                config = replace(config, console=parse_console(console))
            config.check_host(max_vcpus=1 << 16)  # host memory; KVM's limit at build
            config.check_devices()
            _check_disks(config)
            memory = GuestMemory.create(plan.layout, config.memory_backing, config.hugepages)
        except (KasouError, OSError) as error:
            channel.send(ERROR, f"the destination refuses the VM: {error}".encode())
            raise MigrationError(f"refused the incoming VM: {error}") from None
        channel.send(ACK)
        written: dict[int, Any] = {}
        try:
            while True:
                kind, payload = channel.receive()
                if kind == PAGES:
                    _store_pages(memory, payload)
                elif kind == DISK:
                    _store_disk(config, written, payload)
                elif kind == STATE:
                    sections = unpack_sections(payload, source="the migration stream")
                    break
                else:
                    raise MigrationError(f"the stream is corrupt: unexpected frame {kind}")
        finally:
            for file in written.values():
                file.close()
        return MachineImage(config, sections, None, memory=memory)
    except BaseException as error:
        if memory is not None:
            memory.close()
        if isinstance(error, SnapshotError | MigrationError):
            raise MigrationError(
                f"the migration failed after {channel.received / 2**20:.1f} MiB: {error}; "
                "nothing was started here"
            ) from None
        raise


def _incoming_config(
    saved: Any,
    disks: Sequence[DiskConfig] | None,
    nets: Sequence[NetConfig] | None,
    vsock: VsockConfig | None,
    api_sock: Path | None,
    scratch: list[Path],
) -> Any:
    """The source's config with this side's replacements; scratch disks get new files here
    (their content comes at the end of the stream)."""
    from dataclasses import replace

    from kasou._sys.scratch import scratch_folder
    from kasou.vmm.snapshot import restored_nets, restored_vsock

    new_disks = list(saved.disks)
    if disks is not None:
        if len(disks) != len(saved.disks):
            raise ConfigError(
                "disk", f"the guest has {len(saved.disks)} disk(s): give --disk that many times"
            )
        new_disks = list(disks)
    folder: Path | None = None
    for index, disk in enumerate(new_disks):
        if disks is None and disk.scratch:
            if folder is None:
                folder = scratch_folder("incoming")
                scratch.append(folder)
            target = folder / f"disk{index}{disk.path.suffix or '.img'}"
            target.touch()
            new_disks[index] = disk._replace(path=target)
    # The config is checked (files exist) only once the scratch files do.
    return replace(
        saved,
        disks=tuple(new_disks),
        nets=restored_nets(saved, nets, clone=False),
        vsock=restored_vsock(saved, vsock, api_sock),
        api_sock=api_sock,
    )


def _check_disks(config: Any) -> None:
    """Open every disk that is not coming in the stream, so a missing one refuses the VM
    before any page is copied."""
    from kasou.disk import open_disk

    for disk in config.disks:
        if disk.scratch:
            continue
        backend = open_disk(disk.path, format=disk.format, read_only=disk.read_only)
        backend.close()


def _store_disk(config: Any, files: dict[int, Any], payload: bytes) -> None:
    if len(payload) < 10:
        raise MigrationError("the stream is corrupt: a disk frame is cut short")
    index, offset = struct.unpack_from("<HQ", payload)
    if index >= len(config.disks) or not config.disks[index].scratch:
        raise MigrationError(f"the stream is corrupt: disk {index} is not a scratch disk")
    file = files.get(index)
    if file is None:
        file = files[index] = open(config.disks[index].path, "r+b")  # noqa: SIM115
    data = memoryview(payload)[10:]
    if offset > 1 << 40:
        raise MigrationError("the stream is corrupt: a disk offset is beyond 1 TiB")
    if data:
        os.pwrite(file.fileno(), data, offset)
    else:
        file.flush()
        os.fsync(file.fileno())
