"""Memory reclaim (``vmm/reclaim.py``): the policy as a pure function over host readings,
its option and request parsing, the host reading from /proc, and the monitor driving a real
balloon device on a real event loop with readings the test makes up (the real host is never
put under pressure)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.cli import main
from kasou.devices.virtio.balloon import Balloon
from kasou.errors import ConfigError, HostError
from kasou.event import EventLoop
from kasou.vmm.config import VmConfig
from kasou.vmm.reclaim import (
    HostMemory,
    ReclaimConfig,
    ReclaimMonitor,
    ReclaimState,
    check_reclaim,
    decide,
    min_free_bytes,
    parse_reclaim,
    read_host_memory,
)
from kasou.vmm.requests import RequestKind, parse_request
from kasou.vmm.snapshot import decode_config, encode_config

MIB = 1 << 20
GIB = 1 << 30
HOST = 16 * GIB  # MemTotal of the made-up host: min-free is 1.6 GiB at the default 10 %
POLICY = ReclaimConfig(limit=256 * MIB, step=64 * MIB, calm=3)
PRESSED = HostMemory(HOST, 1 * GIB, 0.0)  # MemAvailable under 10 %
STALLING = HostMemory(HOST, 8 * GIB, 25.0)  # plenty free, but PSI some avg10 above 10
BETWEEN = HostMemory(HOST, HOST // 10 + 32 * MIB, 0.0)  # over min-free, under min-free + step
CALM = HostMemory(HOST, 8 * GIB, 0.0)


def _run(readings: list[HostMemory], user: int = 0, policy: ReclaimConfig = POLICY) -> list[int]:
    """The balloon targets ``decide`` sets, one per reading, from an empty state."""
    state = ReclaimState()
    targets = []
    for reading in readings:
        decision = decide(policy, state, user, reading)
        assert decision.target == max(decision.state.level, user)
        state = decision.state
        targets.append(decision.target)
    return targets


# --- the policy ---------------------------------------------------------------------------


def test_memavailable_under_min_free_raises_the_target_a_step_at_a_time_up_to_max() -> None:
    assert _run([PRESSED] * 6) == [64 * MIB, 128 * MIB, 192 * MIB, 256 * MIB, 256 * MIB, 256 * MIB]


def test_psi_above_its_threshold_raises_the_target_alone() -> None:
    assert _run([STALLING] * 2) == [64 * MIB, 128 * MIB]
    # The same PSI under a higher threshold is no pressure at all.
    assert _run([STALLING] * 2, policy=POLICY._replace(psi=30.0)) == [0, 0]
    # A host without PSI is judged by MemAvailable alone.
    assert _run([HostMemory(HOST, 8 * GIB, None)]) == [0]


def test_a_step_that_would_pass_max_stops_at_max() -> None:
    policy = POLICY._replace(limit=100 * MIB)
    assert _run([PRESSED] * 3, policy=policy) == [64 * MIB, 100 * MIB, 100 * MIB]


def test_min_free_in_bytes_replaces_the_percentage() -> None:
    policy = POLICY._replace(min_free=512 * MIB)
    assert min_free_bytes(policy, HOST) == 512 * MIB
    assert min_free_bytes(POLICY, HOST) == HOST // 10
    assert _run([PRESSED], policy=policy) == [0]  # 1 GiB available is above 512 MiB
    assert _run([HostMemory(HOST, 256 * MIB, None)], policy=policy) == [64 * MIB]


def test_the_target_never_falls_below_the_users_and_raises_start_from_it() -> None:
    assert _run([CALM] * 5, user=96 * MIB) == [96 * MIB] * 5
    # Under pressure the first raise is a step above the user's target, not above nothing.
    assert _run([PRESSED] * 3, user=96 * MIB) == [160 * MIB, 224 * MIB, 256 * MIB]
    # A user's target above max stays: kasou only never raises past max by itself.
    assert _run([PRESSED, CALM, CALM, CALM], user=300 * MIB) == [300 * MIB] * 4


def test_the_target_comes_back_only_after_calm_readings_one_step_each() -> None:
    targets = _run([PRESSED] * 4 + [CALM] * 12)
    assert targets[3] == 256 * MIB
    # Three calm readings for every step down, then nothing more to give back.
    assert targets[4:] == [
        *[256 * MIB] * 2,
        192 * MIB,
        *[192 * MIB] * 2,
        128 * MIB,
        *[128 * MIB] * 2,
        64 * MIB,
        *[64 * MIB] * 2,
        0,
    ]


def test_readings_between_pressure_and_calm_hold_the_target_and_restart_the_count() -> None:
    targets = _run([PRESSED, PRESSED, CALM, CALM, BETWEEN, CALM, CALM, BETWEEN, PRESSED])
    # No step back: the in-between reading broke each run of calm readings before the
    # third, and the pressure at the end raises again.
    assert targets == [64 * MIB, 128 * MIB, *[128 * MIB] * 6, 192 * MIB]


def test_coming_back_stops_at_the_users_target() -> None:
    state = ReclaimState()
    for _ in range(3):
        state = decide(POLICY, state, 0, PRESSED).state
    assert state.level == 192 * MIB
    # The user asks for 160 MiB meanwhile: one step back lands on it, and kasou holds nothing.
    for _ in range(3):
        decision = decide(POLICY, state, 160 * MIB, CALM)
        state = decision.state
    assert (decision.target, state.level) == (160 * MIB, 0)
    assert "no pressure" in decision.why


# --- options, checks, requests ------------------------------------------------------------


def test_the_option_with_every_value() -> None:
    policy = parse_reclaim("max=1G,min-free=512M,step=32M,interval=0.5,psi=20,calm=5")
    assert policy == ReclaimConfig(
        limit=GIB, min_free=512 * MIB, step=32 * MIB, interval=0.5, psi=20.0, calm=5
    )
    assert parse_reclaim("max=1G,min-free=5%") == ReclaimConfig(limit=GIB, min_free_percent=5.0)
    assert parse_reclaim("max=268435456") == ReclaimConfig(limit=256 * MIB)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "give max=SIZE"),
        ("step=64M", "give max=SIZE"),
        ("max=1G,size=2G", "'size=2G'"),
        ("max=1G,max=2G", "max is given twice"),
        ("max=lots", "'lots' is not a size"),
        ("max=1000", "whole 4 KiB pages"),
        ("max=1G,step=0", "step=0"),
        ("max=1G,min-free=150%", "min-free=150"),
        ("max=1G,min-free=-1%", "min-free=-1"),
        ("max=1G,interval=0", "interval=0"),
        ("max=1G,interval=nan", "interval=nan"),
        ("max=1G,psi=101", "psi=101"),
        ("max=1G,calm=1.5", "whole number"),
        ("max=1G,ro", "'ro'"),
    ],
)
def test_bad_options_are_refused(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"^reclaim: ") as refused:
        parse_reclaim(text)
    assert says in str(refused.value)


def test_max_must_leave_the_guest_a_floor() -> None:
    check_reclaim(ReclaimConfig(limit=768 * MIB), 1 * GIB)  # a quarter stays
    with pytest.raises(
        ConfigError, match=r"leaves the guest less than 256M of its 1G: give at most max=768M"
    ):
        check_reclaim(ReclaimConfig(limit=769 * MIB), 1 * GIB)
    check_reclaim(ReclaimConfig(limit=32 * MIB), 64 * MIB)  # 32 MiB stays
    with pytest.raises(ConfigError, match="too small for reclaim"):
        check_reclaim(ReclaimConfig(limit=4 * MIB), 32 * MIB)
    with pytest.raises(ConfigError, match="max=0"):
        check_reclaim(ReclaimConfig(limit=0), 1 * GIB)


def test_a_vm_config_refuses_reclaim_without_a_balloon_or_beyond_its_ram(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    policy = ReclaimConfig(limit=256 * MIB)
    with pytest.raises(ConfigError, match="add --balloon"):
        VmConfig(kernel=kernel, reclaim=policy)
    with pytest.raises(ConfigError, match="give at most max=192M"):
        VmConfig(kernel=kernel, memory=256 * MIB, balloon=True, reclaim=policy)
    config = VmConfig(kernel=kernel, memory=GIB, balloon=True, reclaim=policy)
    # A snapshot keeps the policy with the VM's config.
    assert decode_config(encode_config(config)).reclaim == policy


def test_run_refuses_reclaim_without_a_balloon_before_building_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No --kernel: the default guest would be built first if the check came later.
    assert main(["run", "--reclaim", "max=256M"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "kasou: error: reclaim: --reclaim inflates the balloon: add --balloon\n"


def test_the_reclaim_request_takes_new_values_and_refuses_bad_ones() -> None:
    assert parse_request({"request": "reclaim"}).reclaim == {}
    request = parse_request(
        {"request": "reclaim", "max": "512M", "min_free": "5%", "interval": 2, "calm": 4}
    )
    assert request.kind is RequestKind.RECLAIM
    assert request.reclaim == {
        "limit": 512 * MIB,
        "min_free": None,
        "min_free_percent": 5.0,
        "interval": 2.0,
        "calm": 4,
    }
    for bad in ({"max": -1}, {"step": True}, {"psi": "high"}, {"interval": 1e9}, {"size": 1}):
        with pytest.raises(ConfigError):
            parse_request({"request": "reclaim", **bad})


# --- the host -----------------------------------------------------------------------------


def test_the_hosts_memory_reads_from_proc() -> None:
    reading = read_host_memory()
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(meminfo.split("MemTotal:")[1].split()[0])
    assert reading.total == total_kib * 1024
    assert 0 < reading.available <= reading.total
    if Path("/proc/pressure/memory").exists():
        assert reading.psi_some_avg10 is not None and 0 <= reading.psi_some_avg10 <= 100


def test_a_host_without_meminfo_is_a_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kasou.vmm.reclaim.MEMINFO", "/nonexistent/meminfo")
    with pytest.raises(HostError, match="cannot read the host's memory"):
        read_host_memory()


# --- the monitor --------------------------------------------------------------------------


class Host:
    """Made-up readings: the host is under pressure while ``pressed``; each reading is
    counted and announced, so a test can wait for the monitor's timer without sleeping."""

    def __init__(self) -> None:
        self.pressed = False
        self.broken = False
        self.readings = 0
        self.changed = threading.Condition()

    def __call__(self) -> HostMemory:
        with self.changed:
            self.readings += 1
            self.changed.notify_all()
        if self.broken:
            raise HostError("meminfo went away")
        return PRESSED if self.pressed else CALM


@pytest.fixture
def events() -> Iterator[EventLoop]:
    loop = EventLoop("test-reclaim")
    loop.start()
    yield loop
    loop.stop()


def _monitor(loop: EventLoop, host: Host, policy: ReclaimConfig = POLICY) -> ReclaimMonitor:
    # The timer's first reading is an hour away: these tests read by calling check().
    return ReclaimMonitor(loop, policy._replace(interval=3600), 512 * MIB, host)


def test_the_monitor_moves_a_balloon_and_reports_it(
    events: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    host, balloon = Host(), Balloon(events)
    monitor = _monitor(events, host)
    monitor.attach(balloon)
    host.pressed = True
    with caplog.at_level(logging.INFO, logger="kasou.vmm.reclaim"):
        for _ in range(5):
            monitor.check()
    assert balloon.target == 256 * MIB
    assert "balloon target 192 MiB -> 256 MiB (MemAvailable 1024 MiB < min-free" in caplog.text
    report = monitor.report()
    json.dumps(report)  # what the control socket sends
    assert report["policy"]["max"] == 256 * MIB
    assert report["host"]["mem_available"] == GIB
    assert report["host"]["pressure"].startswith("MemAvailable 1024 MiB < min-free")
    assert (report["target"], report["taken"], report["raises"]) == (256 * MIB, 256 * MIB, 4)
    assert [move["to"] for move in report["history"]] == [64 * MIB, 128 * MIB, 192 * MIB, 256 * MIB]
    host.pressed = False
    for _ in range(3):
        monitor.check()
    assert balloon.target == 192 * MIB
    assert monitor.report()["lowers"] == 1


def test_the_users_target_is_the_floor_of_the_monitors(events: EventLoop) -> None:
    host, balloon = Host(), Balloon(events)
    monitor = _monitor(events, host)
    monitor.attach(balloon)
    assert monitor.set_user_target(100 * MIB) == 100 * MIB
    assert balloon.target == 100 * MIB
    host.pressed = True
    monitor.check()
    assert balloon.target == 164 * MIB
    # The user lowers theirs: kasou's own level stays while the host is short.
    assert monitor.set_user_target(0) == 164 * MIB
    assert monitor.report()["taken"] == 164 * MIB
    with pytest.raises(ConfigError, match="more than the guest's"):
        monitor.set_user_target(GIB)


def test_the_policy_changes_live_and_a_bad_change_leaves_it(events: EventLoop) -> None:
    host, balloon = Host(), Balloon(events)
    monitor = _monitor(events, host)
    monitor.attach(balloon)
    host.pressed = True
    for _ in range(4):
        monitor.check()
    assert balloon.target == 256 * MIB
    monitor.update({"limit": 128 * MIB})  # a lower max takes effect at once
    assert balloon.target == 128 * MIB
    assert monitor.report()["history"][-1]["why"] == "max lowered to 128 MiB"
    monitor.update({"limit": 384 * MIB, "step": 128 * MIB})
    monitor.check()
    assert balloon.target == 256 * MIB
    with pytest.raises(ConfigError, match="give at most max=384M"):
        monitor.update({"limit": 400 * MIB})
    assert monitor.policy.limit == 384 * MIB


def test_a_host_that_cannot_be_read_is_logged_once_and_the_monitor_goes_on(
    events: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    host, balloon = Host(), Balloon(events)
    monitor = _monitor(events, host)
    monitor.attach(balloon)
    host.broken = True
    with caplog.at_level(logging.INFO, logger="kasou.vmm.reclaim"):
        monitor.check()
        monitor.check()
        assert caplog.text.count("cannot read the host's memory: meminfo went away") == 1
        assert monitor.report()["read_error"] == "meminfo went away"
        host.broken, host.pressed = False, True
        monitor.check()
    assert balloon.target == 64 * MIB
    assert monitor.report()["read_error"] is None


def test_the_timer_reads_every_interval_until_detached(events: EventLoop) -> None:
    host, balloon = Host(), Balloon(events)
    monitor = ReclaimMonitor(events, POLICY._replace(interval=0.01), 512 * MIB, host)
    host.pressed = True
    monitor.attach(balloon)
    with host.changed:
        assert host.changed.wait_for(lambda: balloon.target == 256 * MIB, timeout=10)
    monitor.detach()
    # Whatever timer was set when it detached finds its generation gone and does nothing.
    host.pressed = False
    with host.changed:
        seen = host.readings
    done = threading.Event()
    events.call_later(0.05, done.set)
    assert done.wait(10)
    assert host.readings == seen
    assert balloon.target == 256 * MIB
