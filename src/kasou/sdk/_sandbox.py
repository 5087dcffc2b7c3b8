"""The sandbox face: a throw-away VM to run untrusted or generated code in, cloned from a
template and removed when the ``with`` block ends.

::

    template = kasou.Sandbox.make_template("/var/lib/kasou/templates/base")   # once
    with kasou.Sandbox(template) as box:
        box.files.write("/tmp/job.sh", "echo $((6 * 7))")
        print(box.exec("sh /tmp/job.sh").stdout)                   # 42

A template is a full snapshot folder of a booted default guest whose agent answers
(``make_template``: boot through kasoud, ``exec true``, snapshot, remove the VM). Each sandbox
is a daemon VM with ``restore=TEMPLATE, clone=True`` (``kasou run --restore DIR --clone``: its
own overlay on every disk, its own MAC and vsock, a new VM generation ID), so it starts in the
time a restore takes, not a boot's; memory and vCPUs are the template's. The sandbox is ready
when a command runs in it, and is force-deleted on the way out of the block whatever ends it
(an exception, KeyboardInterrupt).

Everything goes through kasoud's API (``Client``); nothing here talks to a VM directly.
``AsyncSandbox`` is the asyncio twin.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from kasou.errors import DaemonError
from kasou.sdk._errors import GuestFailure, InvalidState, NotFound
from kasou.spec import ExecResult, Operation, OperationState, VmSpec

if TYPE_CHECKING:
    from kasou.sdk._async import AsyncClient
    from kasou.sdk._client import Client
    from kasou.sdk._exec import AsyncExecStream, ExecStream

__all__ = ["AsyncSandbox", "Sandbox", "SandboxError"]

LABEL = "kasou.sandbox"  # on every sandbox VM, with the template's folder as its value
READY_TIMEOUT = 60.0  # a clone answers far sooner; a template's first boot may take this
_TEMPLATE_BOOT_TIMEOUT = 180.0  # the default guest under nested KVM boots in ~20 s
_POLL_FIRST, _POLL_MAX = 0.02, 0.5


class SandboxError(DaemonError):
    """A sandbox or a template could not be made: the VM did not come up, or its snapshot
    failed. The message says which, and the VM is removed."""


def _argv(command: str | Sequence[str]) -> list[str]:
    """A shell string runs under ``sh -c``; a sequence is the argv itself."""
    if isinstance(command, str):
        return ["sh", "-c", command]
    argv = builtins.list(command)
    if not argv or not all(isinstance(word, str) for word in argv):
        raise ValueError(f"give a shell string or a non-empty list of strings, not {command!r}")
    return argv


def _stdin(data: str | bytes) -> str:
    # The API carries stdin as text; bytes must be UTF-8 (binary input goes in a file).
    if isinstance(data, bytes):
        try:
            return data.decode()
        except UnicodeDecodeError as error:
            raise ValueError(
                "stdin must be UTF-8 text: write binary input with box.files.write"
            ) from error
    return data


def _new_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def _template_spec(name: str, memory: str, vcpus: int) -> VmSpec:
    return VmSpec(name=name, memory=memory, vcpus=vcpus, labels={LABEL: "template"})


def _clone_spec(name: str, template: Path) -> VmSpec:
    return VmSpec(name=name, restore=str(template), clone=True, labels={LABEL: str(template)})


def _snapshot_failed(name: str, operation: Operation) -> SandboxError:
    detail = operation.error.detail if operation.error is not None else "no reason given"
    return SandboxError(f"{name}: the template's snapshot failed: {detail}")


class _Backoff:
    """Waits between tries at something kasoud cannot announce (a guest agent listening)."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what, self.timeout = what, timeout
        self.deadline = time.monotonic() + timeout
        self.pause = _POLL_FIRST

    def next(self, last: Exception) -> float:
        """Seconds to wait before the next try; raises SandboxError once time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SandboxError(f"{self.what} within {self.timeout:g} s: {last}") from last
        pause, self.pause = min(self.pause, left), min(self.pause * 2, _POLL_MAX)
        return pause


class SandboxFiles:
    """Files in the sandbox's guest (through its agent)."""

    def __init__(self, box: Sandbox) -> None:
        self._box = box

    def write(self, path: str, data: bytes | str) -> None:
        """Write ``data`` (a str as UTF-8) to the absolute guest path ``path``."""
        self._box.client.files.write(self._box.name, path, data)

    def read(self, path: str) -> bytes:
        return self._box.client.files.read(self._box.name, path)


class Sandbox:
    """A clone of ``template`` (a snapshot folder, as ``make_template`` writes) run by kasoud
    for the length of a ``with`` block.

    ``client``: the kasoud to use (default: ``Client()``, closed with the sandbox).
    ``timeout``: the default limit of each ``exec``. ``ready_timeout``: how long the clone has
    to answer its first command.
    """

    def __init__(
        self,
        template: str | os.PathLike[str],
        client: Client | None = None,
        *,
        timeout: float = 60.0,
        ready_timeout: float = READY_TIMEOUT,
        name: str | None = None,
    ) -> None:
        self.template = Path(template).absolute()
        self.name = name or _new_name("sandbox")
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self._own_client = client is None
        if client is None:
            from kasou.sdk._client import Client

            client = Client()
        self.client = client
        self.files = SandboxFiles(self)
        self._created = False

    # --- life -----------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        try:
            self.client.vms.create(_clone_spec(self.name, self.template), start=True)
            self._created = True
            _wait_for_agent(self.client, self.name, self.ready_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the VM (stopped first) and close the client made for it. Safe to repeat."""
        try:
            if self._created:
                with contextlib.suppress(NotFound):
                    self.client.vms.delete(self.name, force=True)
                self._created = False
        finally:
            if self._own_client:
                self.client.close()

    # --- work -----------------------------------------------------------------------------

    def exec(
        self,
        command: str | Sequence[str],
        *,
        stdin: str | bytes = "",
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``command`` (a shell string, or an argv list) and return its status and
        output once it ends."""
        limit = self.timeout if timeout is None else timeout
        return self.client.vms.exec(self.name, _argv(command), stdin=_stdin(stdin), timeout=limit)

    def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        stdin: str | bytes = "",
        timeout: float | None = None,
    ) -> ExecStream:
        """``exec`` with the output as it comes (``Vms.exec_stream``)."""
        limit = self.timeout if timeout is None else timeout
        return self.client.vms.exec_stream(self.name, _argv(command), _stdin(stdin), limit)

    # --- templates ------------------------------------------------------------------------

    @staticmethod
    def make_template(
        folder: str | os.PathLike[str],
        client: Client | None = None,
        *,
        memory: str = "256M",
        vcpus: int = 1,
        boot_timeout: float = _TEMPLATE_BOOT_TIMEOUT,
    ) -> Path:
        """Boot the default guest through kasoud, wait for its agent, snapshot it into
        ``folder`` (absolute, as kasoud sees it) and remove the VM. Returns the folder."""
        target = Path(folder).absolute()
        own = client is None
        if client is None:
            from kasou.sdk._client import Client

            client = Client()
        name = _new_name("template")
        try:
            client.vms.create(_template_spec(name, memory, vcpus), start=True)
            try:
                _wait_for_agent(client, name, boot_timeout)
                operation = client.vms.snapshot(name, str(target))
                backoff = _Backoff(f"{name}: the snapshot did not finish", boot_timeout)
                while operation.state is OperationState.RUNNING:
                    time.sleep(backoff.next(SandboxError("still running")))
                    operation = client.operation(operation.id)
                if operation.state is not OperationState.DONE:
                    raise _snapshot_failed(name, operation)
            finally:
                with contextlib.suppress(NotFound):
                    client.vms.delete(name, force=True)
        finally:
            if own:
                client.close()
        return target


def _wait_for_agent(client: Client, name: str, timeout: float) -> None:
    """Until ``true`` runs in the guest: its agent is there, and so is the sandbox."""
    backoff = _Backoff(f"{name}: the guest agent did not answer", timeout)
    while True:
        try:
            result = client.vms.exec(name, ["true"], timeout=max(1.0, timeout))
        except (GuestFailure, InvalidState) as error:
            if isinstance(error, InvalidState) and client.vms.get(name).state.value != "running":
                raise SandboxError(f"{name} is not running: {error}") from error
            time.sleep(backoff.next(error))
            continue
        if result.exit_code != 0:
            raise SandboxError(f"{name}: `true` exited with {result.exit_code}: {result.stderr}")
        return


class AsyncSandboxFiles:
    def __init__(self, box: AsyncSandbox) -> None:
        self._box = box

    async def write(self, path: str, data: bytes | str) -> None:
        await self._box.client.files.write(self._box.name, path, data)

    async def read(self, path: str) -> bytes:
        return await self._box.client.files.read(self._box.name, path)


class AsyncSandbox:
    """``Sandbox`` for asyncio: ``async with kasou.AsyncSandbox(template) as box: await
    box.exec("echo hi")``."""

    def __init__(
        self,
        template: str | os.PathLike[str],
        client: AsyncClient | None = None,
        *,
        timeout: float = 60.0,
        ready_timeout: float = READY_TIMEOUT,
        name: str | None = None,
    ) -> None:
        self.template = Path(template).absolute()
        self.name = name or _new_name("sandbox")
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self._own_client = client is None
        if client is None:
            from kasou.sdk._async import AsyncClient

            client = AsyncClient()
        self.client = client
        self.files = AsyncSandboxFiles(self)
        self._created = False

    async def __aenter__(self) -> AsyncSandbox:
        try:
            await self.client.vms.create(_clone_spec(self.name, self.template), start=True)
            self._created = True
            await self._wait_for_agent()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        try:
            if self._created:
                with contextlib.suppress(NotFound):
                    await self.client.vms.delete(self.name, force=True)
                self._created = False
        finally:
            if self._own_client:
                await self.client.close()

    async def _wait_for_agent(self) -> None:
        backoff = _Backoff(f"{self.name}: the guest agent did not answer", self.ready_timeout)
        while True:
            try:
                result = await self.client.vms.exec(self.name, ["true"], timeout=self.timeout)
            except (GuestFailure, InvalidState) as error:
                if isinstance(error, InvalidState):
                    vm = await self.client.vms.get(self.name)
                    if vm.state.value != "running":
                        raise SandboxError(f"{self.name} is not running: {error}") from error
                await asyncio.sleep(backoff.next(error))
                continue
            if result.exit_code != 0:
                raise SandboxError(f"{self.name}: `true` exited with {result.exit_code}")
            return

    async def exec(
        self,
        command: str | Sequence[str],
        *,
        stdin: str | bytes = "",
        timeout: float | None = None,
    ) -> ExecResult:
        limit = self.timeout if timeout is None else timeout
        return await self.client.vms.exec(
            self.name, _argv(command), stdin=_stdin(stdin), timeout=limit
        )

    def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        stdin: str | bytes = "",
        timeout: float | None = None,
    ) -> AsyncExecStream:
        limit = self.timeout if timeout is None else timeout
        return self.client.vms.exec_stream(self.name, _argv(command), _stdin(stdin), limit)
