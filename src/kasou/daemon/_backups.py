"""Backups of daemon-run VMs: made, listed, pruned, scheduled, verified and restored.

A backup is a full snapshot written by kasou's own snapshot code through the VM's control
socket with every writable disk copied (``disks="all"``: the VM is paused while its memory,
device states and disks are written, then runs on), kept as one folder with a manifest::

    STATE/backups/NAME/ID/state.kasou, memory.bin, diskN.raw|qcow2   the snapshot
                                          (vmm/snapshot.py), the disks copied sparse
    STATE/backups/NAME/ID/backup.json     id, vm, created, scheduled, the VM's spec, the
                                          size and SHA-256 of every file above, and each
                                          disk: its path, its copy, the copy's size, SHA-256
    STATE/backups/NAME/policy.json        the VM's schedule and retention (kasou.spec)

A backup is written into a hidden ``.ID.tmp`` sibling and renamed into place once its
manifest is on disk, so a crash leaves no half backup (hidden folders are never listed and
are removed at the next backup). Disks the user attached by path are copied too, while the
VM is paused, so a backup's disks are consistent with its memory: a restore (into a new VM
or the same one) runs on a throw-away overlay over the backup's copy, never on the user's
file as it is now, which it does not write. Read-only disks are not copied: a restore reads
them where they are.

Retention (``kept``) and schedules (``next_due``) are pure functions of the backups' times
and ``now``; a scheduler thread sleeps on a condition until the next backup is due (no
polling) and is woken when a policy changes. Each backup, removal, verification and restore
is an event in the daemon's log.

Restoring hard-links the backup's files into the VM's own folder (the files are never written
again: memory is mapped copy-on-write and disks get overlays), so pruning the backup later
does not take them from the VM.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasou.errors import HostError, KasouError, NotFoundError, SpecError, StateError
from kasou.spec import (
    NAME_PATTERN,
    Backup,
    BackupPolicy,
    BackupSchedule,
    Retention,
    VmInfo,
    VmSpec,
    VmState,
)

if TYPE_CHECKING:
    from kasou.daemon._daemon import Daemon

__all__ = ["Backups", "kept", "next_due"]

log = logging.getLogger(__name__)

MANIFEST = "backup.json"
POLICY = "policy.json"
IMAGE = "image"  # a restored VM's own hard-linked copy of its backup, in its VM folder
_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzT-")


# --- pure policy -------------------------------------------------------------------------


def _day(created: float) -> tuple[int, int, int]:
    moment = time.localtime(created)
    return (moment.tm_year, moment.tm_mon, moment.tm_mday)


def _week(created: float) -> tuple[int, int]:
    year, week, _ = datetime.date(*_day(created)).isocalendar()
    return (year, week)


def kept(backups: Iterable[Backup], retention: Retention | None) -> set[str]:
    """The ids ``retention`` keeps of ``backups``: those any of its rules keeps, and always
    the newest (the backup just made is never pruned by its own policy). No retention, or
    one without rules: every backup."""
    newest_first = sorted(backups, key=lambda backup: (backup.created, backup.id), reverse=True)
    rules = retention.model_dump(exclude_none=True) if retention is not None else {}
    if not rules:
        return {backup.id for backup in newest_first}
    assert retention is not None
    keep = {backup.id for backup in newest_first[: max(1, retention.keep_last or 0)]}
    for count, bucket in ((retention.keep_daily, _day), (retention.keep_weekly, _week)):
        seen: builtins.list[object] = []
        for backup in newest_first:
            key = bucket(backup.created)
            if key in seen:
                continue  # an older backup of a day (week) already kept
            if len(seen) >= (count or 0):
                break
            seen.append(key)
            keep.add(backup.id)
    return keep


def next_due(schedule: BackupSchedule, last: float) -> float:
    """When the next scheduled backup is due, ``last`` being the latest backup (or attempt,
    or the moment the schedule was set): ``every`` seconds on, or the first ``daily_at``
    (local time) after it."""
    if schedule.every is not None:
        return last + schedule.every
    if schedule.daily_at is None:
        return float("inf")
    hour, minute = (int(part) for part in schedule.daily_at.split(":"))
    base = datetime.datetime.fromtimestamp(last)
    due = base.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if due.timestamp() <= last:
        due += datetime.timedelta(days=1)
    return due.timestamp()


# --- files -------------------------------------------------------------------------------


def _new_id(created: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _allocated(folder: Path) -> int:
    return sum(entry.stat().st_blocks * 512 for entry in folder.iterdir() if entry.is_file())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all (a temporary sibling, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as out:
        json.dump(value, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _check_id(backup_id: str) -> None:
    """A backup id is a path component: only what ``_new_id`` makes is looked up."""
    if not backup_id or len(backup_id) > 64 or not set(backup_id) <= _ID_CHARS:
        raise NotFoundError(f"no backup {backup_id!r}: list the VM's backups for their ids")


class Backups:
    """The backups of one daemon's VMs (``Daemon.backups``); every method is thread-safe."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.root = daemon.state_dir / "backups"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._busy: dict[str, threading.Lock] = {}  # one backup or restore per VM at a time
        self._last_try: dict[str, float] = {}
        self._closing = False
        self._thread = threading.Thread(
            target=self._schedule_loop, name="kasoud-backups", daemon=True
        )

    def start(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _vm_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._busy.setdefault(name, threading.Lock())

    # --- making and listing ---------------------------------------------------------------

    def create(self, name: str, *, scheduled: bool = False, now: float | None = None) -> Backup:
        """Back up the running (or paused) VM ``name``; then apply its retention."""
        with self._vm_lock(name):
            backup = self._create(name, scheduled, time.time() if now is None else now)
        self.prune(name)
        return backup

    def _create(self, name: str, scheduled: bool, created: float) -> Backup:
        info = self._daemon.get(name)
        if info.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError(name, info.state.value, "back up", "running or paused")
        folder = self.root / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a daemon that died mid-way
        backup_id = _new_id(created)
        work = folder / f".{backup_id}.tmp"
        try:
            # The snapshot pauses the VM while it writes memory, states and every writable
            # disk.
            result = self._daemon.request(name, "snapshot", path=str(work), disks="all")
            files = {
                entry.name: {"size": entry.stat().st_size, "sha256": _digest(entry)}
                for entry in sorted(work.iterdir())
                if entry.is_file()
            }
            disks = [
                {
                    "path": str(disk.get("path")),
                    "file": disk.get("copy"),
                    **files.get(str(disk.get("copy")), {}),
                }
                for disk in result.get("disks", [])
            ]
            manifest = {
                "id": backup_id,
                "vm": name,
                "created": created,
                "scheduled": scheduled,
                "snapshot": result.get("id"),
                "paused_seconds": result.get("paused_seconds"),
                "spec": info.spec.model_dump(mode="json"),
                "files": files,
                "disks": disks,
            }
            _write_json(work / MANIFEST, manifest)
            os.rename(work, folder / backup_id)
        except BaseException as error:
            shutil.rmtree(work, ignore_errors=True)
            self._daemon._event(name, "backup-failed", None, str(error))
            if isinstance(error, OSError):
                raise HostError(f"cannot write a backup of {name}: {error}") from error
            raise
        backup = self._read(name, backup_id)
        self._daemon._event(
            name,
            "backup",
            None,
            f"backup {backup_id} ({backup.size >> 20} MiB{', scheduled' if scheduled else ''})",
        )
        with self._wake:
            self._wake.notify_all()  # the next scheduled one counts from this one
        return backup

    def _read(self, name: str, backup_id: str) -> Backup:
        folder = self.root / name / backup_id
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return Backup(
                id=backup_id,
                vm=name,
                created=float(manifest["created"]),
                size=_allocated(folder),
                scheduled=bool(manifest.get("scheduled", False)),
                disks=manifest.get("disks"),
            )
        except FileNotFoundError:
            raise NotFoundError(f"{name} has no backup {backup_id!r}") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NotFoundError(f"backup {backup_id} of {name} is unreadable: {error}") from error

    def list(self, name: str) -> builtins.list[Backup]:
        """``name``'s backups, oldest first (the VM itself may be gone)."""
        if not _is_name(name):
            raise NotFoundError(f"no VM named {name!r}")
        folder = self.root / name
        backups = []
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            with contextlib.suppress(NotFoundError):
                backups.append(self._read(name, entry.name))
        return sorted(backups, key=lambda backup: (backup.created, backup.id))

    def get(self, name: str, backup_id: str) -> Backup:
        _check_id(backup_id)
        if not _is_name(name):
            raise NotFoundError(f"no VM named {name!r}")
        return self._read(name, backup_id)

    def path(self, name: str, backup_id: str) -> Path:
        """The backup's folder: a snapshot ``kasou run --restore`` takes."""
        self.get(name, backup_id)
        return self.root / name / backup_id

    def delete(self, name: str, backup_id: str, why: str = "") -> None:
        folder = self.path(name, backup_id)
        hidden = folder.with_name(f".{backup_id}.tmp")
        try:
            os.rename(folder, hidden)  # gone from the list at once, removed at leisure
        except FileNotFoundError:
            raise NotFoundError(f"{name} has no backup {backup_id!r} (any more)") from None
        shutil.rmtree(hidden, ignore_errors=True)
        self._daemon._event(name, "backup-removed", None, f"backup {backup_id}{why}")

    # --- policy ---------------------------------------------------------------------------

    def policy(self, name: str) -> BackupPolicy:
        try:
            text = (self.root / name / POLICY).read_text(encoding="utf-8")
        except FileNotFoundError:
            return BackupPolicy()
        return BackupPolicy.model_validate(json.loads(text)["policy"])

    def set_policy(self, name: str, policy: BackupPolicy, now: float | None = None) -> BackupPolicy:
        """Set ``name``'s schedule and retention (the VM must exist); the retention applies
        at once, the schedule counts from now (or the latest backup)."""
        self._daemon.get(name)
        schedule = policy.schedule
        if schedule is not None and (schedule.every is None) == (schedule.daily_at is None):
            raise SpecError("schedule", "give every (seconds) or daily_at (HH:MM), one of the two")
        folder = self.root / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        set_at = time.time() if now is None else now
        _write_json(folder / POLICY, {"set_at": set_at, "policy": policy.model_dump(mode="json")})
        self._daemon._event(name, "backup-policy", None, policy.model_dump_json(exclude_none=True))
        self.prune(name)
        with self._wake:
            self._last_try.pop(name, None)
            self._wake.notify_all()
        return policy

    def prune(self, name: str) -> builtins.list[str]:
        """Remove the backups ``name``'s retention does not keep; their ids."""
        with self._vm_lock(name):
            retention = self.policy(name).retention
            backups = self.list(name)
            keep = kept(backups, retention)
            removed = [backup.id for backup in backups if backup.id not in keep]
            for backup_id in removed:
                with contextlib.suppress(NotFoundError):
                    self.delete(name, backup_id, " (retention)")
        return removed

    # --- the schedule ---------------------------------------------------------------------

    def _due(self) -> builtins.list[tuple[float, str]]:
        """(when, VM) for every VM with a schedule."""
        due = []
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            try:
                text = (entry / POLICY).read_text(encoding="utf-8")
                stored = json.loads(text)
                policy = BackupPolicy.model_validate(stored["policy"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if policy.schedule is None:
                continue
            backups = self.list(entry.name)
            last = max(
                [float(stored.get("set_at", 0.0)), self._last_try.get(entry.name, 0.0)]
                + [backup.created for backup in backups]
            )
            due.append((next_due(policy.schedule, last), entry.name))
        return due

    def _schedule_loop(self) -> None:
        while True:
            with self._wake:
                if self._closing:
                    return
                try:
                    due = self._due()
                except Exception:  # a bug must not end the schedule: logged, retried later
                    log.exception("reading the backup schedules failed")
                    due = []
                now = time.time()
                ready = [name for when, name in due if when <= now]
                if not ready:
                    later = min((when for when, _ in due), default=None)
                    self._wake.wait(None if later is None else min(later - now, 3600.0))
                    continue
                for name in ready:
                    self._last_try[name] = now
            for name in ready:
                self._scheduled(name)

    def _scheduled(self, name: str) -> None:
        try:
            self.create(name, scheduled=True)
        except NotFoundError:
            pass  # the VM is gone; its policy stays with its backups
        except KasouError as error:
            log.info("%s: scheduled backup skipped: %s", name, error)
        except Exception:
            log.exception("%s: scheduled backup failed", name)

    # --- verifying and restoring ------------------------------------------------------------

    def verify(self, name: str, backup_id: str) -> dict[str, Any]:
        """Check every file against its checksum, then restore the backup as a throwaway
        clone and see it run and answer; raise ``SpecError`` when it is damaged."""
        folder = self.path(name, backup_id)
        try:
            self._check_files(folder)
            result = self._trial_run(name, backup_id, folder)
        except KasouError as error:
            self._daemon._event(name, "backup-verify-failed", None, f"{backup_id}: {error}")
            raise
        self._daemon._event(name, "backup-verified", None, backup_id)
        return result

    def _check_files(self, folder: Path) -> None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
            assert isinstance(files, dict)
        except (OSError, ValueError, KeyError, AssertionError) as error:
            raise SpecError("backup", f"{folder}: its manifest is unreadable: {error}") from None
        present = {entry.name for entry in folder.iterdir() if entry.name != MANIFEST}
        if present != set(files):
            raise SpecError(
                "backup", f"{folder}: files {sorted(present ^ set(files))} differ from its manifest"
            )
        for file_name, expected in sorted(files.items()):
            path = folder / file_name
            if path.stat().st_size != expected.get("size") or _digest(path) != expected.get(
                "sha256"
            ):
                raise SpecError("backup", f"{path} is damaged: its checksum does not match")

    def _trial_run(self, name: str, backup_id: str, folder: Path) -> dict[str, Any]:
        trial = f"verify-{uuid.uuid4().hex[:12]}"
        self._daemon.create(VmSpec(name=trial, restore=str(folder), clone=True))
        try:
            info = self._daemon.start(trial)
            if info.state is not VmState.RUNNING:
                raise SpecError(
                    "backup",
                    f"{name}'s backup {backup_id} did not run: {info.state.value}, "
                    f"{info.message or _tail(self._daemon.paths(trial).stderr_log)}",
                )
            status = self._daemon.request(trial, "status")
            if status.get("state") != "running":
                raise SpecError(
                    "backup", f"{name}'s backup {backup_id} restored {status.get('state')}"
                )
        finally:
            with contextlib.suppress(KasouError):
                self._daemon.delete(trial, force=True)
        return {"id": backup_id, "vm": name, "ok": True, "state": status.get("state")}

    def restore(self, name: str, backup_id: str, into: str | None, start: bool = True) -> VmInfo:
        """Bring backup ``backup_id`` of ``name`` back: into a new VM ``into`` (a clone: its
        own MACs, vsock and disk overlays), or into ``name`` itself (stopped first; it then
        starts from the backup)."""
        folder = self.path(name, backup_id)
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        saved = VmSpec.model_validate(manifest["spec"])
        target = into or name
        fields = {
            "name": target,
            "memory": saved.memory,
            "vcpus": saved.vcpus,
            "limits": saved.limits,
            "restart": saved.restart,
            "labels": saved.labels,
            "clone": into is not None and into != name,
        }
        with self._vm_lock(target):
            if target != name or not self._exists(name):
                info = self._restore_new(target, folder, fields)
            else:
                info = self._restore_same(target, folder, fields)
        self._daemon._event(target, "backup-restored", info.state, f"{name}/{backup_id}")
        if start:
            info = self._daemon.start(target)
        return info

    def _exists(self, name: str) -> bool:
        try:
            self._daemon.get(name)
        except NotFoundError:
            return False
        return True

    def _restore_new(self, target: str, folder: Path, fields: dict[str, Any]) -> VmInfo:
        if self._exists(target):
            from kasou.errors import ConflictError

            raise ConflictError(f"a VM named {target!r} exists: restore into another name")
        vm_dir = self._daemon.state_dir / "vms" / target
        vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        image = vm_dir / IMAGE
        try:
            _link_copy(folder, image)
            return self._daemon.create(VmSpec(**fields, restore=str(image)))
        except BaseException:
            if not self._exists(target):
                shutil.rmtree(vm_dir, ignore_errors=True)
            raise

    def _restore_same(self, target: str, folder: Path, fields: dict[str, Any]) -> VmInfo:
        daemon = self._daemon
        if daemon.get(target).state not in (VmState.CREATED, VmState.STOPPED, VmState.FAILED):
            daemon.stop(target)
        image = daemon.paths(target).dir / IMAGE
        fresh = image.with_name(f".{IMAGE}.new")
        shutil.rmtree(fresh, ignore_errors=True)
        _link_copy(folder, fresh)
        spec = VmSpec(**fields, restore=str(image))
        old = image.with_name(f".{IMAGE}.old")
        shutil.rmtree(old, ignore_errors=True)
        if image.exists():
            os.rename(image, old)
        os.rename(fresh, image)
        shutil.rmtree(old, ignore_errors=True)
        return daemon.replace_spec(target, spec, "restored from a backup")


def _link_copy(source: Path, target: Path) -> None:
    """``target`` gets every file of ``source`` as a hard link (a copy across file systems)."""
    target.mkdir(mode=0o700)
    for entry in source.iterdir():
        if entry.name == MANIFEST or not entry.is_file():
            continue
        try:
            os.link(entry, target / entry.name)
        except OSError:
            shutil.copy2(entry, target / entry.name)


def _is_name(name: str) -> bool:
    import re

    return re.fullmatch(NAME_PATTERN, name) is not None


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-300:].strip()
    except OSError:
        return ""
