"""The REST API's backup and migration routes: each one call to ``Daemon.backups`` or
``Daemon.migrate``; the long ones (a backup, a verification, a migration) answer 202 with an
``Operation`` to poll at ``/v1/operations/{id}``.

They are added to the router before the lifecycle route ``/v1/vms/{name}/{action}``, which
would otherwise take ``backups`` and ``migrate`` for actions. Not here: what a backup is
and how one is kept (``kasou.daemon._backups``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response
from fastapi import Path as PathParam

from kasou.api._operations import Operations
from kasou.daemon import Daemon
from kasou.spec import (
    NAME_PATTERN,
    Backup,
    BackupPolicy,
    MigrateRequest,
    Operation,
    RestoreRequest,
    VmInfo,
)

__all__ = ["backup_routes"]

Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="the VM's name")]
BackupId = Annotated[str, PathParam(max_length=64, description="the backup's id")]


def backup_routes(router: APIRouter, daemon: Daemon, operations: Operations) -> None:
    @router.post(
        "/v1/vms/{name}/backups", status_code=202, response_model=Operation, tags=["backups"]
    )
    def create_backup(name: Name) -> Operation:
        daemon.get(name)
        return operations.start(
            "backup", name, lambda: daemon.backups.create(name).model_dump(mode="json")
        )

    @router.get("/v1/vms/{name}/backups", response_model=list[Backup], tags=["backups"])
    def list_backups(name: Name) -> list[Backup]:
        return daemon.backups.list(name)

    @router.get("/v1/vms/{name}/backups/{id}", response_model=Backup, tags=["backups"])
    def get_backup(name: Name, id: BackupId) -> Backup:
        return daemon.backups.get(name, id)

    @router.delete(
        "/v1/vms/{name}/backups/{id}",
        status_code=204,
        response_class=Response,
        tags=["backups"],
    )
    def delete_backup(name: Name, id: BackupId) -> Response:
        daemon.backups.delete(name, id)
        return Response(status_code=204)

    @router.post(
        "/v1/vms/{name}/backups/{id}/restore",
        status_code=201,
        response_model=VmInfo,
        tags=["backups"],
    )
    def restore_backup(
        name: Name, id: BackupId, request: Annotated[RestoreRequest | None, Body()] = None
    ) -> VmInfo:
        wanted = request or RestoreRequest()
        return daemon.backups.restore(name, id, wanted.name, start=wanted.start)

    @router.post(
        "/v1/vms/{name}/backups/{id}/verify",
        status_code=202,
        response_model=Operation,
        tags=["backups"],
    )
    def verify_backup(name: Name, id: BackupId) -> Operation:
        daemon.backups.get(name, id)
        return operations.start("verify", name, lambda: daemon.backups.verify(name, id))

    @router.get("/v1/vms/{name}/backup-policy", response_model=BackupPolicy, tags=["backups"])
    def get_policy(name: Name) -> BackupPolicy:
        daemon.get(name)
        return daemon.backups.policy(name)

    @router.put("/v1/vms/{name}/backup-policy", response_model=BackupPolicy, tags=["backups"])
    def set_policy(name: Name, policy: BackupPolicy) -> BackupPolicy:
        return daemon.backups.set_policy(name, policy)

    @router.post(
        "/v1/vms/{name}/migrate", status_code=202, response_model=Operation, tags=["backups"]
    )
    def migrate(name: Name, request: MigrateRequest) -> Operation:
        daemon.get(name)
        return operations.start_tracked(
            "migrate",
            name,
            lambda report: daemon.migrate(name, request.url, request.downtime, report),
        )
