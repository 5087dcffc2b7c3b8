"""What contrib/systemd/kasoud.service relies on, with kasoud started with the unit's own
options (its state and socket moved to a tmp dir): SIGINT, which the unit sends on a stop or
restart, ends kasoud and leaves the VMs running for the next kasoud even with
``--shutdown-vms``; SIGTERM (host shutdown) is tested in test_api.py."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from ._kasoud import STOP_TIMEOUT, Kasoud, alive, guest_spec, remove_tmp, short_tmp

pytestmark = pytest.mark.kvm

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "kasoud.service"


def unit_options() -> list[str]:
    """ExecStart's options, less the state dir and socket (the harness gives its own)."""
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart="))
    words = shlex.split(line.removeprefix("ExecStart="))[1:]
    options: list[str] = []
    while words:
        word = words.pop(0)
        if word in ("--state-dir", "--socket"):
            words.pop(0)
        else:
            options.append(word)
    assert "--shutdown-vms" in options
    return options


def test_sigint_leaves_the_vms_to_the_next_kasoud() -> None:
    root = short_tmp()
    daemon = Kasoud(root, *unit_options())
    pid = 0
    try:
        spec = guest_spec("lasting")
        assert daemon.api.post("/v1/vms", json=spec, params={"start": True}).status_code == 201
        pid = daemon.api.get("/v1/vms/lasting").json()["pid"]
        daemon.process.send_signal(signal.SIGINT)  # systemctl stop|restart kasoud
        try:
            assert daemon.process.wait(timeout=STOP_TIMEOUT) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"kasoud ignored SIGINT:\n{daemon.log.read_text()}") from None
        daemon.api.close()
        assert alive(pid), "the VM ended with kasoud"
        daemon = Kasoud(root, *unit_options())  # the unit's start after a restart
        info = daemon.api.get("/v1/vms/lasting").json()
        assert (info["state"], info["pid"]) == ("running", pid)
    finally:
        try:
            if daemon.process.poll() is None:
                daemon.remove_all()
        finally:
            daemon.terminate()
            remove_tmp(root)
            if pid and alive(pid):  # the test failed between the two kasouds
                os.kill(pid, signal.SIGKILL)
