"""The built default guest under QEMU (TCG, -M microvm): it boots to a shell on COM1, its
agent says READY on COM2 and runs a command, and `poweroff` ends the VM through the agent's
power-off port (an isa-debug-exit device sits on port 0x604 here, standing in for kasou's).

Skipped unless QEMU is installed and the default guest is built (`kasou image build`).
KASOU_QEMU_ACCEL=kvm runs it under KVM (`-cpu host`) instead of TCG, e.g. inside the nested
host: `python -c 'from kasou.nested import run_nested; run_nested([".venv/bin/pytest", "-s",
"tests/image_qemu"], env={"KASOU_QEMU_ACCEL": "kvm"})'`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.agent import protocol as ap
from kasou.image import ImageBuildError, default_guest

QEMU = shutil.which("qemu-system-x86_64")
ACCEL = os.environ.get("KASOU_QEMU_ACCEL", "tcg")
BOOT_TIMEOUT_S = float(os.environ.get("KASOU_TEST_BOOT_TIMEOUT", "300"))
STEP_TIMEOUT_S = 120.0


def _guest() -> object:
    try:
        return default_guest(build=False)
    except ImageBuildError:
        return None


GUEST = _guest()
pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64"),
    pytest.mark.skipif(GUEST is None, reason="the default guest is not built"),
]


class Console:
    """COM1 on QEMU's stdio: everything the guest prints, and a way to type."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._text = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        while chunk := self._proc.stdout.read1(4096):
            with self._changed:
                self._text += chunk
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._text.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        with self._changed:
            found = self._changed.wait_for(lambda: needle.encode() in self._text, timeout=timeout)
        assert found, f"{needle!r} never appeared on the console:\n{self.text[-3000:]}"

    def type(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()


class AgentLink:
    """COM2, which QEMU connects to our listening socket."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._decoder = ap.FrameDecoder()
        self._pending: list[ap.GuestMessage] = []

    def send(self, frame: bytes) -> None:
        self._conn.sendall(frame)

    def read(self, timeout: float) -> ap.GuestMessage:
        deadline = time.monotonic() + timeout
        while not self._pending:
            self._conn.settimeout(max(0.01, deadline - time.monotonic()))
            data = self._conn.recv(65536)
            assert data, "QEMU closed COM2"
            self._pending += [ap.parse_guest_frame(f) for f in self._decoder.feed(data)]
        return self._pending.pop(0)


# Under TCG on a busy host, Linux's calibration of the TSC against the PIT sometimes fails;
# microvm has no HPET or PM timer to fall back on, and the boot then stalls before the console
# prints (about one boot in five in a loop here). Giving the TSC's rate skips the calibration.
TCG_CMDLINE = " tsc_early_khz=2000000" if ACCEL == "tcg" else ""


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Console, AgentLink, float]]:
    assert QEMU is not None and GUEST is not None
    guest = default_guest(build=False)
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(STEP_TIMEOUT_S)
    argv = [
        QEMU,
        "-accel", ACCEL,
        *(["-cpu", "host"] if ACCEL == "kvm" else []),
        "-smp", "2",
        "-M", "microvm,rtc=on",  # QEMU leaves the CMOS RTC out under KVM by default
        "-m", "256",
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", guest.cmdline + TCG_CMDLINE,
        "-serial", "stdio",
        "-chardev", f"socket,id=agent,path={path}",
        "-device", "isa-serial,chardev=agent,iobase=0x2f8,irq=3",
        "-device", f"isa-debug-exit,iobase={ap.POWEROFF_PORT:#x},iosize=2",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        console = Console(proc)
        conn, _ = listener.accept()
        with conn:
            yield proc, console, AgentLink(conn), started
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def test_boots_to_a_shell_and_the_agent_runs_commands_and_powers_off(
    vm: tuple[subprocess.Popen[bytes], Console, AgentLink, float],
) -> None:
    proc, console, agent, started = vm
    try:
        ready = agent.read(BOOT_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"no READY on COM2; the console:\n{console.text[-3000:]}") from None
    assert ready == ap.Ready(ap.AGENT_VERSION)
    print(f"READY {time.monotonic() - started:.1f} s after QEMU started ({ACCEL})")

    agent.send(ap.exec_frame(1, ["uname", "-a"]))
    out = b""
    while not isinstance(message := agent.read(STEP_TIMEOUT_S), ap.Exit):
        assert isinstance(message, ap.Output) and message.stream == "stdout", message
        out += message.data
    assert message == ap.Exit(1, 0)
    assert out.startswith(b"Linux kasou 6.1"), out
    print(out.decode().strip())

    console.wait_for("kasou:~# ", STEP_TIMEOUT_S)
    console.type("echo shell-says-$((6 * 7))")
    console.wait_for("shell-says-42", STEP_TIMEOUT_S)

    console.type("poweroff")
    # isa-debug-exit makes QEMU exit with (value << 1) | 1: 0x4001, whose low byte is 1.
    assert proc.wait(timeout=STEP_TIMEOUT_S) == 1
    assert proc.stderr is not None
    assert proc.stderr.read() == b""
