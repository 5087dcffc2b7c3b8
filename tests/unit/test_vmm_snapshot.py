"""Snapshot folders and migration streams without KVM: the saved config, what a restore
takes from the command line, the control requests, and hostile migration streams."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.errors import ConfigError, MigrationError, SnapshotError
from kasou.memory import GuestMemory
from kasou.persist import encode_state, frame_header, stream_hello, write_sections
from kasou.vmm.config import DiskConfig, NetConfig, VmConfig, VsockConfig, parse_console
from kasou.vmm.migration import (
    CONFIG,
    PAGES,
    MigrationPlan,
    _receive,
    _store_pages,
    parse_url,
)
from kasou.vmm.requests import RequestKind, parse_request
from kasou.vmm.snapshot import (
    MEMORY_FILE,
    STATE_FILE,
    SnapshotMeta,
    decode_config,
    encode_config,
    load_snapshot,
    merge_snapshots,
)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return path


def _config(tmp_path: Path, kernel: Path, **changes: object) -> VmConfig:
    disk = tmp_path / "root.img"
    disk.write_bytes(bytes(1 << 20))
    fields: dict[str, object] = {
        "kernel": kernel,
        "memory": 64 << 20,
        "console": parse_console("none"),
        "disks": (DiskConfig(disk, serial="root"),),
        "nets": (NetConfig(tap="tap7", mac="52:54:00:00:00:07"),),
        "vsock": VsockConfig(3, tmp_path / "vm.sock.vsock"),
        "api_sock": tmp_path / "vm.sock",
    }
    fields.update(changes)
    return VmConfig(**fields)  # type: ignore[arg-type]


def _snapshot_folder(tmp_path: Path, config: VmConfig, kind: str = "full") -> Path:
    from kasou.arch.x86_64 import layout

    folder = tmp_path / f"snap-{kind}"
    folder.mkdir()
    meta = SnapshotMeta(
        id="a" * 32,
        kind=kind,
        parent=None if kind == "full" else "b" * 32,
        kasou_version="0.1.0",
        created=0.0,
        layout=tuple(layout.ram_layout(config.memory)),
        vcpus=config.vcpus,
        disks=tuple(None for _ in config.disks),
        pages=0,
    )
    write_sections(
        folder / STATE_FILE, {"meta": encode_state(meta), "config": encode_config(config)}
    )
    with open(folder / MEMORY_FILE, "wb") as memory:
        memory.truncate(config.memory)
    return folder


def test_the_config_round_trips_and_needs_no_kernel_to_restore(
    tmp_path: Path, kernel: Path
) -> None:
    config = _config(tmp_path, kernel)
    data = encode_config(config)
    assert json.loads(data)["disks"][0][0] == str(tmp_path / "root.img")  # readable JSON
    kernel.unlink()  # the kernel is in the saved memory, not needed any more
    restored = decode_config(data)
    assert restored.restoring
    assert restored.disks == config.disks and restored.nets == config.nets
    assert restored.vsock == config.vsock and restored.memory == config.memory


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"kernel": 7}', b'{"kernel": "/k", "memory": "lots"}'],
)
def test_a_damaged_config_is_refused(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode_config(data)


def test_restore_follows_the_new_control_socket_and_refuses_wrong_counts(
    tmp_path: Path, kernel: Path
) -> None:
    config = _config(tmp_path, kernel)
    folder = _snapshot_folder(tmp_path, config)
    scratch: list[Path] = []
    image = load_snapshot(folder, scratch=scratch, api_sock=tmp_path / "new.sock")
    assert image.config.api_sock == tmp_path / "new.sock"
    assert image.config.vsock == VsockConfig(3, tmp_path / "new.sock.vsock")
    assert image.config.disks == config.disks  # a user's disk stays where it is
    assert image.memory_file == folder / MEMORY_FILE
    with pytest.raises(ConfigError, match="1 disk"):
        load_snapshot(folder, scratch=scratch, disks=[])
    with pytest.raises(ConfigError, match="cid"):
        load_snapshot(folder, scratch=scratch, vsock=VsockConfig(9, tmp_path / "v"))
    assert not scratch


def test_a_clone_gets_an_overlay_and_a_new_mac(tmp_path: Path, kernel: Path) -> None:
    config = _config(tmp_path, kernel)
    folder = _snapshot_folder(tmp_path, config)
    scratch: list[Path] = []
    macs = set()
    for _ in range(3):
        image = load_snapshot(folder, scratch=scratch, clone=True)
        disk = image.config.disks[0]
        assert disk.path != config.disks[0].path and disk.format == "qcow2" and disk.scratch
        macs.add(image.config.nets[0].mac)
    assert len(macs) == 3 and config.nets[0].mac not in macs
    assert all(int(mac.split(":")[0], 16) & 0b11 == 0b10 for mac in macs)  # local, unicast
    assert len(scratch) == 3


def test_a_diff_is_not_restored_and_a_broken_folder_is_refused(
    tmp_path: Path, kernel: Path
) -> None:
    config = _config(tmp_path, kernel)
    diff = _snapshot_folder(tmp_path, config, kind="diff")
    with pytest.raises(SnapshotError, match="snapshot merge"):
        load_snapshot(diff, scratch=[])
    full = _snapshot_folder(tmp_path, config)
    with pytest.raises(SnapshotError, match="does not apply"):
        merge_snapshots(full, [diff])
    (full / MEMORY_FILE).write_bytes(b"short")
    with pytest.raises(SnapshotError, match="bytes"):
        load_snapshot(full, scratch=[])
    with pytest.raises(SnapshotError, match="not a kasou snapshot"):
        load_snapshot(tmp_path, scratch=[])
    (full / STATE_FILE).write_bytes(b"KASOU\x00SN" + bytes(20))
    with pytest.raises(SnapshotError):
        load_snapshot(full, scratch=[])


def test_snapshot_and_migrate_requests_are_validated() -> None:
    request = parse_request({"request": "snapshot", "path": "/s", "diff": True})
    assert request.kind is RequestKind.SNAPSHOT and request.diff and not request.stop
    with pytest.raises(ConfigError, match="path"):
        parse_request({"request": "snapshot"})
    with pytest.raises(ConfigError, match="diff"):
        parse_request({"request": "snapshot", "path": "/s", "diff": "yes"})
    request = parse_request({"request": "migrate", "url": "tcp://h:1", "downtime": 0.05})
    assert request.kind is RequestKind.MIGRATE and request.downtime == 0.05
    for bad in ({"downtime": -1}, {"downtime": True}, {"downtime": 100}):
        with pytest.raises(ConfigError, match="downtime"):
            parse_request({"request": "migrate", "url": "tcp://h:1", **bad})
    assert parse_request({"request": "migration"}).kind is RequestKind.MIGRATION


def test_migration_urls() -> None:
    assert parse_url("tcp://127.0.0.1:4444") == (socket.AF_INET, ("127.0.0.1", 4444))
    assert parse_url("tcp://[::1]:9") == (socket.AF_INET6, ("::1", 9))
    assert parse_url("unix:/run/x.sock") == (socket.AF_UNIX, "/run/x.sock")
    for bad in ("tcp://host", "tcp://:80", "tcp://h:0", "tcp://h:99999", "udp://h:1", "unix:"):
        with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
            parse_url(bad)


@pytest.fixture
def memory() -> GuestMemory:
    ram = GuestMemory.create([(0, 1 << 20), (2 << 20, 1 << 20)])
    yield ram  # type: ignore[misc]
    ram.close()


def test_pages_land_where_the_stream_says(memory: GuestMemory) -> None:
    payload = struct.pack("<QIB", 0x1000, 2, 0) + b"\x11" * 8192
    payload += struct.pack("<QIB", 2 << 20, 1, 0) + b"\x22" * 4096
    assert _store_pages(memory, payload) == 3
    assert memory.read(0x1000, 8192) == b"\x11" * 8192
    assert memory.read(2 << 20, 4096) == b"\x22" * 4096
    memory.write(0x5000, b"x")
    _store_pages(memory, struct.pack("<QIB", 0x5000, 1, 1))  # a zero run
    assert memory.read(0x5000, 1) == b"\0"


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<QIB", 1 << 20, 1, 0) + bytes(4096),  # the hole between the regions
        struct.pack("<QIB", 0xFF000, 2, 0) + bytes(8192),  # across a region's end
        struct.pack("<QIB", 0x1001, 1, 0) + bytes(4096),  # not page aligned
        struct.pack("<QIB", 0, 1, 7) + bytes(4096),  # an unknown kind
        struct.pack("<QIB", 0, 2, 0) + bytes(4096),  # cut short
        struct.pack("<QI", 0, 1),  # a run header cut short
        struct.pack("<QIB", 0, 0xFFFFFFFF, 0),  # a count beyond RAM
    ],
)
def test_a_hostile_page_run_is_refused(memory: GuestMemory, payload: bytes) -> None:
    with pytest.raises(MigrationError, match="corrupt"):
        _store_pages(memory, payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_page_frames_never_escape_as_anything_else(data: bytes) -> None:
    ram = GuestMemory.create([(0, 1 << 16)])
    try:
        try:
            _store_pages(ram, data)
        except MigrationError:
            pass
    finally:
        ram.close()


def _serve(frames: list[bytes]) -> tuple[socket.socket, threading.Thread]:
    """A fake source: the given raw bytes, then the connection closes."""
    ours, theirs = socket.socketpair()

    def send() -> None:
        try:
            for frame in frames:
                theirs.sendall(frame)
            theirs.shutdown(socket.SHUT_WR)
            while theirs.recv(1 << 16):  # until the destination hangs up
                pass
        except OSError:
            pass
        theirs.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return ours, thread


def _frame(kind: int, payload: bytes) -> bytes:
    return frame_header(kind, payload) + payload


def _receive_from(raw: list[bytes], tmp_path: Path) -> None:
    from kasou.vmm.migration import _Channel

    sock, thread = _serve(raw)
    channel = _Channel(sock, "the source")
    scratch: list[Path] = []
    try:
        _receive(channel, scratch, None, None, None, None, None)
    finally:
        channel.close()
        thread.join(5)


def test_the_destination_refuses_a_bad_stream_before_building_anything(
    tmp_path: Path, kernel: Path
) -> None:
    config = _config(tmp_path, kernel, nets=(), vsock=None, api_sock=None)
    from kasou.arch.x86_64 import layout

    plan = MigrationPlan(encode_config(config), tuple(layout.ram_layout(config.memory)), 1)
    with pytest.raises(SnapshotError, match=r"bad magic|migration"):
        _receive_from([b"GET / HTTP/1.1\r\n\r\n"], tmp_path)
    with pytest.raises(MigrationError, match="closed"):
        _receive_from([stream_hello()], tmp_path)
    bad_layout = MigrationPlan(plan.config, ((0, 4096),), 1)
    with pytest.raises(MigrationError, match="layout"):
        _receive_from([stream_hello(), _frame(CONFIG, encode_state(bad_layout))], tmp_path)
    missing = _config(tmp_path, kernel, nets=(), vsock=None, api_sock=None)
    (tmp_path / "root.img").unlink()
    plan = MigrationPlan(encode_config(missing), plan.layout, 1)
    with pytest.raises(MigrationError, match="refused"):
        _receive_from([stream_hello(), _frame(CONFIG, encode_state(plan))], tmp_path)
    (tmp_path / "root.img").write_bytes(bytes(1 << 20))
    # Accepted, then pages outside RAM: refused, nothing started.
    outside = struct.pack("<QIB", 1 << 40, 1, 0) + bytes(4096)
    with pytest.raises(MigrationError, match="corrupt"):
        _receive_from(
            [stream_hello(), _frame(CONFIG, encode_state(plan)), _frame(PAGES, outside)],
            tmp_path,
        )


def test_work_folders_of_a_killed_kasou_are_removed(tmp_path: Path) -> None:
    from kasou.vmm.snapshot import remove_abandoned

    dead = subprocess.Popen(["true"])
    dead.wait()
    snap = tmp_path / "snap"
    abandoned = [
        tmp_path / f".snap.tmp-{dead.pid}-0123abcd",
        tmp_path / f".snap.merge-{dead.pid}-0123abcd",
    ]
    running = tmp_path / f".snap.tmp-{os.getpid()}-0123abcd"  # this process: still writing
    other = tmp_path / f".other.tmp-{dead.pid}-0123abcd"  # another snapshot's
    for folder in [*abandoned, running, other]:
        folder.mkdir()
        (folder / MEMORY_FILE).write_bytes(b"half")
    assert sorted(remove_abandoned(snap)) == sorted(abandoned)
    assert not any(folder.exists() for folder in abandoned)
    assert running.exists() and other.exists()


def test_a_destination_told_to_stop_while_waiting_exits_cleanly(tmp_path: Path) -> None:
    import signal
    import sys
    import time

    incoming = tmp_path / "in.sock"
    kasou = str(Path(sys.executable).with_name("kasou"))
    waiting = subprocess.Popen(
        [kasou, "run", "--incoming", f"unix:{incoming}"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not incoming.exists():  # another process's start-up, with a deadline
        assert waiting.poll() is None and time.monotonic() < deadline, waiting.stderr
        time.sleep(0.02)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(30) == 0
    assert "Traceback" not in (waiting.stderr.read() if waiting.stderr else "")
    assert not incoming.exists()
