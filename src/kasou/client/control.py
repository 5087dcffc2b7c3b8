"""A client for a VM's control socket (protocol in ``kasou.vmm.control``)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from kasou.errors import HostError, KasouError

__all__ = ["ConnectionClosed", "ControlClient", "RemoteError"]


class RemoteError(KasouError):
    """The VM refused a request; ``type`` is the error class it raised."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type = type_name


class ConnectionClosed(HostError):
    """The VM closed the connection before replying: it ended, or its kasou is exiting."""


class ControlClient:
    """One connection to a VM's control socket; ``request`` sends and waits for the reply."""

    def __init__(self, path: str | Path, timeout: float = 15.0) -> None:
        self.path = Path(path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        try:
            self._socket.connect(str(self.path))
        except FileNotFoundError:
            self._socket.close()
            raise HostError(f"{path}: no such socket: is the VM running with --api-sock?") from None
        except OSError as error:
            self._socket.close()
            raise HostError(f"cannot connect to {path}: {error.strerror}") from error
        self._reader = self._socket.makefile("rb")

    def request(self, name: str, **arguments: Any) -> dict[str, Any]:
        """Send ``{"request": name, **arguments}``; return the result or raise the VM's error."""
        try:
            self._socket.sendall(json.dumps({"request": name, **arguments}).encode() + b"\n")
            line = self._reader.readline()
        except OSError as lost:  # reset, broken pipe, timed out: the VM turned us away or died
            raise HostError(f"{self.path}: lost the connection to the VM: {lost}") from lost
        if not line:
            raise ConnectionClosed(f"{self.path}: the VM closed the connection")
        reply = json.loads(line)
        if reply.get("ok"):
            result: dict[str, Any] = reply.get("result", {})
            return result
        error = reply.get("error", {})
        type_name, message = error.get("type", "KasouError"), error.get("message", "")
        if type_name == "LifecycleError":
            raise RemoteLifecycleError(message)
        raise RemoteError(type_name, message)

    def execute(self, argv: list[str], stdin: str = "", timeout: float = 60.0) -> dict[str, Any]:
        """Run ``argv`` in the guest through its agent: ``{"status", "stdout", "stderr"}``."""
        self._socket.settimeout(timeout + 15)
        return self.request("exec", argv=argv, stdin=stdin, timeout=timeout)

    def shutdown(self, wait: float = 60.0) -> dict[str, Any]:
        """Press the VM's ACPI power button, then wait up to ``wait`` seconds (0: not at all)
        for the VM to end.

        Returns ``{"state", "power_button", "ending", "seconds"}``: ``ending`` is ``None``
        while the VM still runs, else ``{"kind", "reason"}`` with the kind of
        ``kasou run``'s ending ("poweroff" when the guest powered off), or kind "closed" when
        kasou exited before it could reply. Raises ``RemoteError`` when the guest does not
        listen for the button (no ACPI, or still booting): ``stop`` ends it at once."""
        self._socket.settimeout(wait + 15)
        started = time.monotonic()
        try:
            return self.request("shutdown", wait=wait)
        except ConnectionClosed:
            if wait <= 0:
                raise
            return {
                "state": "stopped",
                "power_button": "pressed",
                "ending": {"kind": "closed", "reason": "kasou exited: its control socket closed"},
                "seconds": round(time.monotonic() - started, 3),
            }

    def snapshot(
        self,
        path: str | Path,
        *,
        diff: bool = False,
        stop: bool = False,
        copy_disks: bool = False,
        timeout: float = 3600.0,
    ) -> dict[str, Any]:
        """Write a snapshot of the VM to the folder ``path`` (``kasou snapshot create``):
        ``{"path", "id", "kind", "pages", "bytes", "seconds", "paused_seconds", "state",
        "disks"}`` (``disks``: each disk's ``path`` and ``copy``, its file in the folder or
        None). ``copy_disks`` copies every writable disk into the folder while the VM is
        paused (else only the disks kasou made for the run); read-only disks stay where
        they are."""
        self._socket.settimeout(timeout)
        return self.request(
            "snapshot",
            path=str(Path(path).absolute()),
            diff=diff,
            stop=stop,
            disks="all" if copy_disks else "scratch",
        )

    def migrate(
        self, url: str, *, downtime: float = 0.3, poll: float = 0.1, timeout: float = 3600.0
    ) -> dict[str, Any]:
        """Send the VM to ``kasou run --incoming URL`` and wait for the migration to end;
        returns its last progress (``phase`` "completed", "failed" or "cancelled", with
        ``downtime``, ``bytes_sent``, ``seconds``, ``error``). The VM runs on here unless
        the phase is "completed"."""
        self.request("migrate", url=url, downtime=downtime)
        deadline = time.monotonic() + timeout
        while True:
            state = self.request("migration")
            if state["phase"] in ("completed", "failed", "cancelled"):
                return state
            if time.monotonic() > deadline:
                self.request("migrate-cancel")
                return dict(self.request("migration"))
            time.sleep(poll)

    def reclaim(self, **changes: int | float | str) -> dict[str, Any]:
        """The VM's memory reclaim (``kasou run --reclaim``): its policy, the host's last
        reading (``host``: MemAvailable, PSI, whether under pressure), the balloon target,
        the user's own (``user_target``), what kasou took back above it (``taken``) and its
        recent moves (``history``). Keyword arguments change the policy first: ``max``,
        ``min_free`` (bytes, "512M" or "10%"), ``step``, ``interval`` (seconds), ``psi``
        (percent), ``calm`` (readings)."""
        return self.request("reclaim", **changes)

    def rate_limit(self, device: str, **limits: str | int | None) -> dict[str, Any]:
        """Show, or change, the rate limits of a disk or interface (``device`` as in
        ``devices``: block0, net0): ``bw``, ``iops`` (disks), ``rx_bw``, ``rx_pps``,
        ``tx_bw``, ``tx_pps`` (interfaces) and each with ``_burst``; a bandwidth is bytes a
        second or a size like "10M", ``None`` removes a limit. Returns the limits and what
        throttling did (``delayed`` requests, ``throttled_seconds``)."""
        return self.request("rate-limit", device=device, **limits)

    def limits(self, **changes: float | int | str | dict[str, int] | None) -> dict[str, Any]:
        """The VM's CPU, memory and task limits, its vCPUs' pinning and measured usage
        (``cpu_seconds``, ``memory_bytes``, ``tasks``); with any of ``cpus_quota``,
        ``cpu_weight``, ``cpu_pin`` ("0=2,1=3"), ``memory_limit`` ("1G"), ``pids_limit``,
        applies them first (None lifts one). A bad value raises ``RemoteError``, nothing
        changed."""
        return self.request("limits", **changes)

    def close(self) -> None:
        self._reader.close()
        self._socket.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RemoteLifecycleError(RemoteError):
    """The VM is not in a state that allows the request."""

    def __init__(self, message: str) -> None:
        super().__init__("LifecycleError", message)
