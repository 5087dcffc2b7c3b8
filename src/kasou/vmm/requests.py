"""The closed set of requests a running VM answers, and their replies.

Every front end (the control socket, the CLI, the SDK, tests) speaks these; none reaches into
the VM's internals. Later issues add snapshot, migrate and device requests here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kasou.errors import ConfigError

__all__ = ["Reply", "Request", "RequestKind", "parse_request"]


class RequestKind(enum.Enum):
    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    EXEC = "exec"
    DEVICES = "devices"
    BALLOON = "balloon"
    SHUTDOWN = "shutdown"  # press the ACPI power button: the guest shuts itself down
    SNAPSHOT = "snapshot"  # write a snapshot folder (vmm/snapshot.py)
    MIGRATE = "migrate"  # send the VM to a destination (vmm/migration.py)
    MIGRATION = "migration"  # the progress of the migration under way
    MIGRATE_CANCEL = "migrate-cancel"  # abandon it; the VM runs on here
    RECLAIM = "reclaim"  # the reclaim policy and what it did; new values change it
    RATE_LIMIT = "rate-limit"  # a disk's or interface's rate limits; new values change them
    LIMITS = "limits"  # CPU, memory and task limits, pinning and usage; new values change them


@dataclass(frozen=True)
class Request:
    """One request. ``exec`` has the command, its stdin (text) and how long it may run, in
    seconds; ``balloon`` an optional new target size in bytes; ``shutdown`` how long to wait
    for the VM to end before replying, in seconds (0: reply once the button is pressed);
    ``snapshot`` the folder (``path``), whether only pages written since the previous
    snapshot go in (``diff``), whether the VM stops afterwards (``stop``) and which disks
    are copied into the folder (``disks``: "scratch", those kasou made, or "all", every
    writable disk, while the VM is paused); ``migrate`` the
    destination (``url``: tcp://HOST:PORT or unix:PATH) and the downtime target in seconds;
    ``reclaim`` the policy fields to change (``vmm.reclaim.parse_reclaim_changes``), empty to
    only report."""

    kind: RequestKind
    argv: tuple[str, ...] = ()
    stdin: str = ""
    timeout: float = 60.0
    target: int | None = None
    wait: float = 0.0
    path: str = ""
    diff: bool = False
    stop: bool = False
    disks: str = "scratch"
    url: str = ""
    downtime: float = 0.3
    reclaim: dict[str, Any] = field(default_factory=dict)
    # rate-limit: the device id (block0, net0) and the limits to change, as option words
    # (``vmm.ratelimits.parse_rate_changes``: None removes one), empty to only report.
    device: str = ""
    rates: dict[str, Any] = field(default_factory=dict)
    # limits: the ``kasou.resources.ResourceLimits`` fields to change (None lifts a limit),
    # empty to only report.
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """``ok`` with a ``result``, or not ok with the error's type and message."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {"ok": True, "result": self.result}
        return {"ok": False, "error": {"type": self.error_type, "message": self.error}}


def parse_request(message: object) -> Request:
    """Validate a decoded JSON message (untrusted) into a ``Request``."""
    if not isinstance(message, dict) or not isinstance(message.get("request"), str):
        raise ConfigError("request", 'a request is a JSON object like {"request": "status"}')
    name = message["request"]
    try:
        kind = RequestKind(name)
    except ValueError:
        known = ", ".join(kind.value for kind in RequestKind)
        raise ConfigError("request", f"unknown request {name!r}: use one of {known}") from None
    allowed = {"request"} | _ARGUMENTS.get(kind, set())
    extra = set(message) - allowed
    if extra:
        raise ConfigError("request", f"{name} does not take {', '.join(sorted(extra))}")
    if kind is RequestKind.BALLOON:
        return Request(kind, target=_balloon_target(message.get("target")))
    if kind is RequestKind.SHUTDOWN:
        wait = message.get("wait", 0.0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 86400:
            raise ConfigError("wait", "wait must be a number of seconds, 0 to 86400")
        return Request(kind, wait=float(wait))
    if kind is RequestKind.SNAPSHOT:
        return _snapshot(message)
    if kind is RequestKind.MIGRATE:
        return _migrate(message)
    if kind is RequestKind.RATE_LIMIT:
        from kasou.vmm.ratelimits import parse_rate_changes

        device = message.get("device")
        if not isinstance(device, str) or not device:
            raise ConfigError("device", 'rate-limit needs device: its id, like "block0"')
        return Request(kind, device=device, rates=parse_rate_changes(message))
    if kind is RequestKind.LIMITS:
        return Request(kind, limits=_limit_changes(message))
    if kind is RequestKind.RECLAIM:
        from kasou.vmm.reclaim import parse_reclaim_changes

        values = {key: value for key, value in message.items() if key != "request"}
        return Request(kind, reclaim=parse_reclaim_changes(values))
    if kind is not RequestKind.EXEC:
        return Request(kind)
    argv = message.get("argv")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(word, str) and word and "\0" not in word for word in argv)
    ):
        raise ConfigError("argv", "exec needs argv: a non-empty list of non-empty strings")
    stdin = message.get("stdin", "")
    if not isinstance(stdin, str):
        raise ConfigError("stdin", "stdin must be a string")
    for name, text in (("argv", "".join(argv)), ("stdin", stdin)):
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ConfigError(name, "the text is not valid Unicode (a lone surrogate)") from None
    timeout = message.get("timeout", 60.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= 86400
    ):
        raise ConfigError("timeout", "timeout must be a number of seconds, above 0, at most 86400")
    return Request(kind, tuple(argv), stdin, float(timeout))


_ARGUMENTS = {
    RequestKind.EXEC: {"argv", "stdin", "timeout"},
    RequestKind.BALLOON: {"target"},
    RequestKind.SHUTDOWN: {"wait"},
    RequestKind.SNAPSHOT: {"path", "diff", "stop", "disks"},
    RequestKind.MIGRATE: {"url", "downtime"},
    RequestKind.LIMITS: {"cpus_quota", "cpu_weight", "cpu_pin", "memory_limit", "pids_limit"},
    RequestKind.RECLAIM: {"max", "min_free", "step", "interval", "psi", "calm"},
    RequestKind.RATE_LIMIT: {
        "device",
        *("bw", "iops", "bw_burst", "iops_burst"),
        *("rx_bw", "rx_pps", "rx_bw_burst", "rx_pps_burst"),
        *("tx_bw", "tx_pps", "tx_bw_burst", "tx_pps_burst"),
    },
}


def _snapshot(message: dict[str, Any]) -> Request:
    path = message.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigError("path", "snapshot needs path: the folder to write the snapshot to")
    flags = {name: message.get(name, False) for name in ("diff", "stop")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(name, f"{name} must be true or false")
    disks = message.get("disks", "scratch")
    if disks not in ("scratch", "all"):
        raise ConfigError(
            "disks", 'disks must be "scratch" (the disks kasou made) or "all" (every writable one)'
        )
    return Request(
        RequestKind.SNAPSHOT, path=path, diff=flags["diff"], stop=flags["stop"], disks=disks
    )


def _migrate(message: dict[str, Any]) -> Request:
    url = message.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError("url", "migrate needs url: tcp://HOST:PORT or unix:PATH")
    downtime = message.get("downtime", 0.3)
    if (
        isinstance(downtime, bool)
        or not isinstance(downtime, int | float)
        or not 0.001 <= downtime <= 60
    ):
        raise ConfigError("downtime", "downtime must be seconds, 0.001 to 60 (like 0.3)")
    return Request(RequestKind.MIGRATE, url=url, downtime=float(downtime))


def _limit_changes(message: dict[str, Any]) -> dict[str, Any]:
    """The ``limits`` request's values (untrusted JSON) as ``ResourceLimits`` fields; null
    lifts a limit (or every pin)."""
    from kasou import resources

    parsers = {
        "cpus_quota": resources.parse_cpus_quota,
        "cpu_weight": resources.parse_cpu_weight,
        "pids_limit": resources.parse_pids_limit,
        "cpu_pin": resources.parse_cpu_pin,
        "memory_limit": _memory_limit,
    }
    changes: dict[str, Any] = {}
    for name, parse in parsers.items():
        if name in message:
            value = message[name]
            changes[name] = None if value is None else parse(value)
    if changes.get("cpu_pin", ()) is None:
        changes["cpu_pin"] = ()
    return changes


def _memory_limit(value: object) -> int:
    from kasou.memory import parse_size

    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError("memory-limit", 'give the memory limit as bytes or a size like "1G"')
    try:
        return parse_size(value)
    except ValueError as error:
        raise ConfigError("memory-limit", str(error)) from None


def _balloon_target(value: object) -> int | None:
    """A balloon target: bytes as a number, or a size like "256M"; None leaves it as it is."""
    if value is None:
        return None
    from kasou.memory import parse_size

    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError("target", 'give the balloon target as bytes or a size like "256M"')
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except ValueError as error:
        raise ConfigError("target", str(error)) from None
    if size < 0:
        raise ConfigError("target", "the balloon target cannot be negative")
    return size
