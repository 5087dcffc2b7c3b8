"""Where the daemon keeps what must outlive it: declared VMs and the event log.

``Store`` is the narrow interface the daemon needs (put/get/list/delete VM records, append
and read events); ``SqliteStore`` keeps them in one SQLite file in WAL mode, behind one
connection guarded by a lock, so any thread may call it. The schema carries a version
(``PRAGMA user_version``); a file from a newer kasou is refused rather than misread.

The store knows nothing of processes: a record's ``pid`` and ``pid_start`` are only what the
daemon wrote, to be checked again when it re-attaches.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from kasou.errors import HostError
from kasou.spec import DesiredState, Event, VmInfo, VmSpec, VmState

__all__ = ["SqliteStore", "Store", "VmRecord"]

SCHEMA_VERSION = 1


@dataclasses.dataclass
class VmRecord:
    """One declared VM as the daemon keeps it: its ``VmInfo`` fields and, while a process
    runs, that process's start time (``/proc/PID/stat`` field 22) to tell it from a reused
    pid."""

    spec: VmSpec
    state: VmState = VmState.CREATED
    desired: DesiredState = DesiredState.STOPPED
    pid: int | None = None
    pid_start: int | None = None
    restarts: int = 0
    exit_status: int | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    backoff_until: float | None = None
    message: str = ""
    recent_restarts: builtins.list[float] = dataclasses.field(default_factory=builtins.list)
    """When the restart policy last restarted it (``time.time()``), for the crash-loop
    limit; kept here so that the count survives a daemon restart."""

    @property
    def name(self) -> str:
        return self.spec.name

    def info(self) -> VmInfo:
        return VmInfo(
            name=self.spec.name,
            spec=self.spec,
            state=self.state,
            desired=self.desired,
            pid=self.pid,
            restarts=self.restarts,
            exit_status=self.exit_status,
            created_at=self.created_at,
            started_at=self.started_at,
            backoff_until=self.backoff_until,
            message=self.message,
        )

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["spec"] = self.spec.model_dump(mode="json")
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> VmRecord:
        fields = json.loads(text)
        fields["spec"] = VmSpec.model_validate(fields["spec"])
        fields["state"] = VmState(fields["state"])
        fields["desired"] = DesiredState(fields["desired"])
        return cls(**fields)


class Store(Protocol):
    """What the daemon persists. Implementations must be safe to call from any thread."""

    def put(self, record: VmRecord) -> None: ...

    def get(self, name: str) -> VmRecord | None: ...

    def list(self) -> builtins.list[VmRecord]: ...

    def delete(self, name: str) -> None: ...

    def append_event(
        self, vm: str | None, kind: str, state: VmState | None = None, message: str = ""
    ) -> Event: ...

    def events(
        self, since: int = 0, vm: str | None = None, limit: int = 1000
    ) -> builtins.list[Event]: ...

    def last_event_id(self) -> int: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    vm TEXT,
    kind TEXT NOT NULL,
    state TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id);
"""


class SqliteStore:
    """A ``Store`` in one SQLite file (WAL: readers never wait on the writer's fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self._db.close()
                raise HostError(
                    f"{path}: written by a newer kasou (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}): upgrade kasou or use another --state-dir"
                )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as error:
            raise HostError(f"{path}: cannot open the daemon's database: {error}") from error

    def put(self, record: VmRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO vms (name, record) VALUES (?, ?)",
                (record.name, record.to_json()),
            )

    def get(self, name: str) -> VmRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM vms WHERE name = ?", (name,)).fetchone()
        return VmRecord.from_json(row[0]) if row else None

    def list(self) -> builtins.list[VmRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM vms ORDER BY name").fetchall()
        return [VmRecord.from_json(row[0]) for row in rows]

    def delete(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM vms WHERE name = ?", (name,))

    def append_event(
        self, vm: str | None, kind: str, state: VmState | None = None, message: str = ""
    ) -> Event:
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (time, vm, kind, state, message) VALUES (?, ?, ?, ?, ?)",
                (now, vm, kind, state.value if state else None, message),
            )
            event_id = cursor.lastrowid
        assert event_id is not None
        return Event(id=event_id, time=now, vm=vm, kind=kind, state=state, message=message)

    def events(
        self, since: int = 0, vm: str | None = None, limit: int = 1000
    ) -> builtins.list[Event]:
        query = "SELECT id, time, vm, kind, state, message FROM events WHERE id > ?"
        arguments: list[object] = [since]
        if vm is not None:
            query += " AND vm = ?"
            arguments.append(vm)
        query += " ORDER BY id LIMIT ?"
        arguments.append(max(0, limit))
        with self._lock:
            rows = self._db.execute(query, arguments).fetchall()
        return [
            Event(
                id=row[0],
                time=row[1],
                vm=row[2],
                kind=row[3],
                state=VmState(row[4]) if row[4] else None,
                message=row[5],
            )
            for row in rows
        ]

    def last_event_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()
