"""The daemon's SQLite store: VM records and the event log survive a reopen, from any thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from kasou.daemon import SqliteStore, VmRecord
from kasou.errors import HostError
from kasou.spec import DesiredState, Limits, RestartPolicy, VmSpec, VmState


def _record(name: str, **fields: object) -> VmRecord:
    spec = VmSpec(
        name=name,
        kernel="/boot/vmlinux",
        memory="64M",
        labels={"team": "a"},
        limits=Limits(cpu_pin={0: 1}),
        restart=RestartPolicy.ON_FAILURE,
    )
    return VmRecord(spec=spec, **fields)  # type: ignore[arg-type]


def test_records_round_trip_through_a_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "kasou.db")
    record = _record(
        "web", state=VmState.RUNNING, desired=DesiredState.RUNNING, pid=1234, pid_start=99
    )
    store.put(record)
    store.put(_record("db"))
    store.close()

    again = SqliteStore(tmp_path / "kasou.db")
    assert [r.name for r in again.list()] == ["db", "web"]
    back = again.get("web")
    assert back == record
    assert back is not None and back.spec.limits is not None
    assert back.spec.limits.cpu_pin == {0: 1}  # JSON keys come back as vCPU numbers
    assert back.info().state is VmState.RUNNING
    again.delete("web")
    assert again.get("web") is None
    assert [r.name for r in again.list()] == ["db"]
    again.close()


def test_events_grow_and_filter(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "kasou.db")
    assert store.last_event_id() == 0
    first = store.append_event("a", "created", VmState.CREATED)
    store.append_event("b", "created", VmState.CREATED, "hello")
    third = store.append_event(None, "host", None)
    assert first.id < third.id == store.last_event_id()
    assert [e.vm for e in store.events()] == ["a", "b", None]
    assert [e.id for e in store.events(since=first.id)] == [first.id + 1, third.id]
    assert [e.message for e in store.events(vm="b")] == ["hello"]
    assert len(store.events(limit=2)) == 2
    store.close()
    again = SqliteStore(tmp_path / "kasou.db")
    assert again.append_event("a", "deleted").id == third.id + 1  # ids never go back
    again.close()


def test_many_threads_write_at_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "kasou.db")

    def work(index: int) -> None:
        for step in range(20):
            store.put(_record(f"vm-{index}", restarts=step))
            store.append_event(f"vm-{index}", "state", VmState.RUNNING)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.list()) == 8
    assert all(r.restarts == 19 for r in store.list())
    assert len(store.events(limit=1000)) == 160
    store.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kasou.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(HostError, match="newer kasou"):
        SqliteStore(path)
