"""Memory reclaim under host pressure: kasou inflates a VM's balloon when the host runs short.

``kasou run --balloon --reclaim max=SIZE[,min-free=SIZE|PERCENT][,step=SIZE][,interval=S]``
turns it on. Every ``interval`` seconds a monitor on the runner's event loop reads the host
(``read_host_memory``: MemAvailable from /proc/meminfo, and the PSI line ``some avg10`` of
/proc/pressure/memory where the kernel has it, Documentation/accounting/psi.rst) and feeds
the reading to ``decide``, a pure function:

- **pressure** (MemAvailable below ``min-free``, 10 % of MemTotal by default, or PSI
  ``some avg10`` above ``psi``, 10 % by default): kasou's level rises by ``step`` (64 MiB)
  from the balloon's current target, up to ``max``;
- **calm** (MemAvailable at least ``min-free`` plus one ``step``, so giving a step back
  would not cause pressure again, and PSI at most half its threshold): after ``calm``
  such readings in a row (3) the level falls by one step, and the count starts again;
- anything between holds the level: the gap between the two conditions is the hysteresis
  that keeps the balloon from swinging at the edge.

The balloon's target is the larger of the user's own (the ``balloon`` request, which stays
the floor) and kasou's level; what kasou took back is the part above the user's. ``max``
may be at most the guest's RAM less a floor: the guest keeps a quarter of its RAM and at
least ``GUEST_FLOOR`` (``check_reclaim``). Free page reporting needs no policy: the balloon
device gives reported pages back as they come (``devices/virtio/balloon.py``).

This module owns the policy, its option and request parsing, the host reading and the
monitor. It does not drive the balloon's queues (the device does), does not decide whether
the guest complies (a guest that ignores the balloon keeps its memory; its target still
shows what kasou asked) and does not limit the VM's memory in the host (cgroups do).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from kasou.errors import ConfigError, HostError

__all__ = [
    "GUEST_FLOOR",
    "Decision",
    "HostMemory",
    "ReclaimConfig",
    "ReclaimMonitor",
    "ReclaimState",
    "check_reclaim",
    "decide",
    "min_free_bytes",
    "parse_reclaim",
    "parse_reclaim_changes",
    "read_host_memory",
]

log = logging.getLogger(__name__)

PAGE = 4096
MIB = 1 << 20
GUEST_FLOOR = 32 * MIB  # the least RAM reclaim leaves a guest (and a quarter of its RAM)
MIN_INTERVAL = 0.01
MAX_INTERVAL = 3600.0
MAX_CALM = 1000
HISTORY = 32  # actions the ``reclaim`` request shows
MEMINFO = "/proc/meminfo"
PSI_MEMORY = "/proc/pressure/memory"


class HostMemory(NamedTuple):
    """One reading of the host: MemTotal and MemAvailable in bytes, and PSI's ``some
    avg10`` for memory (the share of the last 10 s in which some task stalled on memory,
    in percent), ``None`` where the kernel has no PSI."""

    total: int
    available: int
    psi_some_avg10: float | None = None


class ReclaimConfig(NamedTuple):
    """The policy (``--reclaim``): sizes in bytes, whole 4 KiB pages.

    ``limit``: the largest balloon target kasou sets by itself (the option's ``max``);
    ``min_free``: the host's MemAvailable below which it is under pressure, or ``None`` for
    ``min_free_percent`` of MemTotal; ``step``: how much one raise or lower moves;
    ``interval``: seconds between readings; ``psi``: the PSI ``some avg10`` (percent) above
    which the host is under pressure; ``calm``: calm readings in a row before a step back.
    Field names are a snapshot format contract (a VM's config is saved with it)."""

    limit: int
    min_free: int | None = None
    min_free_percent: float = 10.0
    step: int = 64 * MIB
    interval: float = 1.0
    psi: float = 10.0
    calm: int = 3


class ReclaimState(NamedTuple):
    """The monitor's memory between two readings: ``level``, the balloon size kasou asks
    for by itself (0: nothing), and ``calm``, the calm readings in a row so far."""

    level: int = 0
    calm: int = 0


class Decision(NamedTuple):
    """What ``decide`` made of a reading: the next state, the balloon target it means, and
    why (empty when nothing changed)."""

    state: ReclaimState
    target: int
    why: str


# --- the policy ----------------------------------------------------------------------------


def min_free_bytes(policy: ReclaimConfig, total: int) -> int:
    """The MemAvailable below which the host counts as under pressure."""
    if policy.min_free is not None:
        return policy.min_free
    return int(total * policy.min_free_percent / 100)


def _pressure(policy: ReclaimConfig, reading: HostMemory) -> str:
    """Why the host is under pressure, or "" if it is not."""
    floor = min_free_bytes(policy, reading.total)
    if reading.available < floor:
        return f"MemAvailable {_mib(reading.available)} < min-free {_mib(floor)}"
    psi = reading.psi_some_avg10
    if psi is not None and psi > policy.psi:
        return f"PSI some avg10 {psi:.2f} > {policy.psi:g}"
    return ""


def _calm(policy: ReclaimConfig, reading: HostMemory) -> bool:
    """Whether the host is clear of the pressure line by a margin (the hysteresis band)."""
    floor = min_free_bytes(policy, reading.total)
    psi = reading.psi_some_avg10
    return reading.available >= floor + policy.step and (psi is None or psi <= policy.psi / 2)


def decide(
    policy: ReclaimConfig, state: ReclaimState, user_target: int, reading: HostMemory
) -> Decision:
    """The next state for one host reading. The target is never below ``user_target`` and
    kasou never raises it past ``policy.limit`` (a user target above the limit stays)."""
    target = max(state.level, user_target)
    why = _pressure(policy, reading)
    if why:
        # A raise starts from the target in force, so each one takes a step more.
        level = min(target + policy.step, policy.limit) if target < policy.limit else state.level
        if level == state.level:
            return Decision(ReclaimState(state.level, 0), target, "")
        return Decision(ReclaimState(level, 0), max(level, user_target), why)
    if not _calm(policy, reading):
        return Decision(ReclaimState(state.level, 0), target, "")
    if state.level <= user_target:
        # Nothing of kasou's own above the user's: nothing to give back.
        return Decision(ReclaimState(0, 0), user_target, "")
    calm = state.calm + 1
    if calm < policy.calm:
        return Decision(ReclaimState(state.level, calm), target, "")
    level = state.level - policy.step
    if level <= user_target:
        level = 0
    return Decision(
        ReclaimState(level, 0),
        max(level, user_target),
        f"no pressure for {calm} readings (MemAvailable {_mib(reading.available)})",
    )


def _mib(size: int) -> str:
    return f"{size / MIB:.0f} MiB"


# --- parsing and checks --------------------------------------------------------------------

_KEYS = ("max", "min-free", "step", "interval", "psi", "calm")


def parse_reclaim(text: str) -> ReclaimConfig:
    """Parse ``max=SIZE[,min-free=SIZE|PERCENT%][,step=SIZE][,interval=SECONDS][,psi=PERCENT]
    [,calm=N]``; the checks against the guest are ``check_reclaim``'s."""
    pairs: dict[str, str] = {}
    for part in text.split(","):
        key, equals, value = part.partition("=")
        if not equals or key not in _KEYS:
            raise ConfigError(
                "reclaim",
                f"{part!r}: give max=SIZE[,min-free=SIZE|PERCENT%][,step=SIZE]"
                "[,interval=SECONDS][,psi=PERCENT][,calm=N], like max=512M",
            )
        if key in pairs:
            raise ConfigError("reclaim", f"{key} is given twice")
        pairs[key] = value
    if "max" not in pairs:
        raise ConfigError("reclaim", "give max=SIZE: the most kasou may take back, like max=512M")
    changes = parse_reclaim_changes({key.replace("-", "_"): value for key, value in pairs.items()})
    return ReclaimConfig(limit=0)._replace(**changes)


def parse_reclaim_changes(values: Mapping[str, object]) -> dict[str, Any]:
    """Validate new policy values (untrusted: the option's or a ``reclaim`` request's, keys
    ``max``, ``min_free``, ``step``, ``interval``, ``psi``, ``calm``) into ``ReclaimConfig``
    fields. Sizes are bytes or texts like "256M"; ``min_free`` may also be a percentage of
    MemTotal, "10%"."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key == "max":
            changes["limit"] = _size("max", value)
        elif key == "min_free":
            if isinstance(value, str) and value.endswith("%"):
                changes["min_free"] = None
                changes["min_free_percent"] = _number("min-free", value[:-1], 0, 99)
            else:
                changes["min_free"] = _size("min-free", value)
        elif key == "step":
            changes["step"] = _size("step", value)
            if changes["step"] == 0:
                raise ConfigError("reclaim", "step=0 would never move: give a size like 64M")
        elif key == "interval":
            changes["interval"] = _number("interval", value, MIN_INTERVAL, MAX_INTERVAL)
        elif key == "psi":
            changes["psi"] = _number("psi", value, 0, 100)
        elif key == "calm":
            calm = _number("calm", value, 1, MAX_CALM)
            if calm != int(calm):
                raise ConfigError("reclaim", f"calm={value}: give a whole number of readings")
            changes["calm"] = int(calm)
        else:
            known = "max, min_free, step, interval, psi, calm"
            raise ConfigError("reclaim", f"unknown setting {key!r}: use {known}")
    return changes


def _size(name: str, value: object) -> int:
    from kasou.memory import parse_size

    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError("reclaim", f"{name}={value!r}: give bytes or a size like 256M")
    try:
        size = parse_size(value)
    except ValueError as error:
        raise ConfigError("reclaim", f"{name}: {error}") from None
    if size % PAGE:
        raise ConfigError("reclaim", f"{name}={value}: give whole 4 KiB pages, like 64M")
    return size


def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError("reclaim", f"{name}={value!r}: give a number from {low:g} to {high:g}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            "reclaim", f"{name}={value!r}: give a number from {low:g} to {high:g}"
        ) from None
    if not low <= number <= high:  # also refuses NaN
        raise ConfigError("reclaim", f"{name}={value}: give a number from {low:g} to {high:g}")
    return number


def check_reclaim(policy: ReclaimConfig, guest_memory: int) -> None:
    """Refuse a policy that does not fit a guest of ``guest_memory`` bytes: ``max`` must
    leave the guest a quarter of its RAM and at least ``GUEST_FLOOR``."""
    for name in ("limit", "step"):
        value = getattr(policy, name)
        if not isinstance(value, int) or value < 0 or value % PAGE:
            raise ConfigError("reclaim", f"{name} {value!r} is not a whole number of 4 KiB pages")
    if policy.limit <= 0:
        raise ConfigError("reclaim", "max=0 would never take anything back: give a size")
    if policy.step <= 0:
        raise ConfigError("reclaim", "step=0 would never move: give a size like 64M")
    floor = max(GUEST_FLOOR, guest_memory // 4)
    most = (guest_memory - floor) // PAGE * PAGE
    if policy.limit > most:
        from kasou.memory import format_size

        raise ConfigError(
            "reclaim",
            f"max={format_size(policy.limit)} leaves the guest less than "
            f"{format_size(floor)} of its {format_size(guest_memory)}: give at most "
            f"max={format_size(most) if most > 0 else 0}"
            + ("" if most > 0 else " (the guest is too small for reclaim: give it more RAM)"),
        )
    if policy.min_free is not None and policy.min_free < 0:
        raise ConfigError("reclaim", "min-free cannot be negative")
    if not 0 <= policy.min_free_percent <= 99:
        raise ConfigError("reclaim", f"min-free={policy.min_free_percent}%: give 0 to 99 %")
    if not MIN_INTERVAL <= policy.interval <= MAX_INTERVAL:
        raise ConfigError(
            "reclaim", f"interval={policy.interval}: give {MIN_INTERVAL} to {MAX_INTERVAL:g} s"
        )
    if not 0 <= policy.psi <= 100:
        raise ConfigError("reclaim", f"psi={policy.psi}: give 0 to 100 (percent)")
    if not 1 <= policy.calm <= MAX_CALM:
        raise ConfigError("reclaim", f"calm={policy.calm}: give 1 to {MAX_CALM}")


# --- the host ------------------------------------------------------------------------------


def read_host_memory() -> HostMemory:
    """Read /proc/meminfo (MemTotal, MemAvailable) and /proc/pressure/memory (PSI, when
    the kernel has it: it is absent before 4.20 and unreadable with ``psi=0``). Raises
    ``HostError`` when /proc/meminfo cannot be read or lacks the fields."""
    fields: dict[str, int] = {}
    try:
        with open(MEMINFO, encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    fields[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError) as error:
        raise HostError(f"cannot read the host's memory from {MEMINFO}: {error}") from None
    if len(fields) != 2:
        raise HostError(f"{MEMINFO} lacks MemTotal or MemAvailable (Linux 3.14 added it)")
    return HostMemory(fields["MemTotal"], fields["MemAvailable"], _psi_some_avg10())


def _psi_some_avg10() -> float | None:
    # Documentation/accounting/psi.rst: "some avg10=0.00 avg60=0.00 avg300=0.00 total=0".
    try:
        with open(PSI_MEMORY, encoding="ascii") as pressure:
            for line in pressure:
                words = line.split()
                if words and words[0] == "some":
                    for word in words[1:]:
                        key, _, value = word.partition("=")
                        if key == "avg10":
                            number = float(value)
                            return number if math.isfinite(number) else None
    except (OSError, ValueError):
        pass  # no PSI on this kernel: MemAvailable alone decides
    return None


# --- the monitor ---------------------------------------------------------------------------


class Timers(Protocol):
    """The part of an event loop the monitor uses (``kasou.event.EventLoop`` is one)."""

    def call_later(self, delay: float, function: Callable[[], None]) -> object: ...


class BalloonTarget(Protocol):
    """The part of a balloon the monitor drives (``devices.virtio.balloon.Balloon``)."""

    @property
    def target(self) -> int: ...

    def set_target(self, size: int) -> None: ...


class ReclaimMonitor:
    """Reads the host every ``policy.interval`` seconds on ``timers`` and moves the balloon
    of the VM attached (``attach``, once each boot) as ``decide`` says; ``guest_memory`` is
    the VM's RAM in bytes, which every policy is checked against. Thread-safe: the
    timer and the control requests run on the runner's loop, ``attach`` and ``detach`` on
    the thread that boots the VM."""

    def __init__(
        self,
        timers: Timers,
        policy: ReclaimConfig,
        guest_memory: int,
        read_host: Callable[[], HostMemory] = read_host_memory,
    ) -> None:
        check_reclaim(policy, guest_memory)
        self._timers = timers
        self._policy = policy
        self._read_host = read_host
        self._lock = threading.Lock()
        self._balloon: BalloonTarget | None = None
        self._guest_memory = guest_memory
        self._user_target = 0
        self._state = ReclaimState()
        self._reading: HostMemory | None = None
        self._pressure = ""
        self._read_error: str | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._raises = 0
        self._lowers = 0
        # A timer of an earlier attach, or from before a policy change, finds its
        # generation gone and does nothing (the loop's timers cannot be cancelled).
        self._generation = 0
        self._started = time.monotonic()

    @property
    def policy(self) -> ReclaimConfig:
        return self._policy

    def attach(self, balloon: BalloonTarget) -> None:
        """Watch for the VM whose balloon this is (a fresh boot, or a restored VM: its
        balloon's target counts as the user's) and start reading the host."""
        with self._lock:
            self._balloon = balloon
            self._user_target = balloon.target
            self._state = ReclaimState()
            generation = self._next_generation()
        log.info("reclaim: watching the host for %s", _describe(self._policy))
        self._schedule(generation)

    def detach(self) -> None:
        """Stop acting on the VM (it ended)."""
        with self._lock:
            self._balloon = None
            self._next_generation()

    def set_user_target(self, size: int) -> int:
        """The user's own balloon target (the ``balloon`` request): the floor kasou's level
        stands on. Returns the target now asked of the guest. Raises ``ConfigError`` for a
        size outside guest RAM, or when no VM is attached."""
        with self._lock:
            balloon = self._require_balloon()
            if not 0 <= size <= self._guest_memory:
                raise ConfigError(
                    "target", f"{size} bytes is more than the guest's {self._guest_memory}"
                )
            self._user_target = size
            target = max(self._state.level, size)
            balloon.set_target(target)
            return target

    def update(self, changes: Mapping[str, Any]) -> None:
        """Change the policy live (``parse_reclaim_changes``'s fields). Raises
        ``ConfigError`` for a policy that does not fit the guest; the old one stays then."""
        with self._lock:
            policy = self._policy._replace(**changes)
            check_reclaim(policy, self._guest_memory)
            old, self._policy = self._policy, policy
            generation = self._next_generation()
            balloon = self._balloon
            if balloon is not None and policy.limit < self._state.level:
                # A lower max takes effect now: kasou's level comes down to it.
                self._apply(
                    balloon, ReclaimState(policy.limit, 0), f"max lowered to {_mib(policy.limit)}"
                )
        log.info("reclaim: policy changed from %s to %s", _describe(old), _describe(policy))
        if balloon is not None:
            self._schedule(generation)

    def check(self) -> None:
        """Read the host once and act on it (what the timer does every interval)."""
        with self._lock:
            balloon = self._balloon
            if balloon is None:
                return
            try:
                reading = self._read_host()
            except Exception as error:  # a broken reader must not stop the monitor
                if self._read_error is None:
                    log.warning("reclaim: cannot read the host's memory: %s", error)
                self._read_error = str(error)
                return
            if self._read_error is not None:
                log.info("reclaim: the host's memory reads again")
                self._read_error = None
            self._reading = reading
            self._pressure = _pressure(self._policy, reading)
            decision = decide(self._policy, self._state, self._user_target, reading)
            self._apply(balloon, decision.state, decision.why)

    def report(self) -> dict[str, Any]:
        """What the ``reclaim`` request shows."""
        with self._lock:
            policy = self._policy
            reading = self._reading
            balloon = self._balloon
            target = balloon.target if balloon is not None else None
            host: dict[str, Any] | None = None
            if reading is not None:
                host = {
                    "mem_total": reading.total,
                    "mem_available": reading.available,
                    "psi_some_avg10": reading.psi_some_avg10,
                    "min_free": min_free_bytes(policy, reading.total),
                    "pressure": self._pressure or None,
                }
            return {
                "policy": {
                    "max": policy.limit,
                    "min_free": policy.min_free,
                    "min_free_percent": None
                    if policy.min_free is not None
                    else policy.min_free_percent,
                    "step": policy.step,
                    "interval": policy.interval,
                    "psi": policy.psi,
                    "calm": policy.calm,
                },
                "attached": balloon is not None,
                "host": host,
                "read_error": self._read_error,
                "target": target,
                "user_target": self._user_target,
                "level": self._state.level,
                "taken": max(0, self._state.level - self._user_target),
                "calm_readings": self._state.calm,
                "raises": self._raises,
                "lowers": self._lowers,
                "history": list(self._history),
            }

    # --- inside, under the lock -------------------------------------------------------

    def _require_balloon(self) -> BalloonTarget:
        if self._balloon is None:
            from kasou.errors import LifecycleError

            raise LifecycleError("booting", "running", "set the balloon")
        return self._balloon

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _apply(self, balloon: BalloonTarget, state: ReclaimState, why: str) -> None:
        before = max(self._state.level, self._user_target)
        after = max(state.level, self._user_target)
        self._state = state
        if after == before:
            return
        balloon.set_target(after)
        if after > before:
            self._raises += 1
        else:
            self._lowers += 1
        self._history.append(
            {
                "at": round(time.monotonic() - self._started, 3),
                "from": before,
                "to": after,
                "why": why,
            }
        )
        log.info(
            "reclaim: balloon target %s -> %s (%s; user's %s)",
            _mib(before),
            _mib(after),
            why,
            _mib(self._user_target),
        )

    def _schedule(self, generation: int) -> None:
        self._timers.call_later(self._policy.interval, lambda: self._tick(generation))

    def _tick(self, generation: int) -> None:
        if generation != self._generation:
            return  # detached, or the policy (and its interval) changed meanwhile
        self.check()
        if generation == self._generation:
            self._schedule(generation)


def _describe(policy: ReclaimConfig) -> str:
    free = (
        _mib(policy.min_free) if policy.min_free is not None else f"{policy.min_free_percent:g} %"
    )
    return (
        f"max {_mib(policy.limit)}, min-free {free}, step {_mib(policy.step)}, "
        f"every {policy.interval:g} s, psi {policy.psi:g}, calm {policy.calm}"
    )
