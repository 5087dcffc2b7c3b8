"""The SDK's backup face (``client.backups``, ``AsyncClient.backups``): make, list, remove,
restore and verify backups of kasoud's VMs, and set their schedule and retention.

Each request is a ``_calls.Call``, as for every plain request, so the sync and the async face
send the same thing. Long work (a backup, a verification) answers with an ``Operation``;
``wait`` follows one to its end.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydantic import TypeAdapter, ValidationError

from kasou.sdk._calls import Call, _adapter, _model, _nothing, vm_path
from kasou.sdk._errors import invalid_spec
from kasou.spec import (
    Backup,
    BackupPolicy,
    MigrateRequest,
    Operation,
    OperationState,
    RestoreRequest,
    VmInfo,
)

if TYPE_CHECKING:
    from kasou.sdk._async import AsyncClient
    from kasou.sdk._client import Client

__all__ = ["AsyncBackups", "Backups", "migrate_call"]

_BACKUP_LIST = TypeAdapter(list[Backup])
_LONG = 3600.0  # a restore starts a VM; kasoud answers once it runs


def _backup_path(name: str, backup_id: str = "", rest: str = "") -> str:
    path = vm_path(name, "backups")
    if backup_id:
        path += "/" + quote(backup_id, safe="")
    return path + ("/" + rest if rest else "")


def create_call(name: str) -> Call[Operation]:
    return Call("POST", _backup_path(name), _model(Operation))


def list_call(name: str) -> Call[list[Backup]]:
    return Call("GET", _backup_path(name), _adapter(_BACKUP_LIST))


def get_call(name: str, backup_id: str) -> Call[Backup]:
    return Call("GET", _backup_path(name, backup_id), _model(Backup))


def delete_call(name: str, backup_id: str) -> Call[None]:
    return Call("DELETE", _backup_path(name, backup_id), _nothing)


def restore_call(name: str, backup_id: str, into: str | None, start: bool) -> Call[VmInfo]:
    try:
        body = RestoreRequest(name=into, start=start)
    except ValidationError as error:
        raise invalid_spec(error) from None
    return Call(
        "POST",
        _backup_path(name, backup_id, "restore"),
        _model(VmInfo),
        json=body.model_dump(mode="json"),
        timeout=_LONG,
    )


def verify_call(name: str, backup_id: str) -> Call[Operation]:
    return Call("POST", _backup_path(name, backup_id, "verify"), _model(Operation))


def policy_call(name: str) -> Call[BackupPolicy]:
    return Call("GET", vm_path(name, "backup-policy"), _model(BackupPolicy))


def set_policy_call(
    name: str, policy: BackupPolicy | None, fields: dict[str, Any]
) -> Call[BackupPolicy]:
    if policy is None:
        try:
            policy = BackupPolicy.model_validate(fields)
        except ValidationError as error:
            raise invalid_spec(error) from None
    return Call(
        "PUT",
        vm_path(name, "backup-policy"),
        _model(BackupPolicy),
        json=policy.model_dump(mode="json"),
    )


def migrate_call(name: str, url: str, downtime: float) -> Call[Operation]:
    try:
        body = MigrateRequest(url=url, downtime=downtime)
    except ValidationError as error:
        raise invalid_spec(error) from None
    return Call("POST", vm_path(name, "migrate"), _model(Operation), json=body.model_dump())


def _over(operation: Operation) -> bool:
    return operation.state is not OperationState.RUNNING


class Backups:
    """Backups of kasoud's VMs: ``client.backups.create("db")`` and the rest."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, name: str) -> Operation:
        """Start a backup of the running VM; its result is the ``Backup`` (see ``wait``)."""
        return self._client._run(create_call(name))

    def list(self, name: str) -> builtins.list[Backup]:
        return self._client._run(list_call(name))

    def get(self, name: str, backup_id: str) -> Backup:
        return self._client._run(get_call(name, backup_id))

    def delete(self, name: str, backup_id: str) -> None:
        self._client._run(delete_call(name, backup_id))

    def restore(
        self, name: str, backup_id: str, new_name: str | None = None, start: bool = True
    ) -> VmInfo:
        """Bring a backup back as the new VM ``new_name``, or (None) as ``name`` itself."""
        return self._client._run(restore_call(name, backup_id, new_name, start))

    def verify(self, name: str, backup_id: str) -> Operation:
        """Start checking the backup (checksums, then a trial run as a throwaway clone)."""
        return self._client._run(verify_call(name, backup_id))

    def policy(self, name: str) -> BackupPolicy:
        return self._client._run(policy_call(name))

    def set_policy(
        self, name: str, policy: BackupPolicy | None = None, **fields: Any
    ) -> BackupPolicy:
        """Set the schedule and retention: a ``BackupPolicy`` or its fields
        (``schedule={"every": 3600}, retention={"keep_last": 7}``)."""
        return self._client._run(set_policy_call(name, policy, fields))

    def wait(
        self,
        operation: Operation,
        timeout: float = 3600.0,
        on_progress: Callable[[Operation], None] | None = None,
    ) -> Operation:
        """Poll ``operation`` until it ends (or ``timeout``: ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        while not _over(operation):
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {operation.id} still runs after {timeout:g} s")
            time.sleep(0.1)
            operation = self._client.operation(operation.id)
            if on_progress is not None:
                on_progress(operation)
        return operation


class AsyncBackups:
    """``Backups`` for asyncio."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, name: str) -> Operation:
        return await self._client._run(create_call(name))

    async def list(self, name: str) -> builtins.list[Backup]:
        return await self._client._run(list_call(name))

    async def get(self, name: str, backup_id: str) -> Backup:
        return await self._client._run(get_call(name, backup_id))

    async def delete(self, name: str, backup_id: str) -> None:
        await self._client._run(delete_call(name, backup_id))

    async def restore(
        self, name: str, backup_id: str, new_name: str | None = None, start: bool = True
    ) -> VmInfo:
        return await self._client._run(restore_call(name, backup_id, new_name, start))

    async def verify(self, name: str, backup_id: str) -> Operation:
        return await self._client._run(verify_call(name, backup_id))

    async def policy(self, name: str) -> BackupPolicy:
        return await self._client._run(policy_call(name))

    async def set_policy(
        self, name: str, policy: BackupPolicy | None = None, **fields: Any
    ) -> BackupPolicy:
        return await self._client._run(set_policy_call(name, policy, fields))

    async def wait(self, operation: Operation, timeout: float = 3600.0) -> Operation:
        deadline = time.monotonic() + timeout
        while not _over(operation):
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {operation.id} still runs after {timeout:g} s")
            await asyncio.sleep(0.1)
            operation = await self._client.operation(operation.id)
        return operation
