"""``kasou run`` and the control commands as a user runs them: exit statuses, one-line
errors for bad input, nothing left behind, the serial console both ways."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.guestkit import cmdline

from .conftest import KASOU, kasou_with_socket


def run(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [KASOU, *args], input=stdin, capture_output=True, timeout=timeout, check=False
    )


def test_a_guest_runs_to_its_end_and_kasou_exits_0(guest_elf: Path) -> None:
    result = run(
        "run", "--kernel", str(guest_elf), "--memory", "64M", "--cmdline", cmdline("hello")
    )
    assert result.returncode == 0, result.stderr
    assert b"hello from ring 3" in result.stdout


def test_serial_input_reaches_the_guest(guest_elf: Path) -> None:
    message = b"kasou serial input " * 8  # more than the UART's 64-byte FIFO
    result = run(
        "run",
        "--kernel",
        str(guest_elf),
        "--memory",
        "64M",
        "--cmdline",
        cmdline("echo", n=len(message)),
        stdin=message,
    )
    assert result.returncode == 0, result.stderr
    assert message in result.stdout


def test_a_triple_fault_exits_nonzero_with_a_report(guest_elf: Path) -> None:
    result = run(
        "run", "--kernel", str(guest_elf), "--memory", "64M", "--cmdline", cmdline("triple")
    )
    assert result.returncode == 1
    assert b"the guest crashed on vCPU 0: triple fault" in result.stderr
    assert b"rip=" in result.stderr


def test_console_to_a_file(guest_elf: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = run(
        "run",
        "--kernel",
        str(guest_elf),
        "--memory",
        "64M",
        "--console",
        f"file:{log}",
        "--cmdline",
        cmdline("hello"),
    )
    assert result.returncode == 0
    assert b"hello" not in result.stdout
    assert "hello from ring 3" in log.read_text()


def _error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kasou: error: ")
    return lines[0]


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Path:
    """An api socket path; the test checks nothing is left at it."""
    return tmp_path / "vm.sock"


def test_missing_kernel(no_leftovers: Path) -> None:
    line = _error_line(
        run("run", "--kernel", "/nonexistent/vmlinux", "--api-sock", str(no_leftovers))
    )
    assert "kernel: /nonexistent/vmlinux does not exist" in line
    assert not no_leftovers.exists()


def test_unreadable_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    kernel.chmod(0)
    if os.access(kernel, os.R_OK):  # root reads anything: take away the file instead
        kernel.unlink()
        kernel.mkdir()
        assert "is not a file" in _error_line(run("run", "--kernel", str(kernel)))
    else:
        assert "is not readable" in _error_line(run("run", "--kernel", str(kernel)))


def test_a_file_that_is_no_kernel(tmp_path: Path, no_leftovers: Path) -> None:
    kernel = tmp_path / "notes.txt"
    kernel.write_text("not a kernel\n" * 100)
    line = _error_line(run("run", "--kernel", str(kernel), "--api-sock", str(no_leftovers)))
    assert "not a kernel" in line
    assert not no_leftovers.exists()


def test_a_kernel_that_does_not_fit_in_memory(guest_elf: Path, tmp_path: Path) -> None:
    big = tmp_path / "big-initrd"
    with open(big, "wb") as handle:
        handle.truncate(40 << 20)
    line = _error_line(
        run("run", "--kernel", str(guest_elf), "--initrd", str(big), "--memory", "32M")
    )
    assert "--memory" in line


def test_memory_beyond_the_hosts(guest_elf: Path) -> None:
    line = _error_line(run("run", "--kernel", str(guest_elf), "--memory", "64T"))
    assert "memory:" in line and "more than this host has" in line


def test_more_vcpus_than_kvm_allows(guest_elf: Path) -> None:
    line = _error_line(run("run", "--kernel", str(guest_elf), "--vcpus", "100000"))
    assert "vcpus:" in line


def test_bad_memory_size(guest_elf: Path) -> None:
    line = _error_line(run("run", "--kernel", str(guest_elf), "--memory", "lots"))
    assert "memory:" in line and "512M" in line


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
@pytest.mark.skipif(os.geteuid() != 0, reason="hiding /dev/kvm in a mount namespace needs root")
def test_no_dev_kvm(guest_elf: Path) -> None:
    script = "mount -t tmpfs none /dev && touch /dev/null && exec " + " ".join(
        [KASOU, "run", "--kernel", str(guest_elf)]
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        timeout=60,
        check=False,
    )
    line = _error_line(result)
    assert "/dev/kvm is missing" in line and "kvm_intel or kvm_amd" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
def test_no_permission_on_dev_kvm(guest_elf: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:  # under /tmp: reachable for nobody
        kernel = Path(folder) / "guest.elf"
        shutil.copy(guest_elf, kernel)
        Path(folder).chmod(0o755)
        kernel.chmod(0o644)
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "kasou",
                "run",
                "--kernel",
                str(kernel),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
    line = _error_line(result)
    assert "no permission to open /dev/kvm" in line


@contextlib.contextmanager
def running_vm(
    elf: Path, sock: Path, workload: str, *options: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``kasou run`` in the background with a control socket; killed if the test leaves
    it running."""
    with kasou_with_socket(
        [
            KASOU,
            "run",
            "--kernel",
            str(elf),
            "--memory",
            "64M",
            "--cmdline",
            cmdline(workload),
            "--api-sock",
            str(sock),
            *options,
        ],
        sock,
    ) as process:
        yield process


def test_control_commands_drive_a_running_vm(guest_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with running_vm(guest_elf, sock, "counter", "--console", "none") as process:
        for command, state in (
            ("status", "running"),
            ("pause", "paused"),
            ("status", "paused"),
            ("resume", "running"),
        ):
            start = time.monotonic()
            result = run(command, "--sock", str(sock))
            assert time.monotonic() - start < 5
            assert result.returncode == 0, result.stderr
            assert f'"state": "{state}"' in result.stdout.decode()
        refused = run("resume", "--sock", str(sock))
        assert refused.returncode == 2
        assert b"the VM is running, it must be paused" in refused.stderr
        assert run("stop", "--sock", str(sock)).returncode == 0
        assert process.wait(30) == 0
    assert not sock.exists(), "the control socket was left behind"


def test_on_reboot_restart_boots_the_guest_again(guest_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with running_vm(guest_elf, sock, "reset", "--on-reboot", "restart") as process:
        assert process.stdout is not None
        seen = b""
        while seen.count(b"resetting") < 3:
            chunk = process.stdout.read1(4096)
            assert chunk, (seen, process.stderr.read() if process.stderr else b"")
            seen += chunk
        assert run("stop", "--sock", str(sock)).returncode == 0
        assert process.wait(30) == 0


def test_every_command_help_shows_an_example() -> None:
    for command in ("run", "host", "status", "pause", "resume", "stop"):
        result = run(command, "--help")
        assert result.returncode == 0
        assert b"Example" in result.stdout or b"example" in result.stdout, command


def test_serial_input_from_a_regular_file_arrives_whole_and_in_order(
    guest_elf: Path, tmp_path: Path
) -> None:
    message = bytes(range(32, 127)) * 12  # 1140 bytes: many times the UART FIFO
    source = tmp_path / "input.txt"
    source.write_bytes(message)
    with open(source, "rb") as stdin:  # a regular file: epoll refuses it, kasou reads on demand
        result = subprocess.run(
            [
                KASOU,
                "run",
                "--kernel",
                str(guest_elf),
                "--memory",
                "64M",
                "--cmdline",
                cmdline("echo", n=len(message)),
            ],
            stdin=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert message in result.stdout


# --- devices: bad input is one line, and nothing is left behind --------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--disk", "/nonexistent/disk.raw", "disk: /nonexistent/disk.raw does not exist"),
        ("--disk", ",ro", "give a path first"),
        ("--disk", "{tmp}/disk.raw,format=vmdk", "format=vmdk: use raw or qcow2"),
        ("--disk", "{tmp}/disk.raw,serial=" + "x" * 21, "at most 20 printable bytes"),
        ("--disk", "{tmp}/disk.raw,bogus=1", "unknown option 'bogus'"),
        ("--net", "tap=this-name-is-too-long", "is not an interface name"),
        ("--net", "mac=01:00:5e:00:00:01", "multicast"),
        ("--net", "mac=52:54:00:zz:00:01", "write it like 52:54:00:12:34:56"),
        ("--vsock", "cid=2,uds={tmp}/v.sock", "cid=2: give 3 or more"),
        ("--vsock", "uds={tmp}/v.sock", "give cid=N,uds=PATH"),
        ("--vsock", "cid=3,uds=/nonexistent/dir/v.sock", "does not exist"),
    ],
)
def test_bad_device_options(
    guest_elf: Path, tmp_path: Path, no_leftovers: Path, option: str, value: str, expected: str
) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(1 << 20))
    value = value.replace("{tmp}", str(tmp_path))
    args = ["run", "--kernel", str(guest_elf), "--api-sock", str(no_leftovers), option, value]
    assert expected in _error_line(run(*args))
    assert not no_leftovers.exists()
    assert not (tmp_path / "v.sock").exists()


def test_a_corrupt_qcow2_is_refused_at_start(guest_elf: Path, tmp_path: Path) -> None:
    image = tmp_path / "bad.qcow2"
    created = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=False
    )
    if created.returncode:
        pytest.skip("qemu-img is not installed")
    data = bytearray(image.read_bytes())
    data[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset: far outside the file
    image.write_bytes(bytes(data))
    vsock = tmp_path / "v.sock"
    line = _error_line(
        run(
            "run", "--kernel", str(guest_elf), "--disk", str(image), "--vsock", f"cid=3,uds={vsock}"
        )
    )
    assert "disk:" in line and str(image) in line
    assert not vsock.exists()


def test_a_tap_in_use_is_named(guest_elf: Path, tmp_path: Path) -> None:
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/net/tun")
    from kasou.tap import open_tap

    name = f"kb{os.getpid() % 100000}"
    with open_tap(name):  # held by this process: kasou cannot attach it
        line = _error_line(run("run", "--kernel", str(guest_elf), "--net", f"tap={name}"))
    assert f"TAP {name} is in use by another process" in line
