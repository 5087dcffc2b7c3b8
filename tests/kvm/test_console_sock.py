"""``kasou run --console sock:PATH,log=FILE`` as a user (or kasoud) runs it: the guest kit's
``echo`` workload answered through the socket, two clients at once, every byte in the log,
kasou's exit status, and no socket left behind. Run with seccomp on, as ``kasou run`` is: a
system call the console needs and the control list lacks would kill kasou here."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.guestkit import cmdline

from .conftest import KASOU

DEADLINE = 60.0


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder: the socket path must fit a Unix socket address."""
    path = Path(tempfile.mkdtemp(prefix="kcs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def kasou_console(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [KASOU, "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def wait_for_path(path: Path, process: subprocess.Popen[bytes]) -> None:
    """Another process's start-up: poll, with a deadline, failing early if it ended."""
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def wait_for_text(path: Path, needle: bytes, process: subprocess.Popen[bytes]) -> bytes:
    deadline = time.monotonic() + DEADLINE
    while needle not in (text := path.read_bytes() if path.exists() else b""):
        assert process.poll() is None, (text, process.communicate())
        assert time.monotonic() < deadline, f"{needle!r} not in {path}: {text!r}"
        time.sleep(0.01)
    return text


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(DEADLINE)
    client.connect(str(path))
    return client


def read_until(client: socket.socket, needle: bytes) -> bytes:
    data = b""
    while needle not in data:
        chunk = client.recv(4096)
        assert chunk, f"the console closed before {needle!r}; got {data!r}"
        data += chunk
    return data


def test_echo_through_the_socket_to_two_clients(guest_elf: Path, folder: Path) -> None:
    sock, log = folder / "console.sock", folder / "console.log"
    with kasou_console(
        "--kernel",
        str(guest_elf),
        "--memory",
        "64M",
        "--console",
        f"sock:{sock},log={log}",
        "--cmdline",
        cmdline("echo", n=5),
    ) as process:
        wait_for_path(sock, process)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        wait_for_text(log, b"echo: ready n=5", process)
        first, second = connect(sock), connect(sock)
        # The second client's echo comes back only once it was accepted, and the first,
        # which connected before it, was accepted no later.
        second.sendall(b"h")
        assert read_until(second, b"h") == b"h"
        assert read_until(first, b"h") == b"h"
        first.sendall(b"ello")
        assert read_until(first, b"ello").startswith(b"ello")
        assert read_until(second, b"ello").startswith(b"ello")
        assert process.wait(DEADLINE) == 0, process.communicate()
        _, stderr = process.communicate()
        assert b"seccomp" not in stderr, stderr
        for client in (first, second):
            client.recv(4096)  # the newline, perhaps; then the end
            client.close()
    assert not sock.exists()
    text = log.read_bytes()
    assert b"kasou-guest: boot=" in text
    assert b"echo: ready n=5" in text
    assert text.index(b"hello") > text.index(b"echo: ready")
    assert b"kasou-guest: done" in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_file_at_the_socket_path_is_one_error_line(guest_elf: Path, folder: Path) -> None:
    sock = folder / "console.sock"
    sock.write_text("keep me")
    result = subprocess.run(
        [
            KASOU,
            "run",
            "--kernel",
            str(guest_elf),
            "--memory",
            "64M",
            "--console",
            f"sock:{sock}",
            "--cmdline",
            cmdline("hello"),
        ],
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 2, result
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "exists and is not a socket" in lines[0], lines
    assert sock.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() != 0, reason="--jail needs root")
def test_a_jailed_vm_serves_its_console_beside_its_control_socket(
    guest_elf: Path, folder: Path
) -> None:
    """kasoud's layout: the control socket, the console socket and the log in one folder."""
    sock, log, api = folder / "console.sock", folder / "console.log", folder / "api.sock"
    with kasou_console(
        "--jail",
        "--jail-dir",
        str(folder / "jails"),
        "--kernel",
        str(guest_elf),
        "--memory",
        "64M",
        "--console",
        f"sock:{sock},log={log}",
        "--api-sock",
        str(api),
        "--cmdline",
        cmdline("echo", n=3),
    ) as process:
        wait_for_path(sock, process)
        wait_for_path(api, process)
        wait_for_text(log, b"echo: ready n=3", process)
        connect(api).close()  # both reachable through the jail: one did not hide the other
        client = connect(sock)
        client.sendall(b"abc")
        assert read_until(client, b"abc").startswith(b"abc")
        assert process.wait(DEADLINE) == 0, process.communicate()
        client.close()
    assert not sock.exists() and not sock.is_symlink()
    assert not api.exists() and not api.is_symlink()
    assert b"abc" in log.read_bytes()
    assert log.stat().st_uid == os.geteuid()  # given back after the run
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
