"""A live ``kasoud`` for the API tests: a subprocess on a Unix socket in a short tmp dir,
driven with httpx (and websockets for the console)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kasou.guestkit import build_guest, cmdline

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Kasoud:
    """One kasoud process; ``api`` is an httpx client on its Unix socket."""

    def __init__(self, root: Path, *extra: str, state: Path | None = None) -> None:
        self.root = root
        self.sock = root / "k.sock"
        self.state = state if state is not None else root / "s"
        self.log = root / f"kasoud-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kasou.cli.daemon",
                    "--state-dir",
                    str(self.state),
                    "--socket",
                    str(self.sock),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.sock)),
            base_url="http://kasoud",
            timeout=30.0,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.api.get("/v1/host").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            try:  # a short wait that also notices kasoud exiting
                self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            break
        self.process.kill()
        raise AssertionError(f"kasoud did not come up:\n{self.log.read_text()}")

    def terminate(self) -> int:
        """SIGTERM kasoud and wait for it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"kasoud ignored SIGTERM:\n{self.log.read_text()}") from None
        finally:
            self.api.close()

    def remove_all(self) -> None:
        for vm in self.api.get("/v1/vms").json():
            self.api.delete(f"/v1/vms/{vm['name']}", params={"force": True})

    def wait_log(self, name: str, needle: str, timeout: float = 30.0) -> str:
        """The VM's console log once it holds ``needle``."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.api.get(f"/v1/vms/{name}/logs").text
            if needle in text:
                return text
            try:
                self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            break
        raise AssertionError(f"{needle!r} not in {name}'s console within {timeout} s:\n{text}")


@contextmanager
def running_kasoud(*extra: str) -> Iterator[Kasoud]:
    """A kasoud in a short tmp dir; at the end its VMs are deleted (they outlive kasoud),
    then it is stopped and its folder removed."""
    root = short_tmp()
    daemon = Kasoud(root, *extra)
    try:
        yield daemon
    finally:
        try:
            daemon.remove_all()
        finally:
            daemon.terminate()
            remove_tmp(root)


def short_tmp() -> Path:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too long.
    return Path(tempfile.mkdtemp(prefix="ka", dir="/tmp"))


def remove_tmp(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def guest_spec(name: str, workload: str = "wait", **fields: Any) -> dict[str, Any]:
    args = {k: fields.pop(k) for k in list(fields) if k in ("n",)}
    return {
        "name": name,
        "kernel": str(build_guest()),
        "cmdline": "console=ttyS0 " + cmdline(workload, **args),
        "memory": "64M",
        **fields,
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
