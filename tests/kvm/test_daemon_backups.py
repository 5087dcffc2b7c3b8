"""kasoud's backups, restores, clones and migrations with guest-kit VMs.

The guest is the ``memcheck`` workload: it rewrites its memory area pass after pass, first
checking every word holds what it last wrote, and prints ``memcheck: pass P`` every 8th
pass. A VM brought back from a backup, a snapshot or a migration goes on from the pass it
was saved at (never from 0, never printing ``memcheck: ready`` again) without a wrong word.

Waits are on the daemon's events or on the console log growing, with deadlines.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kasou.api import create_app
from kasou.daemon import Daemon
from kasou.daemon._backups import kept, next_due
from kasou.errors import SpecError, StateError
from kasou.guestkit import FAIL_PREFIX, cmdline
from kasou.spec import (
    PROBLEM_BASE,
    Backup,
    BackupPolicy,
    BackupSchedule,
    Retention,
    VmSpec,
    VmState,
)

from ._kasoud import Kasoud, remove_tmp, short_tmp

PASS = re.compile(r"memcheck: pass (\d+)\n")
READY = "memcheck: ready"


def _memcheck(name: str, kernel: Path) -> VmSpec:
    return VmSpec(
        name=name,
        kernel=str(kernel),
        memory="64M",
        cmdline="console=ttyS0 " + cmdline("memcheck", mib=8, report=8),
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kb"))  # sockets: keep it short
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    opened = Daemon.open(state_dir)
    yield opened
    opened.close(stop_vms=True)


def _log(daemon: Daemon, name: str, start: int = 0) -> str:
    path = daemon.paths(name).console_log
    text = path.read_bytes()[start:].decode(errors="replace") if path.exists() else ""
    assert FAIL_PREFIX not in text, text
    return text


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling a file the VM writes; the deadline decides


def _passes(daemon: Daemon, name: str, count: int, start: int = 0) -> list[int]:
    """The pass numbers ``name`` printed after byte ``start`` of its log, once there are
    ``count``."""
    _until(
        f"{count} passes of {name}",
        lambda: len(PASS.findall(_log(daemon, name, start))) >= count,
    )
    return [int(p) for p in PASS.findall(_log(daemon, name, start))]


def _goes_on(daemon: Daemon, name: str, saved: int, start: int = 0) -> None:
    """``name`` runs memcheck on from pass ``saved``: not booted again, no pass lost."""
    after = _passes(daemon, name, 2, start)
    assert after[0] >= saved and after == sorted(after), after
    assert READY not in _log(daemon, name, start)


def _event_kinds(daemon: Daemon, name: str) -> list[str]:
    return [event.kind for event in daemon.events(vm=name)]


def test_backup_restores_into_a_new_vm_and_into_itself(daemon: Daemon, guest_elf: Path) -> None:
    daemon.create(_memcheck("src", guest_elf), start=True)
    _passes(daemon, "src", 2)
    saved = _passes(daemon, "src", 2)[-1]
    backup = daemon.backups.create("src")
    assert daemon.backups.list("src") == [backup]
    assert backup.size > 1 << 20 and "backup" in _event_kinds(daemon, "src")
    assert daemon.get("src").state is VmState.RUNNING  # paused only while written

    copy = daemon.backups.restore("src", backup.id, "copy")
    assert copy.state is VmState.RUNNING and copy.spec.clone and copy.spec.restore
    _goes_on(daemon, "copy", saved)
    # Pruning the backup does not take the files the new VM runs from.
    daemon.backups.delete("src", backup.id)
    assert daemon.backups.list("src") == []
    daemon.restart("copy")
    _goes_on(daemon, "copy", saved, start=daemon.paths("copy").console_log.stat().st_size)

    saved = _passes(daemon, "src", 1)[-1]
    again = daemon.backups.create("src")
    _until("src to run past its backup", lambda: _passes(daemon, "src", 1)[-1] > saved + 16)
    start = daemon.paths("src").console_log.stat().st_size
    restored = daemon.backups.restore("src", again.id, None)  # into itself: stopped, brought back
    assert restored.state is VmState.RUNNING and not restored.spec.clone
    assert "backup-restored" in _event_kinds(daemon, "src")
    _goes_on(daemon, "src", saved, start)
    # Back to where it was at the backup, not where it had run to since.
    assert _passes(daemon, "src", 1, start)[0] <= saved + 16


def test_the_api_drives_backups(daemon: Daemon, guest_elf: Path) -> None:
    daemon.create(_memcheck("web", guest_elf), start=True)
    _passes(daemon, "web", 1)
    with TestClient(create_app(daemon)) as api:
        answer = api.post("/v1/vms/web/backups")
        assert answer.status_code == 202, answer.text
        operation = answer.json()
        _until(
            "the backup operation",
            lambda: api.get(f"/v1/operations/{operation['id']}").json()["state"] != "running",
        )
        done = api.get(f"/v1/operations/{operation['id']}").json()
        assert done["state"] == "done", done
        listed = api.get("/v1/vms/web/backups").json()
        assert [b["id"] for b in listed] == [done["result"]["id"]]
        missing = api.get("/v1/vms/web/backups/20000101T000000-abcdef")
        assert missing.status_code == 404
        assert missing.json()["type"] == PROBLEM_BASE + "not-found"
        assert api.get("/v1/vms/web/backups/..%2f..").status_code == 404
        policy = {"schedule": None, "retention": {"keep_last": 1}}
        assert api.put("/v1/vms/web/backup-policy", json=policy).status_code == 200
        assert api.get("/v1/vms/web/backup-policy").json()["retention"]["keep_last"] == 1
        bad = api.put("/v1/vms/web/backup-policy", json={"schedule": {}})
        assert bad.status_code == 422
        restored = api.post(f"/v1/vms/web/backups/{listed[0]['id']}/restore", json={"name": "web2"})
        assert restored.status_code == 201, restored.text
        assert restored.json()["state"] == "running"
        taken = api.post(f"/v1/vms/web/backups/{listed[0]['id']}/restore", json={"name": "web2"})
        assert taken.status_code == 409


def _at(day: int, hour: int) -> float:
    return datetime.datetime(2026, 3, day, hour, 0).timestamp()


def test_retention_keeps_the_newest_of_each_day_and_week() -> None:
    # 2026-03-02 is a Monday: days 2..8 are one ISO week, 9..15 the next.
    times = [_at(2, 1), _at(2, 9), _at(5, 9), _at(9, 1), _at(10, 1), _at(10, 5), _at(11, 3)]
    backups = [Backup(id=f"b{i}", vm="v", created=t, size=0) for i, t in enumerate(times)]
    assert kept(backups, None) == {f"b{i}" for i in range(7)}
    assert kept(backups, Retention(keep_last=2)) == {"b6", "b5"}
    assert kept(backups, Retention(keep_daily=3)) == {"b6", "b5", "b3"}
    assert kept(backups, Retention(keep_weekly=2)) == {"b6", "b2"}
    assert kept(backups, Retention(keep_last=1, keep_daily=2, keep_weekly=2)) == {
        "b6",
        "b5",
        "b2",
    }
    assert kept(backups, Retention(keep_last=0)) == {"b6"}  # the newest always stays


def test_schedules_come_due() -> None:
    start = _at(2, 9)
    assert next_due(BackupSchedule(every=60), start) == start + 60
    assert next_due(BackupSchedule(daily_at="03:30"), start) == _at(3, 3) + 1800
    assert next_due(BackupSchedule(daily_at="10:00"), start) == _at(2, 10)


def test_retention_and_schedule_on_a_running_vm(daemon: Daemon, guest_elf: Path) -> None:
    daemon.create(_memcheck("db", guest_elf), start=True)
    _passes(daemon, "db", 1)
    made = [daemon.backups.create("db", now=time.time() - 10 + i) for i in range(3)]
    daemon.backups.set_policy("db", BackupPolicy(retention=Retention(keep_last=2)))
    assert [b.id for b in daemon.backups.list("db")] == [made[1].id, made[2].id]
    assert "backup-removed" in _event_kinds(daemon, "db")
    with pytest.raises(SpecError, match="one of the two"):
        daemon.backups.set_policy("db", BackupPolicy(schedule=BackupSchedule()))

    seen = daemon.events()[-1].id
    daemon.backups.set_policy(
        "db", BackupPolicy(schedule=BackupSchedule(every=1), retention=Retention(keep_last=2))
    )
    deadline = time.monotonic() + 20
    scheduled: list[str] = []
    while len(scheduled) < 2:
        assert time.monotonic() < deadline, "the schedule never fired twice"
        events = daemon.wait_events(seen, deadline - time.monotonic())
        seen = events[-1].id if events else seen
        scheduled += [e.message for e in events if e.kind == "backup" and "scheduled" in e.message]
    daemon.backups.set_policy("db", BackupPolicy(retention=Retention(keep_last=2)))
    backups = daemon.backups.list("db")
    assert len(backups) == 2 and all(b.scheduled for b in backups)

    daemon.stop("db")
    with pytest.raises(StateError, match="running or paused"):
        daemon.backups.create("db")


def test_verify_passes_a_good_backup_and_fails_a_damaged_one(
    daemon: Daemon, guest_elf: Path
) -> None:
    daemon.create(_memcheck("app", guest_elf), start=True)
    _passes(daemon, "app", 1)
    backup = daemon.backups.create("app")
    result = daemon.backups.verify("app", backup.id)
    assert result["ok"] and result["state"] == "running"
    assert [vm.name for vm in daemon.list()] == ["app"]  # the trial VM is gone
    state = daemon.backups.path("app", backup.id) / "state.kasou"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="damaged"):
        daemon.backups.verify("app", backup.id)
    assert "backup-verify-failed" in _event_kinds(daemon, "app")
    assert [vm.name for vm in daemon.list()] == ["app"]


def test_three_clones_of_one_snapshot_run_at_once(
    daemon: Daemon, guest_elf: Path, state_dir: Path
) -> None:
    daemon.create(_memcheck("gold", guest_elf), start=True)
    saved = _passes(daemon, "gold", 2)[-1]
    folder = state_dir / "gold-snap"
    daemon.request("gold", "snapshot", path=str(folder))
    daemon.stop("gold")
    with pytest.raises(SpecError, match="restore"):
        daemon.create(VmSpec(name="bad", restore=str(state_dir), clone=True))
    with pytest.raises(SpecError, match="kernel"):
        daemon.create(VmSpec(name="bad", restore=str(folder), kernel=str(guest_elf)))
    names = [f"clone-{i}" for i in range(3)]
    for name in names:
        info = daemon.create(VmSpec(name=name, restore=str(folder), clone=True), start=True)
        assert info.state is VmState.RUNNING
    for name in names:
        _goes_on(daemon, name, saved)
    sockets = {str(daemon.paths(name).api_sock) for name in names}
    assert len(sockets) == 3 and all(daemon.get(n).state is VmState.RUNNING for n in names)


def test_migrate_between_two_vms_of_one_daemon(
    daemon: Daemon, guest_elf: Path, state_dir: Path
) -> None:
    daemon.create(_memcheck("here", guest_elf), start=True)
    _passes(daemon, "here", 2)
    incoming = state_dir / "in.sock"
    there = daemon.create(VmSpec(name="there", incoming=f"unix:{incoming}"), start=True)
    assert there.state is VmState.RUNNING
    _until("the destination to listen", incoming.exists)
    shares: list[float] = []
    result = daemon.migrate("here", f"unix:{incoming}", progress=shares.append)
    assert result["phase"] == "completed"
    last = PASS.findall(_log(daemon, "here"))[-1]
    assert daemon.get("here").state is VmState.STOPPED
    assert "migrated" in _event_kinds(daemon, "here")
    _goes_on(daemon, "there", int(last))
    assert daemon.request("there", "status")["state"] == "running"
    assert all(0 <= share <= 1 for share in shares)


def test_the_cli_backs_up_restores_snapshots_and_migrates(guest_elf: Path) -> None:
    root = short_tmp()
    kasoud = Kasoud(root)
    kasou = str(Path(sys.executable).parent / "kasou")

    def cli(*args: str) -> str:
        done = subprocess.run(
            [kasou, *args, "--host", str(kasoud.sock)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"kasou {' '.join(args)}: {done.stderr}"
        return done.stdout

    try:
        spec = _memcheck("src", guest_elf).model_dump(mode="json")
        assert kasoud.api.post("/v1/vms", json=spec, params={"start": True}).status_code == 201
        kasoud.wait_log("src", "memcheck: pass 8")
        made = json.loads(cli("backup", "create", "src", "--json"))
        listed = json.loads(cli("backup", "ls", "src", "--json"))
        assert [b["id"] for b in listed] == [made["id"]]
        assert json.loads(cli("backup", "verify", "src", made["id"], "--json"))["ok"]
        assert "copy running" in cli("backup", "restore", "src", made["id"], "--name", "copy")
        policy = json.loads(cli("backup", "policy", "src", "--keep-last", "3", "--json"))
        assert policy["retention"]["keep_last"] == 3 and policy["schedule"] is None

        snap = root / "snap"
        cli("snapshot", "create", "src", str(snap))
        assert "again running" in cli("restore", str(snap), "--name", "again", "--clone")

        incoming = root / "in.sock"
        assert "there running" in cli(
            "create", "there", "--incoming", f"unix:{incoming}", "--start"
        )
        _until("the destination to listen", incoming.exists)
        assert "is stopped here" in cli("migrate", "src", f"unix:{incoming}")
        assert kasoud.api.get("/v1/vms/src").json()["state"] == "stopped"
        kasoud.wait_log("there", "memcheck: pass")
        assert READY not in kasoud.api.get("/v1/vms/there/logs").text
        missing = subprocess.run(
            [kasou, "backup", "verify", "src", "nope", "--host", str(kasoud.sock)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert missing.returncode == 2 and "no backup" in missing.stderr
    finally:
        kasoud.remove_all()
        kasoud.terminate()
        remove_tmp(root)
