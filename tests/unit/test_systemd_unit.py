"""contrib/systemd/kasoud.service: it starts kasoud with options kasoud accepts, passes
``systemd-analyze verify`` where systemd is installed, and its stop command leaves the VMs
running on a stop or restart and shuts them down only when the host shuts down."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kasou.cli import daemon as kasoud

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "kasoud.service"


def unit_settings() -> dict[str, dict[str, str]]:
    """The unit's sections and their settings (each key set once in this unit)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert key not in current, f"{key} is set twice"
        current[key] = value
    return sections


def command(value: str) -> list[str]:
    """A unit's command line as the process gets it: "$$" is a literal "$"."""
    return shlex.split(value.replace("$$", "$"))


def test_exec_start_runs_kasoud_with_options_it_accepts() -> None:
    service = unit_settings()["Service"]
    program, *options = command(service["ExecStart"])
    assert program == "/opt/kasou/.venv/bin/kasoud"  # the README's setup: the checkout's .venv
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kasoud"] == "kasou.cli.daemon:main"
    args = kasoud._parser().parse_args(options)
    kasoud._check_args(args)
    assert (args.state_dir, args.socket) == (kasoud.DEFAULT_STATE_DIR, kasoud.DEFAULT_SOCKET)
    assert args.shutdown_vms
    # Stopping must outlast the VMs' shutdown, and signal kasoud alone, with SIGINT.
    assert int(service["TimeoutStopSec"]) > args.shutdown_deadline
    assert (service["KillMode"], service["KillSignal"]) == ("process", "SIGINT")


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    # verify checks that ExecStart exists: point it at this checkout's kasoud.
    here = Path(sys.executable).with_name("kasoud")
    assert here.exists()
    copy = tmp_path / "kasoud.service"
    copy.write_text(UNIT.read_text().replace("/opt/kasou/.venv/bin/kasoud", str(here)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # unknown keys and bad values are warnings


@pytest.mark.parametrize(
    ("system_state", "expected"),
    [("stopping", "SIGTERM"), ("running", "SIGINT"), ("degraded", "SIGINT")],
)
def test_the_stop_command_shuts_vms_down_only_at_host_shutdown(
    tmp_path: Path, system_state: str, expected: str
) -> None:
    # A stand-in for systemctl that reports the system's state as systemd would.
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho {system_state}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    # A stand-in for kasoud that says which signal ended it.
    main = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys\n"
            "def end(number, frame):\n"
            "    print(signal.Signals(number).name, flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGINT, end); signal.signal(signal.SIGTERM, end)\n"
            "print('ready', flush=True)\n"
            "signal.pause()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert main.stdout is not None
        assert main.stdout.readline() == "ready\n"
        stop = subprocess.Popen(
            command(unit_settings()["Service"]["ExecStop"]),
            env={
                **os.environ,
                "MAINPID": str(main.pid),
                "PATH": f"{fake.parent}:{os.environ['PATH']}",
            },
        )
        got = main.stdout.readline().strip()
        assert main.wait(timeout=30) == 0
        # It waited for kasoud to end (reaped here), then ended itself.
        assert stop.wait(timeout=30) == 0
        assert got == expected
    finally:
        if main.poll() is None:
            main.send_signal(signal.SIGKILL)
            main.wait()
