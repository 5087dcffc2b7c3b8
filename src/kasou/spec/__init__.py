"""What the host daemon's API speaks: VM specs, their runtime view, events, operations and
problems, as pydantic models.

One set of models serves the daemon (which validates and stores specs), the REST API (whose
OpenAPI schema is generated from them) and the SDK (which parses replies into them), so the
three cannot drift apart. The models only check shapes and ranges; whether a kernel file
exists or a name is already taken is the daemon's business (``kasou.daemon``).

This package knows nothing of KVM, processes or HTTP.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "NAME_PATTERN",
    "PROBLEM_BASE",
    "Backup",
    "BackupDisk",
    "BackupPolicy",
    "BackupSchedule",
    "DesiredState",
    "Event",
    "ExecRequest",
    "ExecResult",
    "Limits",
    "MigrateRequest",
    "Operation",
    "OperationState",
    "Problem",
    "ProblemType",
    "RestartPolicy",
    "RestoreRequest",
    "Retention",
    "VmInfo",
    "VmSpec",
    "VmState",
    "VmUpdate",
]

# A VM's name is a path component, a cgroup name and a DNS label: lower case, digits, '-'.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
PROBLEM_BASE = "https://kasou.dev/problems/"


class _Strict(BaseModel):
    """Unknown fields are refused: a misspelt field is an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class RestartPolicy(enum.StrEnum):
    """What the daemon does when a VM's process ends without being asked to."""

    NEVER = "never"
    ON_FAILURE = "on-failure"  # restart after a non-zero exit or a crash
    ALWAYS = "always"  # restart after any end the user did not ask for


class DesiredState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class VmState(enum.StrEnum):
    """The daemon's view of a VM (its table of transitions is in ``kasou.daemon``)."""

    CREATED = "created"  # declared, never started
    STARTING = "starting"  # its process is being forked
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"  # asked to stop or shut down, not gone yet
    STOPPED = "stopped"  # ended as asked, or exited with status 0
    FAILED = "failed"  # ended by itself with an error, and not restarted (policy or limit)
    BACKOFF = "backoff"  # ended by itself; restarts after a delay (restart policy)


class Limits(_Strict):
    """CPU, memory and task limits (``kasou run --cpus-quota`` and the rest); None: none."""

    cpus_quota: Annotated[float, Field(gt=0, le=1024)] | None = None
    cpu_weight: Annotated[int, Field(ge=1, le=10000)] | None = None
    cpu_pin: dict[int, int] | None = None  # vCPU index -> host CPU
    memory_limit: str | None = None  # like 600M
    pids_limit: Annotated[int, Field(ge=1, le=1 << 22)] | None = None


class VmSpec(_Strict):
    """A VM as declared. Without ``kernel`` or ``image`` it boots the default guest.

    ``disks`` and ``nets`` are ``kasou run --disk`` / ``--net`` values
    (``PATH[,ro][,format=raw|qcow2]``, ``tap=NAME[,mac=MAC]``), checked by the daemon with
    the same parser ``kasou run`` uses.
    """

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    kernel: str | None = None
    initrd: str | None = None
    image: str | None = None
    cmdline: Annotated[str, Field(max_length=4096)] | None = None
    vcpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory: Annotated[str, Field(pattern=r"^[0-9]+[KMGkmg]?$")] = "256M"
    disks: Annotated[list[str], Field(max_length=16)] = []
    nets: Annotated[list[str], Field(max_length=8)] = []
    rng: bool = False
    balloon: bool = False
    acpi: bool = True
    limits: Limits | None = None
    restart: RestartPolicy = RestartPolicy.NEVER
    labels: Annotated[dict[str, str], Field(max_length=64)] = {}
    # A VM brought back from a snapshot folder (``kasou run --restore``) instead of booted:
    # its boot settings come from the snapshot; ``clone`` makes it one of many copies (its own
    # overlay disks, MAC and vsock, ``kasou run --clone``).
    restore: str | None = None
    clone: bool = False
    # A VM that arrives by live migration (``kasou run --incoming URL``): it waits on ``URL``
    # (``unix:PATH`` or ``tcp://HOST:PORT``) for a ``kasou migrate`` and runs what comes.
    # Boot fields beside it (``describes_boot``), or ``boot_after_arrival`` for the default
    # guest (which has none), are for its cold boots once it arrived: the daemon then drops
    # ``incoming``. Without them it waits again at each start.
    incoming: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    boot_after_arrival: bool = False

    def describes_boot(self) -> bool:
        """Whether the spec says how the VM boots (kernel, initrd, image, cmdline, rng or
        balloon), beyond the default guest of a given size."""
        given = (self.kernel, self.initrd, self.image, self.cmdline)
        return any(value is not None for value in given) or self.rng or self.balloon


class VmUpdate(_Strict):
    """What may change on a declared VM; None leaves a field as it is. Boot settings
    (kernel, memory, ...) take effect at the next start; limits also apply live."""

    labels: dict[str, str] | None = None
    restart: RestartPolicy | None = None
    limits: Limits | None = None
    vcpus: Annotated[int, Field(ge=1, le=64)] | None = None
    memory: Annotated[str, Field(pattern=r"^[0-9]+[KMGkmg]?$")] | None = None
    cmdline: Annotated[str, Field(max_length=4096)] | None = None


class VmInfo(BaseModel):
    """A VM as the daemon sees it now."""

    name: str
    spec: VmSpec
    state: VmState
    desired: DesiredState
    pid: int | None = None  # the VM process, while it runs
    restarts: int = 0  # restarts by the policy since the last start asked for
    exit_status: int | None = None  # of the last run that ended
    created_at: float  # Unix time
    started_at: float | None = None
    backoff_until: float | None = None  # when a BACKOFF VM starts again
    message: str = ""  # why it is FAILED, or the last error


class Event(BaseModel):
    """One entry in the event log: a state change or an action, with an id that only grows."""

    id: int
    time: float
    vm: str | None = None
    kind: str  # created, started, state, exited, restarted, deleted, backup, error ...
    state: VmState | None = None
    message: str = ""


class ExecRequest(_Strict):
    argv: Annotated[list[str], Field(min_length=1, max_length=256)]
    stdin: Annotated[str, Field(max_length=1 << 20)] = ""
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0


class ExecResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str


class OperationState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ProblemType(enum.StrEnum):
    """The ``type`` of a problem+json answer (RFC 9457), under ``PROBLEM_BASE``: what a
    client switches on."""

    NOT_FOUND = "not-found"  # no such VM, operation or backup
    CONFLICT = "conflict"  # a name already taken
    INVALID_SPEC = "invalid-spec"  # the body does not describe a VM kasou can run
    INVALID_STATE = "invalid-state"  # the action does not fit the VM's state
    TOO_LARGE = "too-large"  # the body is over the size limit
    UNAUTHORIZED = "unauthorized"  # no or a wrong bearer token
    GUEST = "guest"  # the guest or its agent failed the request
    INTERNAL = "internal"  # a bug in kasou: the daemon logs it and stays up


class Problem(BaseModel):
    """An error answer (``application/problem+json``, RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str | None = None


class Operation(BaseModel):
    """A long piece of work (a snapshot, a backup, a migration) and how far it got."""

    id: str
    kind: str
    vm: str
    state: OperationState
    progress: Annotated[float, Field(ge=0, le=1)] = 0.0
    started_at: float
    ended_at: float | None = None
    result: dict[str, Any] | None = None
    error: Problem | None = None


class Retention(_Strict):
    """Which backups of a VM to keep after each new one (None or 0: that rule keeps none).
    A backup stays if any rule keeps it: the newest ``keep_last``, the newest of each of the
    last ``keep_daily`` days that have backups, the newest of each of the last
    ``keep_weekly`` ISO weeks that have backups (days and weeks in the host's local time)."""

    keep_last: Annotated[int, Field(ge=0, le=100000)] | None = None
    keep_daily: Annotated[int, Field(ge=0, le=100000)] | None = None
    keep_weekly: Annotated[int, Field(ge=0, le=100000)] | None = None


class BackupSchedule(_Strict):
    """When the daemon backs a VM up by itself: every ``every`` seconds, or each day at
    ``daily_at`` (``HH:MM``, the host's local time). One of the two."""

    every: Annotated[float, Field(ge=1, le=366 * 86400)] | None = None
    daily_at: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")] | None = None


class BackupPolicy(_Strict):
    """A VM's backup schedule and retention; None: no schedule / keep every backup."""

    schedule: BackupSchedule | None = None
    retention: Retention | None = None


class BackupDisk(BaseModel):
    """One disk of a backed-up VM: its path on the host (``path``, as the VM was given it)
    and its copy in the backup (``file``, a file name; None for a read-only disk, which is
    not copied), with the copy's apparent ``size`` and ``sha256``."""

    path: str
    file: str | None = None
    size: int | None = None
    sha256: str | None = None


class Backup(BaseModel):
    """One backup of a VM: a full snapshot (and copies of its writable disks) under the
    daemon's state folder, checked against the checksums written with it. ``disks`` is
    None for a backup made before backups listed them."""

    id: str
    vm: str
    created: float  # Unix time
    size: int  # bytes allocated on the host's disk
    scheduled: bool = False  # made by the schedule, not asked for
    disks: list[BackupDisk] | None = None


class RestoreRequest(_Strict):
    """``POST .../backups/{id}/restore``: into a new VM ``name``, or (None) into the VM the
    backup was made of, which is stopped and brought back as it was at the backup."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    start: bool = True


class MigrateRequest(_Strict):
    """``POST .../migrate``: send the running VM to ``url``, where a ``kasou run
    --incoming`` (or a VM with ``incoming``) listens; ``downtime`` is the pause aimed at."""

    url: Annotated[str, Field(min_length=1, max_length=4096)]
    downtime: Annotated[float, Field(gt=0, le=60)] = 0.3
