"""Streamed exec, files and the Sandbox face through the REST API, with the real guest agent.

The agent is ``kasou-agent --unix`` built from the default guest's source and run on this
host, behind a fake VMM vsock socket (``FakeVmm``: the CONNECT handshake, as the VMM does it),
so commands really run and their output really streams. kasoud's app runs under uvicorn on a
Unix socket over a small in-memory daemon (``AgentDaemon``: a VM table, with exec through the
same agent); the SDK, the CLI and ``kasou.Sandbox`` talk to it as they would to kasoud. The
default guest through a real kasoud is tests/e2e/test_daemon.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from test_agent_unix import Agent, FakeVmm, agent_binary  # noqa: F401 (a fixture)

from kasou.api import create_app
from kasou.client.agent import AgentSession, connect_vsock
from kasou.daemon import VmPaths
from kasou.errors import NotFoundError, StateError
from kasou.sdk import Client, GuestFailure, InvalidState, Sandbox
from kasou.sdk._exec import ExecChunk
from kasou.spec import DesiredState, ExecRequest, ExecResult, VmInfo, VmSpec, VmState

_TIMEOUT_S = 20.0  # a guard against a hang, not a pace


def _wait_until(check: object, what: str) -> None:
    """Poll a state only /proc or the file system shows (nothing announces it)."""
    assert callable(check)
    deadline = time.monotonic() + _TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.005)


class AgentDaemon:
    """The part of ``Daemon`` the exec, files and VM routes call. Every VM's vsock socket is
    the one fake VMM in front of the real agent."""

    def __init__(self, root: Path, vmm: FakeVmm) -> None:
        self.root = root
        self.vmm = vmm
        self.vms: dict[str, VmInfo] = {}
        self.deleted: list[str] = []
        self.specs: list[VmSpec] = []
        self.backups = None  # the backup routes are not under test here

    def add(self, name: str, state: VmState = VmState.RUNNING) -> None:
        spec = VmSpec(name=name)
        self.vms[name] = VmInfo(
            name=name, spec=spec, state=state, desired=DesiredState.RUNNING, created_at=1.0
        )

    def create(self, spec: VmSpec, start: bool = False) -> VmInfo:
        self.specs.append(spec)
        self.add(spec.name, VmState.RUNNING if start else VmState.CREATED)
        return self.vms[spec.name]

    def list(self, labels: dict[str, str] | None = None) -> list[VmInfo]:
        return list(self.vms.values())

    def get(self, name: str) -> VmInfo:
        if name not in self.vms:
            raise NotFoundError(f"no VM named {name!r}")
        return self.vms[name]

    def delete(self, name: str, force: bool = False) -> None:
        if self.get(name).state is VmState.RUNNING and not force:
            raise StateError(name, "running", "delete", "stopped (or force)")
        del self.vms[name]
        self.deleted.append(name)

    def paths(self, name: str) -> VmPaths:
        self.get(name)
        # api.sock + ".vsock" is where the API looks for the agent: the fake VMM's socket.
        api_sock = Path(str(self.vmm.path).removesuffix(".vsock"))
        return VmPaths(
            dir=self.root,
            api_sock=api_sock,
            console_sock=self.root / "console.sock",
            console_log=self.root / "console.log",
            stderr_log=self.root / "stderr.log",
        )

    def exec(self, name: str, request: ExecRequest) -> ExecResult:
        if self.get(name).state is not VmState.RUNNING:
            raise StateError(name, self.vms[name].state.value, "exec", "running")
        out, err = bytearray(), bytearray()
        with AgentSession(connect_vsock(self.vmm.path, timeout=_TIMEOUT_S)) as session:
            session.wait_ready(_TIMEOUT_S)
            status = session.exec(
                request.argv, stdout=out.extend, stderr=err.extend, forward_signals=False
            )
        return ExecResult(exit_code=status, stdout=out.decode(), stderr=err.decode())


class Server:
    """The API under uvicorn on a Unix socket, in a thread."""

    def __init__(self, daemon: AgentDaemon, sock: Path) -> None:
        self.sock = sock
        config = uvicorn.Config(create_app(daemon), uds=str(sock), log_level="warning")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_until(lambda: self.server.started, "uvicorn to listen")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(_TIMEOUT_S)


@pytest.fixture
def folder() -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kxs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(agent_binary: Path, folder: Path) -> Iterator[AgentDaemon]:  # noqa: F811
    agent = Agent(agent_binary, folder / "agent.sock")
    vmm = FakeVmm(folder / "api.sock.vsock", agent)
    fake = AgentDaemon(folder, vmm)
    fake.add("web")
    yield fake
    vmm.close()
    assert agent.proc.poll() is None, "the agent died"
    agent.close()


@pytest.fixture
def server(daemon: AgentDaemon, folder: Path) -> Iterator[Server]:
    running = Server(daemon, folder / "k.sock")
    yield running
    running.close()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.sock) as sdk:
        yield sdk


def test_output_streams_before_the_command_ends(client: Client, folder: Path) -> None:
    flag = folder / "go-on"
    # Bounded: were the output held back until the end, the command gives up waiting for the
    # flag, says so and the test fails on it rather than hanging.
    script = (
        f"echo first; i=0; while [ ! -e {flag} ]; do i=$((i + 1)); "
        "[ $i -gt 2000 ] && { echo gave up; exit 9; }; sleep 0.01; done; echo second >&2; exit 3"
    )
    with client.vms.exec_stream("web", ["sh", "-c", script]) as run:
        chunks = iter(run)
        # The command is still waiting for the flag: this line came while it ran.
        assert next(chunks) == ExecChunk("stdout", "first\n")
        assert run.exit_code is None
        flag.touch()
        assert list(chunks) == [ExecChunk("stderr", "second\n")]
    assert run.exit_code == 3


def test_stdin_goes_to_the_command_and_result_collects_the_output(client: Client) -> None:
    with client.vms.exec_stream("web", ["sh", "-c", "tr a-z A-Z; echo oops >&2"], "hello") as run:
        result = run.result()
    assert result == ExecResult(exit_code=0, stdout="HELLO", stderr="oops\n")


def test_a_character_split_between_frames_comes_out_whole(client: Client, folder: Path) -> None:
    flag = folder / "second-half"
    script = (
        "printf '\\342\\202'; echo mark >&2; "
        f"while [ ! -e {flag} ]; do sleep 0.01; done; printf '\\254!'"
    )
    with client.vms.exec_stream("web", ["sh", "-c", script]) as run:
        chunks = iter(run)
        # The first half was written before the mark and is held back until the character
        # is whole: the mark comes first, then the command finishes the character.
        assert next(chunks) == ExecChunk("stderr", "mark\n")
        flag.touch()
        text = "".join(chunk.data for chunk in chunks)
    assert text == "€!"
    assert run.exit_code == 0


def test_leaving_the_stream_early_kills_the_command(client: Client, folder: Path) -> None:
    pid_file = folder / "pid"
    script = f"echo $$ > {pid_file}; echo started; exec sleep 1000"
    with client.vms.exec_stream("web", ["sh", "-c", script]) as run:
        assert next(iter(run)) == ExecChunk("stdout", "started\n")
    pid = int(pid_file.read_text())
    _wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), "the command to die")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_command_past_its_timeout_is_killed_and_reported(client: Client) -> None:
    with (
        pytest.raises(GuestFailure, match=r"did not finish within 0\.5 s"),
        client.vms.exec_stream("web", ["sleep", "100"], timeout=0.5) as run,
    ):
        list(run)


def test_a_program_that_does_not_exist_is_an_error_line(client: Client) -> None:
    with (
        pytest.raises(GuestFailure, match="no-such-program"),
        client.vms.exec_stream("web", ["no-such-program"]) as run,
    ):
        list(run)


def test_a_vm_that_is_not_running_is_refused_before_streaming(
    client: Client, daemon: AgentDaemon
) -> None:
    daemon.add("idle", VmState.STOPPED)
    with pytest.raises(InvalidState, match="stopped"):
        client.vms.exec_stream("idle", ["true"])


def test_no_agent_listening_is_a_guest_failure(
    client: Client, daemon: AgentDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kasou.api._exec

    monkeypatch.setattr(kasou.api._exec, "_AGENT_WAIT", 0.2)
    daemon.vmm.agent = None  # the VMM now finds nothing on the agent's port
    with pytest.raises(GuestFailure, match="agent is not listening"):
        client.vms.exec_stream("web", ["true"])


def test_files_round_trip_through_the_agent(client: Client, folder: Path) -> None:
    data = os.urandom(300_000) + b"\0end"
    target = folder / "guest-file.bin"
    client.files.write("web", str(target), data)
    assert target.read_bytes() == data
    assert client.files.read("web", str(target)) == data
    with pytest.raises(GuestFailure, match="cannot read"):
        client.files.read("web", str(folder / "missing"))


def test_kasou_exec_prints_the_output_and_exits_with_the_status(server: Server) -> None:
    kasou = Path(sys.executable).with_name("kasou")
    script = "echo out; echo err >&2; exit 5"
    done = subprocess.run(
        [str(kasou), "exec", "--host", str(server.sock), "web", "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (5, "out\n", "err\n")


def test_a_sandbox_is_a_clone_of_its_template_and_is_removed_after(
    client: Client, daemon: AgentDaemon, folder: Path
) -> None:
    template = folder / "template"
    with Sandbox(template, client) as box:
        assert daemon.vms[box.name].state is VmState.RUNNING
        assert box.exec("echo $((6 * 7))").stdout == "42\n"
        assert box.exec(["sh", "-c", "cat; exit 4"], stdin=b"in").exit_code == 4
        box.files.write(str(folder / "note"), "kept")
        assert box.files.read(str(folder / "note")) == b"kept"
        name = box.name
    spec = daemon.specs[-1]
    assert (spec.restore, spec.clone) == (str(template), True)
    assert name not in daemon.vms
    assert daemon.deleted == [name]


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_a_sandbox_is_removed_when_its_block_is_left_by_an_exception(
    client: Client, daemon: AgentDaemon, folder: Path, interruption: type[BaseException]
) -> None:
    with pytest.raises(interruption), Sandbox(folder / "template", client) as box:
        raise interruption
    assert box.name not in daemon.vms
    assert daemon.deleted == [box.name]


def test_the_async_sandbox_and_stream_do_the_same(
    server: Server, daemon: AgentDaemon, folder: Path
) -> None:
    from kasou.sdk import AsyncClient, AsyncSandbox

    async def drive() -> tuple[str, list[ExecChunk], int | None, str]:
        async with (
            AsyncClient(server.sock) as sdk,
            AsyncSandbox(folder / "template", sdk) as box,
        ):
            answer = await box.exec("echo $((6 * 7))")
            async with box.exec_stream("echo out; echo err >&2; exit 2") as run:
                chunks = [chunk async for chunk in run]
            await box.files.write(str(folder / "a"), b"async")
            return answer.stdout, chunks, run.exit_code, box.name

    stdout, chunks, status, name = asyncio.run(drive())
    assert stdout == "42\n"
    assert sorted(chunks) == [ExecChunk("stderr", "err\n"), ExecChunk("stdout", "out\n")]
    assert status == 2
    assert (folder / "a").read_bytes() == b"async"
    assert daemon.deleted == [name]
