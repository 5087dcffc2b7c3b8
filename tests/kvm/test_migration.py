"""Live migration on /dev/kvm between two ``kasou run`` processes, as a user runs it.

The guest is the guest kit's ``memcheck`` workload: in ring 3, at native speed, it rewrites
its memory area over and over, first checking every word holds what it last wrote. It keeps
running through the migration without a wrong word, its passes going on at the destination
from where they were at the source. Then the link is cut at twenty points, in both
directions: every time the source VM runs on unchanged, and the destination exits with a
clear message.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.guestkit import FAIL_PREFIX, cmdline
from kasou.persist import frame_header
from kasou.vmm.migration import ACK

KASOU = str(Path(sys.executable).parent / "kasou")
PASS = re.compile(r"memcheck: pass (\d+)\n")  # whole lines: the console is read as written


def _wait(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _passes(log: Path) -> list[int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    assert FAIL_PREFIX not in text, text
    return [int(number) for number in PASS.findall(text)]


class Source:
    """A ``kasou run`` of memcheck with a control socket and its console in a file."""

    def __init__(
        self, guest_elf: Path, folder: Path, mib: int = 8, extra: tuple[str, ...] = ()
    ) -> None:
        self.log = folder / "source.log"
        self.sock = folder / "source.sock"
        self.process = subprocess.Popen(
            [
                KASOU,
                "run",
                "--kernel",
                str(guest_elf),
                "--cmdline",
                cmdline("memcheck", mib=mib, report=8),
                "--memory",
                "64M",
                "--console",
                f"file:{self.log}",
                "--api-sock",
                str(self.sock),
                *extra,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait("the source to run memcheck", lambda: len(_passes(self.log)) >= 2)

    def request(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KASOU, *args, "--sock", str(self.sock)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def runs_on(self) -> None:
        """The VM is running and memcheck makes progress, without a wrong word."""
        status = json.loads(self.request("status").stdout)
        assert status["state"] == "running"
        seen = len(_passes(self.log))
        _wait("the source's memcheck to go on", lambda: len(_passes(self.log)) >= seen + 2)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _destination(folder: Path, name: str) -> tuple[subprocess.Popen[str], Path, Path]:
    incoming = folder / f"{name}.in"
    log = folder / f"{name}.log"
    process = subprocess.Popen(
        [
            KASOU,
            "run",
            "--incoming",
            f"unix:{incoming}",
            "--console",
            f"file:{log}",
            "--api-sock",
            str(folder / f"{name}.sock"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait("the destination to listen", incoming.exists)
    return process, incoming, log


@pytest.fixture
def source(guest_elf: Path, tmp_path: Path) -> Iterator[Source]:
    started = Source(guest_elf, tmp_path)
    yield started
    started.close()


def test_live_migration_goes_on_exactly(source: Source, tmp_path: Path) -> None:
    destination, incoming, log = _destination(tmp_path, "dest")
    try:
        migrated = source.request("migrate", f"unix:{incoming}", "--json")
        assert migrated.returncode == 0, migrated.stderr
        result = json.loads(migrated.stdout)
        assert result["phase"] == "completed"
        assert 0 < result["downtime"] < 5 and result["bytes_sent"] > 8 << 20
        # The source ends, saying where its VM went.
        assert source.process.wait(20) == 0
        said = source.process.stderr.read() if source.process.stderr else ""
        assert "migrated to unix:" in said
        last = _passes(source.log)[-1]
        _wait("memcheck at the destination", lambda: len(_passes(log)) >= 3)
        after = _passes(log)
        # Passes go on from the source's: no restart from 0, no wrong word.
        assert after[0] >= last and after == sorted(after)
        stopped = subprocess.run(
            [KASOU, "stop", "--sock", str(tmp_path / "dest.sock")],
            check=False,
            capture_output=True,
        )
        assert stopped.returncode == 0
        assert destination.wait(20) == 0
        assert "received the VM" in (destination.stderr.read() if destination.stderr else "")
    finally:
        if destination.poll() is None:
            destination.kill()
            destination.wait()


class CuttingProxy:
    """Forwards one connection between ``listen`` and ``target`` (Unix sockets) and cuts
    both ways once ``forward`` bytes went towards the target or ``back`` bytes came back."""

    def __init__(self, listen: Path, target: Path, forward: int | None, back: int | None) -> None:
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(listen))
        self._server.listen(1)
        self._target = target
        self._limits = (forward, back)
        self._sockets: list[socket.socket] = []
        self._cut = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self._server.accept()
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(self._target))
        self._sockets = [client, upstream]
        pumps = [
            threading.Thread(target=self._pump, args=(client, upstream, self._limits[0])),
            threading.Thread(target=self._pump, args=(upstream, client, self._limits[1])),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()

    def _pump(self, reader: socket.socket, writer: socket.socket, limit: int | None) -> None:
        done = 0
        try:
            while not self._cut.is_set():
                data = reader.recv(65536)
                if not data:
                    break
                if limit is not None and done + len(data) >= limit:
                    writer.sendall(data[: limit - done])
                    break
                writer.sendall(data)
                done += len(data)
        except OSError:
            pass
        self._cut.set()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._cut.set()
        self._thread.join(10)
        for sock in [*self._sockets, self._server]:
            sock.close()


def test_a_cut_link_leaves_the_source_running(source: Source, tmp_path: Path) -> None:
    chooser = random.Random(8)
    # Towards the destination: anywhere in the first copy round (8 MiB of memcheck area
    # and the kernel's pages). Back: before ACK, before READY, and after GO (the
    # destination has started the VM; the source never hears RUNNING).
    cuts: list[tuple[int | None, int | None]] = [
        (chooser.randrange(0, 8 << 20), None) for _ in range(17)
    ]
    cuts += [(None, 0), (None, 9), (None, 18)]
    for run, (forward, back) in enumerate(cuts):
        destination, incoming, _ = _destination(tmp_path, f"dest{run}")
        proxy = CuttingProxy(tmp_path / f"proxy{run}", incoming, forward, back)
        try:
            migrated = source.request("migrate", f"unix:{tmp_path / f'proxy{run}'}", "--json")
            assert migrated.returncode == 1, (forward, back, migrated.stdout)
            assert json.loads(migrated.stdout)["phase"] == "failed"
            assert destination.wait(30) != 0, (forward, back)
            error = destination.stderr.read() if destination.stderr else ""
            assert "kasou: error:" in error and "Traceback" not in error, error
            source.runs_on()
        finally:
            proxy.close()
            if destination.poll() is None:
                destination.kill()
                destination.wait()


def test_a_destination_that_cannot_open_a_disk_refuses_before_any_page(
    guest_elf: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    source = Source(guest_elf, tmp_path, extra=("--disk", str(disk)))
    try:
        incoming = tmp_path / "refusing.in"
        destination = subprocess.Popen(
            [
                KASOU,
                "run",
                "--incoming",
                f"unix:{incoming}",
                "--disk",
                str(tmp_path / "missing.img"),
                "--console",
                "none",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait("the destination to listen", incoming.exists)
        migrated = source.request("migrate", f"unix:{incoming}", "--json")
        assert migrated.returncode == 1
        result = json.loads(migrated.stdout)
        assert "missing.img" in result["error"] and result["pages_sent"] == 0
        assert destination.wait(30) == 2
        assert "missing.img" in (destination.stderr.read() if destination.stderr else "")
        source.runs_on()
    finally:
        source.close()


def test_a_cancelled_migration_leaves_the_source_running(source: Source, tmp_path: Path) -> None:
    from kasou.client import ControlClient

    # A destination that accepts and never reads: the copy stalls until it is cancelled.
    stalled = tmp_path / "stalled.in"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stalled))
    listener.listen(1)
    follower = subprocess.Popen(
        [KASOU, "migrate", "--sock", str(source.sock), f"unix:{stalled}", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        connection, _ = listener.accept()
        # Say yes to the VM, then never read a page.
        connection.sendall(frame_header(ACK, b""))

        def copying() -> bool:
            with ControlClient(source.sock) as client:
                return bool(client.request("migration")["phase"] == "copying")

        _wait("the copy to start", copying)
        cancel = source.request("migrate", "--cancel")
        assert cancel.returncode == 0, cancel.stderr
        out, _ = follower.communicate(timeout=30)
        assert follower.returncode == 1
        assert json.loads(out)["phase"] == "cancelled"
        source.runs_on()
        connection.close()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        listener.close()


def test_the_sdk_migrates_and_reports(source: Source, tmp_path: Path) -> None:
    from kasou.client import ControlClient

    destination, incoming, log = _destination(tmp_path, "sdk")
    try:
        with ControlClient(source.sock) as client:
            result = client.migrate(f"unix:{incoming}", downtime=0.1)
        assert result["phase"] == "completed" and result["error"] is None
        assert result["downtime"] > 0 and result["pages_sent"] > 0
        assert source.process.wait(20) == 0
        _wait("memcheck at the destination", lambda: len(_passes(log)) >= 2)
    finally:
        destination.terminate()
        destination.wait(30)
