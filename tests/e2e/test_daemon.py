"""kasoud with the default Linux guest, driven as a user would: the SDK on a live kasoud.

One kasoud for the module and one default guest (``dg``) booted through it: its serial console
over the WebSocket (a root shell on ttyS0 answers ``uname -a``), exec with the output
streamed, files written and read back through the agent, a backup restored into a new VM
with the file found there and its data disk as it was at the backup, and a Sandbox cloned
from a template made through kasoud.

Each wait has a deadline; the guest boots in ~20 s in the nested host.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.sdk import Client, ExecChunk, GuestFailure, InvalidState, Sandbox
from kasou.spec import OperationState, VmState
from kvm._kasoud import Kasoud, remove_tmp, running_kasoud, short_tmp

from .conftest import BOOT_TIMEOUT

NAME = "dg"
DATA_DISK_SIZE = 16 << 20


def _wait_for_agent(client: Client, name: str) -> None:
    """Until a command runs in the guest (its agent starts late in the boot)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            if client.vms.exec(name, ["true"], timeout=30).exit_code == 0:
                return
        except (GuestFailure, InvalidState) as error:
            assert client.vms.get(name).state is VmState.RUNNING, error
            assert time.monotonic() < deadline, f"{name}'s agent did not answer: {error}"
        time.sleep(0.2)  # the agent announces itself to no one: poll, with a deadline


def _operation(kasoud: Kasoud, operation: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """An operation (202) followed to its end; fails the test if it failed."""
    deadline = time.monotonic() + timeout
    while operation["state"] == OperationState.RUNNING.value:
        assert time.monotonic() < deadline, f"operation {operation} did not end"
        time.sleep(0.1)
        operation = kasoud.api.get(f"/v1/operations/{operation['id']}").json()
    assert operation["state"] == OperationState.DONE.value, operation
    return operation


@pytest.fixture(scope="module")
def kasoud() -> Iterator[Kasoud]:
    with running_kasoud() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(kasoud: Kasoud) -> Iterator[Client]:
    with Client(kasoud.sock, timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def data_disk() -> Iterator[Path]:
    """A raw data disk the user attaches by path (the guest's /dev/vdb)."""
    folder = short_tmp()
    disk = folder / "data.raw"
    disk.write_bytes(bytes(DATA_DISK_SIZE))
    yield disk
    remove_tmp(folder)


@pytest.fixture(scope="module")
def guest(client: Client, data_disk: Path) -> str:
    """The default guest with a data disk, created and started through the SDK, its agent
    answering."""
    vm = client.vms.create(name=NAME, memory="256M", disks=[f"{data_disk},format=raw"], start=True)
    assert vm.state is VmState.RUNNING
    _wait_for_agent(client, NAME)
    return NAME


def test_the_console_websocket_reaches_the_guests_shell(client: Client, guest: str) -> None:
    with client.vms.console(guest) as console:
        console.send(b"\n")
        console.send(b"uname -a\n")
        # The shell echoes the line, then answers it.
        console.read_until(b"uname -a", timeout=60)
        answer = console.read_until(b"Linux", timeout=60)
    assert b"Linux" in answer
    assert "Linux" in client.vms.logs(guest, tail=4096)


def test_exec_streams_stdout_stderr_and_the_status(client: Client, guest: str) -> None:
    script = "echo one; echo two >&2; cat; exit 7"
    with client.vms.exec_stream(guest, ["sh", "-c", script], stdin="three") as run:
        chunks = list(run)
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "one\nthree"
    assert [c for c in chunks if c.stream == "stderr"] == [ExecChunk("stderr", "two\n")]
    assert run.exit_code == 7


def test_files_go_in_and_come_out_through_the_agent(client: Client, guest: str) -> None:
    data = os.urandom(200_000)
    client.files.write(guest, "/root/blob", data)
    assert client.files.read(guest, "/root/blob") == data
    size = client.vms.exec(guest, ["stat", "-c", "%s", "/root/blob"]).stdout.strip()
    assert size == str(len(data))


def _write_disk(client: Client, name: str, text: str) -> None:
    """``text`` at the start of the guest's data disk, past its page cache."""
    script = f"printf %s {text} | dd of=/dev/vdb conv=fsync 2>/dev/null"
    assert client.vms.exec(name, ["sh", "-c", script]).exit_code == 0


def _read_disk(client: Client, name: str, size: int) -> str:
    # Clean pages dropped first: what is read comes from the disk, not the page cache.
    script = (
        f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs={size} count=1 2>/dev/null"
    )
    return client.vms.exec(name, ["sh", "-c", script]).stdout


def test_a_backup_restored_into_a_new_vm_has_the_file(
    kasoud: Kasoud, client: Client, guest: str, data_disk: Path
) -> None:
    client.files.write(guest, "/root/marker", b"before the backup\n")
    assert client.vms.exec(guest, ["sync"]).exit_code == 0
    _write_disk(client, guest, "before")
    created = kasoud.api.post(f"/v1/vms/{guest}/backups")
    if created.status_code == 404 and "backups" not in kasoud.api.get("/openapi.json").text:
        pytest.skip("this kasoud has no backups API")
    assert created.status_code == 202, created.text
    backup = _operation(kasoud, created.json())["result"]
    # The data disk changes after the backup: the backup holds it as it was.
    _write_disk(client, guest, "after!")
    assert data_disk.read_bytes()[:6] == b"after!"
    restored = kasoud.api.post(
        f"/v1/vms/{guest}/backups/{backup['id']}/restore", json={"name": "dg-restored"}
    )
    assert restored.status_code == 201, restored.text
    try:
        _wait_for_agent(client, "dg-restored")
        assert client.files.read("dg-restored", "/root/marker") == b"before the backup\n"
        assert _read_disk(client, "dg-restored", 512)[:6] == "before"
        assert _read_disk(client, guest, 512)[:6] == "after!"
        assert data_disk.read_bytes()[:6] == b"after!"  # the restore did not write it
        # The copy is a VM of its own: a change there does not reach the original.
        client.files.write("dg-restored", "/root/marker", b"changed\n")
        assert client.files.read(guest, "/root/marker") == b"before the backup\n"
    finally:
        client.vms.delete("dg-restored", force=True)


def test_a_sandbox_from_a_template_runs_code_and_is_gone_after(client: Client) -> None:
    folder = short_tmp()
    try:
        template = Sandbox.make_template(folder / "template", client)
        assert (template / "state.kasou").is_file()
        assert not [vm for vm in client.vms.list() if vm.name.startswith("template-")]
        with Sandbox(template, client) as box:
            assert box.exec("echo $((6 * 7))").stdout == "42\n"
            box.files.write("/tmp/job.sh", "echo from the job: $1\n")
            assert box.files.read("/tmp/job.sh") == b"echo from the job: $1\n"
            assert box.exec(["sh", "/tmp/job.sh", "x"]).stdout == "from the job: x\n"
            name = box.name
            assert client.vms.get(name).spec.clone is True
        assert name not in [vm.name for vm in client.vms.list()]
    finally:
        remove_tmp(folder)
