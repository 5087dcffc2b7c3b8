"""The ``rate-limit`` request: change a running VM's disk and network rate limits.

This module owns the request's arguments (which words, what they mean for which device) and
applying them to a device of a built VM. The buckets and the throttling are the devices'
(``devices/ratelimit.py``); the limits given at start are ``DiskConfig.rate`` and
``NetConfig.rx_rate``/``tx_rate``. A change lives as long as the device: it is not written
back into the VM's config, so a snapshot keeps the limits the VM was started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kasou.devices.ratelimit import parse_rate, rate_words
from kasou.errors import ConfigError

if TYPE_CHECKING:
    from kasou.vmm.vm import Vm

__all__ = ["DISK_WORDS", "NET_WORDS", "parse_rate_changes", "set_rate_limit"]

DISK_WORDS = rate_words()
NET_WORDS = (*rate_words("rx-", "pps"), *rate_words("tx-", "pps"))
RATE_KEYS = frozenset(word.replace("-", "_") for word in (*DISK_WORDS, *NET_WORDS))
"""The request's limit arguments: the option words with ``_`` for ``-`` (``rx_bw``)."""


def parse_rate_changes(message: Mapping[str, object]) -> dict[str, str | int | None]:
    """The limit arguments of a ``rate-limit`` request (untrusted JSON), as option words:
    a value is a rate or a burst (a number, or a string with a unit for bandwidth) and
    ``None`` removes it. Whether they suit the device is checked when applied."""
    changes: dict[str, str | int | None] = {}
    for key, value in message.items():
        if key not in RATE_KEYS:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise ConfigError(key, 'give a number, a size like "10M", or null to remove it')
        changes[key.replace("_", "-")] = value
    return changes


def set_rate_limit(vm: Vm, device: str, changes: Mapping[str, str | int | None]) -> dict[str, Any]:
    """Apply ``changes`` to the device ``device`` (its id in the ``devices`` list: block0,
    net0) and report its limits and what throttling did. No changes: only the report.
    Raises ``ConfigError`` for another device, a word the device has not, or a bad value,
    having changed nothing."""
    from kasou.devices.virtio.block import Block
    from kasou.devices.virtio.net import Net

    transport = vm.virtio().get(device)
    model = transport.device if transport is not None else None
    if not isinstance(model, Block | Net):
        names = [key for key, each in vm.virtio().items() if isinstance(each.device, Block | Net)]
        raise ConfigError(
            "device",
            f"{device!r} is not a disk or network interface of this VM: use one of "
            f"{', '.join(names) or '(none)'}",
        )
    if isinstance(model, Block):
        _only(device, changes, DISK_WORDS)
        if changes:
            model.set_rate_limit(parse_rate("rate-limit", changes, base=model.throttle.limit))
        return {"device": device, "rate_limit": model.throttle.describe()}
    _only(device, changes, NET_WORDS)
    # Both directions parsed before either changes: a bad value changes nothing.
    updates = [
        (throttle, parse_rate("rate-limit", changes, prefix, "pps", base=throttle.limit))
        for throttle, prefix in ((model.rx_throttle, "rx-"), (model.tx_throttle, "tx-"))
        if any(word.startswith(prefix) for word in changes)
    ]
    for throttle, limit in updates:
        throttle.set(limit)
    return {
        "device": device,
        "rx_rate_limit": model.rx_throttle.describe(),
        "tx_rate_limit": model.tx_throttle.describe(),
    }


def _only(device: str, changes: Mapping[str, object], words: tuple[str, ...]) -> None:
    wrong = sorted(set(changes) - set(words))
    if wrong:
        allowed = ", ".join(word.replace("-", "_") for word in words)
        raise ConfigError(
            "rate-limit",
            f"{device} has no {', '.join(word.replace('-', '_') for word in wrong)}: use {allowed}",
        )
