"""I/O rate limits for devices: token buckets for bandwidth and operations, and the throttle
that holds a device back until its buckets allow more.

This module owns the arithmetic (``TokenBucket``), the user's description of a limit
(``RateLimit``: plain numbers, kept in ``VmConfig`` and its snapshots), the parsing and the
bounds of the option words (``bw=50M,iops=1000,bw-burst=..``), and ``Throttle``, the glue a
device uses on its reactor. It does not decide what a request costs or where a device stops:
virtio-blk charges each request's data and one operation, virtio-net each frame's bytes and
one packet (``devices/virtio/block.py``, ``net.py``).

The bucket follows the model Firecracker documents for its rate limiter: a bucket of
``capacity`` tokens, full at the start, refilled at ``rate`` tokens a second and never above
``capacity``, and a one-time ``burst`` of extra tokens spent before the bucket and never
refilled. kasou fixes the capacity at ``WINDOW`` seconds of the rate, so the limit holds over
any stretch longer than that.

A request is let through while no bucket is in debt, and then takes its whole cost, which may
leave a bucket in debt; the next request waits until the refill has paid the debt off. So a
request larger than the bucket is served (a bucket could never hold its cost) and delays the
one after it by as long as its excess takes to refill: over time the device moves exactly
``rate``. The device never has to hold a request it cannot afford: it asks ``Throttle``
before taking the next one from the driver, and a throttled device leaves the rest where they
are, in order, until a one-shot timer on its reactor says the debt is paid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

from kasou.errors import ConfigError
from kasou.memory import format_size, parse_size

__all__ = [
    "Clock",
    "MAX_BANDWIDTH",
    "MAX_OPS",
    "WINDOW",
    "RateLimit",
    "Throttle",
    "TokenBucket",
    "check_rate",
    "parse_rate",
    "rate_words",
]

WINDOW = 0.1
"""Seconds of its rate a bucket holds: the most a device moves at once after an idle spell
(beyond a one-time burst)."""

MAX_BANDWIDTH = 1 << 40
"""The highest bandwidth limit accepted, bytes a second (1 TiB/s: no device comes near)."""

MAX_OPS = 100_000_000
"""The highest operations limit accepted, a second."""

Clock = Callable[[], float]


class RateLimit(NamedTuple):
    """One direction's limit, as the user gave it. ``bandwidth`` in bytes a second, ``ops``
    in operations (requests, packets) a second; ``None`` is no limit of that kind. A burst is
    a one-time allowance on top of its bucket. Field names are a snapshot format contract
    (the config is saved with a snapshot)."""

    bandwidth: int | None = None
    ops: int | None = None
    bandwidth_burst: int = 0
    ops_burst: int = 0

    @property
    def unlimited(self) -> bool:
        return self.bandwidth is None and self.ops is None

    def describe(self) -> dict[str, int | None]:
        """The limit as the control socket shows it."""
        return {
            "bandwidth": self.bandwidth,
            "ops": self.ops,
            "bandwidth_burst": self.bandwidth_burst,
            "ops_burst": self.ops_burst,
        }


class TokenBucket:
    """``capacity`` tokens refilled at ``rate`` a second, plus a one-time ``burst``."""

    def __init__(
        self, capacity: float, rate: float, burst: float = 0.0, clock: Clock = time.monotonic
    ) -> None:
        if capacity <= 0 or rate <= 0 or burst < 0:
            raise ValueError(f"a bucket of {capacity} at {rate}/s with burst {burst}")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.capacity  # below 0: in debt
        self._at = clock()

    @classmethod
    def for_rate(cls, rate: int, burst: int = 0, clock: Clock = time.monotonic) -> TokenBucket:
        """A bucket that holds ``WINDOW`` seconds of ``rate``."""
        return cls(rate * WINDOW, rate, burst, clock)

    @property
    def tokens(self) -> float:
        """What the bucket holds now (negative: its debt), the burst not counted."""
        self._refill()
        return self._tokens

    def wait(self) -> float:
        """Seconds until the bucket is out of debt (0: a request may go now)."""
        self._refill()
        # A hair of debt left by float arithmetic (the timer fired at the computed instant)
        # counts as paid: a millionth of a byte or an operation.
        if self._tokens > -1e-6 or self.burst > 0:
            return 0.0
        return -self._tokens / self.rate

    def consume(self, cost: float) -> None:
        """Take ``cost`` tokens: from the burst first, the rest from the bucket, which may
        go into debt."""
        self._refill()
        from_burst = min(self.burst, cost)
        self.burst -= from_burst
        self._tokens -= cost - from_burst

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._at
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
            self._at = now


class _Limiter:
    """The live buckets of one ``RateLimit``."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self.buckets: list[tuple[TokenBucket, bool]] = []  # (bucket, counts bytes)
        if limit.bandwidth is not None:
            bucket = TokenBucket.for_rate(limit.bandwidth, limit.bandwidth_burst, clock)
            self.buckets.append((bucket, True))
        if limit.ops is not None:
            self.buckets.append((TokenBucket.for_rate(limit.ops, limit.ops_burst, clock), False))

    def wait(self) -> float:
        return max((bucket.wait() for bucket, _ in self.buckets), default=0.0)

    def charge(self, size: int, ops: int) -> None:
        for bucket, counts_bytes in self.buckets:
            bucket.consume(size if counts_bytes else ops)


class Scheduler(Protocol):
    """What a throttle needs of a device's reactor (``kasou.event.EventLoop`` is one)."""

    def call_soon(self, function: Callable[[], None]) -> None: ...

    def call_later(self, delay: float, function: Callable[[], None]) -> None: ...


class Throttle:
    """One direction of one device under a ``RateLimit`` (or none), on the device's reactor.

    The device asks ``blocked()`` before it takes the next request and, when that is true,
    stops where it is; ``resume`` runs on the reactor once the buckets allow more. After a
    request it calls ``charge``. ``set`` changes the limit from any thread. Without a limit
    ``active`` is false and the device skips both calls: an unlimited device pays nothing.
    """

    def __init__(
        self,
        reactor: Scheduler,
        resume: Callable[[], None],
        limit: RateLimit | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._reactor = reactor
        self._resume = resume
        self._clock = clock
        self.limit = limit if limit is not None and not limit.unlimited else None
        self._limiter = _Limiter(self.limit, clock) if self.limit is not None else None
        self.active = self._limiter is not None
        self.delayed = 0  # times a request had to wait
        self.throttled = 0.0  # seconds of those waits
        self._armed = False
        self._generation = 0  # a timer of an earlier limit does nothing

    def blocked(self) -> bool:
        """Whether the device must wait (on the reactor thread). The first time, a one-shot
        timer is armed that calls ``resume`` when the buckets are out of debt."""
        if self._armed:
            return True
        limiter = self._limiter
        if limiter is None:
            return False
        delay = limiter.wait()
        if delay <= 0:
            return False
        self._armed = True
        self.delayed += 1
        self.throttled += delay
        generation = self._generation
        self._reactor.call_later(delay, lambda: self._expired(generation))
        return True

    @property
    def waiting(self) -> bool:
        """Whether the device stopped and a timer will resume it."""
        return self._armed

    def charge(self, size: int, ops: int = 1) -> None:
        """Count one request of ``size`` bytes (on the reactor thread)."""
        if self._limiter is not None:
            self._limiter.charge(size, ops)

    def set(self, limit: RateLimit | None) -> None:
        """Change the limit (any thread): fresh buckets on the reactor, and a device that was
        waiting under the old limit goes on at once under the new one."""
        limit = limit if limit is not None and not limit.unlimited else None
        self.limit = limit
        self._reactor.call_soon(lambda: self._apply(limit))

    def describe(self) -> dict[str, object]:
        """The limit and what it did, for the control socket."""
        return {
            **(self.limit or RateLimit()).describe(),
            "delayed": self.delayed,
            "throttled_seconds": round(self.throttled, 6),
        }

    def _apply(self, limit: RateLimit | None) -> None:
        self._generation += 1
        self._limiter = _Limiter(limit, self._clock) if limit is not None else None
        self.active = self._limiter is not None
        if self._armed:
            self._armed = False
            self._resume()

    def _expired(self, generation: int) -> None:
        if generation != self._generation:
            return  # the limit changed meanwhile; ``_apply`` already resumed the device
        self._armed = False
        self._resume()


# --- the option words ---------------------------------------------------------------------

_KINDS = {"bw": "bandwidth", "iops": "ops", "pps": "ops"}


def rate_words(prefix: str = "", ops_word: str = "iops") -> tuple[str, ...]:
    """The option words of one direction: ``bw``, ``iops`` and their bursts (``prefix``
    ``rx-``/``tx-`` and ``ops_word`` ``pps`` for a network interface)."""
    return tuple(
        f"{prefix}{word}{suffix}" for word in ("bw", ops_word) for suffix in ("", "-burst")
    )


def _amount(field: str, word: str, text: str | int, bandwidth: bool) -> int:
    """A rate or burst as written: bytes with a unit (``50M``) for bandwidth, a count for
    operations."""
    if isinstance(text, bool):
        raise ConfigError(field, f"{word}: give a number, not true or false")
    if isinstance(text, str) and text.startswith("-"):
        raise ConfigError(field, f"{word}={text}: a rate cannot be negative")
    if bandwidth:
        try:
            return parse_size(text)
        except ValueError:
            raise ConfigError(
                field, f"{word}={text}: give bytes a second with a unit, like 50M or 512K"
            ) from None
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(field, f"{word}={text}: a rate cannot be negative")
        return text
    if not text.isdigit():
        raise ConfigError(field, f"{word}={text}: give a whole number a second, like 1000")
    return int(text)


def parse_rate(
    field: str,
    pairs: Mapping[str, str | int | None],
    prefix: str = "",
    ops_word: str = "iops",
    base: RateLimit | None = None,
) -> RateLimit | None:
    """The limit that the words of one direction in ``pairs`` give (others are ignored),
    applied over ``base``: a word's value replaces the base's, ``None`` removes it (a rate's
    burst with it). Returns ``None`` when nothing is limited. Checked (``check_rate``)."""
    bw, bw_burst, ops, ops_burst = rate_words(prefix, ops_word)
    values = (base or RateLimit())._asdict()
    for word, key, bandwidth in (
        (bw, "bandwidth", True),
        (ops, "ops", False),
        (bw_burst, "bandwidth_burst", True),
        (ops_burst, "ops_burst", False),
    ):
        if word not in pairs:
            continue
        text = pairs[word]
        if text is None:
            values[key] = None if key in ("bandwidth", "ops") else 0
            if key in ("bandwidth", "ops"):
                values[f"{key}_burst"] = 0
            continue
        values[key] = _amount(field, word, text, bandwidth)
    limit = RateLimit(**values)
    check_rate(field, limit, prefix, ops_word)
    return None if limit.unlimited else limit


def check_rate(field: str, limit: RateLimit, prefix: str = "", ops_word: str = "iops") -> None:
    """Refuse a limit that cannot be meant: negative, zero, absurdly high, or a burst
    without its rate."""
    bw, bw_burst, ops, ops_burst = rate_words(prefix, ops_word)
    for word, rate, burst, burst_word, highest, show in (
        (bw, limit.bandwidth, limit.bandwidth_burst, bw_burst, MAX_BANDWIDTH, format_size),
        (ops, limit.ops, limit.ops_burst, ops_burst, MAX_OPS, str),
    ):
        if burst < 0:
            raise ConfigError(field, f"{burst_word}={burst}: a burst cannot be negative")
        if rate is None:
            if burst:
                raise ConfigError(
                    field, f"{burst_word} without {word}: a burst is on top of a rate; give both"
                )
            continue
        if rate <= 0:
            raise ConfigError(
                field, f"{word}={rate}: a rate must be above 0 (leave it out for no limit)"
            )
        if rate > highest:
            raise ConfigError(
                field, f"{word}={show(rate)} is beyond any device: give at most {show(highest)}"
            )
        if burst > highest:
            raise ConfigError(
                field, f"{burst_word}={show(burst)} is beyond any device: at most {show(highest)}"
            )
