"""The guest agent (kasou/image/agent/agent.c), built with this machine's gcc and run on the
host against a pty standing in for the guest's COM2, driven with the host's codec."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.agent import protocol as ap
from kasou.image._userland import AGENT_SOURCE

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

# A guard against a hung agent, not a pace: every wait ends as soon as the frame arrives.
_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "kasou-agent"
    # -Werror: the agent must build without a warning.
    result = subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), AGENT_SOURCE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


class Agent:
    """The agent on a pty: ``send`` frames, ``read`` messages."""

    def __init__(self, binary: Path) -> None:
        self.master, self._slave = os.openpty()
        self.proc = subprocess.Popen(
            [binary, "--serial", os.ttyname(self._slave)], stderr=subprocess.PIPE
        )
        self._decoder = ap.FrameDecoder()
        self._pending: list[ap.SessionMessage] = []

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        os.close(self.master)
        os.close(self._slave)

    def send(self, *frames: bytes) -> None:
        os.write(self.master, b"".join(frames))

    def read(self) -> ap.SessionMessage:
        while not self._pending:
            ready, _, _ = select.select([self.master], [], [], _TIMEOUT_S)
            assert ready, "the agent sent nothing"
            frames = self._decoder.feed(os.read(self.master, 65536))
            self._pending += [ap.parse_session_frame(f) for f in frames]
        return self._pending.pop(0)

    def run(self, id: int, *argv: str, stdin: bytes | None = None) -> tuple[bytes, bytes, int]:
        """EXEC argv as ``id`` and collect its output up to its EXIT."""
        self.send(ap.exec_frame(id, argv))
        if stdin is not None:
            self.send(ap.stdin_frame(id, stdin), ap.stdin_eof_frame(id))
        out = {"stdout": b"", "stderr": b""}
        while True:
            message = self.read()
            if isinstance(message, ap.Output) and message.id == id:
                assert len(message.data) <= ap.CHUNK
                out[message.stream] += message.data
            elif isinstance(message, ap.Exit) and message.id == id:
                return out["stdout"], out["stderr"], message.status
            else:
                raise AssertionError(f"unexpected {message}")


@pytest.fixture
def agent(agent_binary: Path) -> Iterator[Agent]:
    running = Agent(agent_binary)
    assert running.read() == ap.Ready(ap.AGENT_VERSION)
    yield running
    running.close()


def test_runs_a_command_and_reports_its_output_and_exit(agent: Agent) -> None:
    assert agent.run(1, "echo", "hello", "world") == (b"hello world\n", b"", 0)


def test_separates_stderr_and_passes_the_exit_code(agent: Agent) -> None:
    assert agent.run(2, "sh", "-c", "echo oops >&2; exit 3") == (b"", b"oops\n", 3)


def test_commands_run_with_kasous_path_in_root(agent: Agent) -> None:
    out, _, status = agent.run(3, "sh", "-c", 'echo "$PATH"; pwd')
    assert (out, status) == (b"/bin:/sbin:/usr/bin:/usr/sbin\n/\n", 0)


def test_stdin_reaches_the_command_and_eof_ends_it(agent: Agent) -> None:
    data = bytes(range(256)) * 64  # binary, 16 KiB: more than one output chunk back
    assert agent.run(4, "cat", stdin=data) == (data, b"", 0)


def test_large_output_comes_whole_in_chunks(agent: Agent) -> None:
    out, _, status = agent.run(5, "head", "-c", "300000", "/dev/zero")
    assert (len(out), out.count(0), status) == (300000, 300000, 0)


def test_a_signal_ends_a_command_with_128_plus_its_number(agent: Agent) -> None:
    agent.send(ap.exec_frame(6, ["sleep", "1000"]), ap.signal_frame(6, 15))
    assert agent.read() == ap.Exit(6, 128 + 15)


def test_commands_run_concurrently(agent: Agent) -> None:
    agent.send(ap.exec_frame(10, ["cat"]), ap.exec_frame(11, ["cat"]))
    agent.send(ap.stdin_frame(11, b"second\n"), ap.stdin_frame(10, b"first\n"))
    got = {agent.read(), agent.read()}
    assert got == {ap.Output(10, "stdout", b"first\n"), ap.Output(11, "stdout", b"second\n")}
    agent.send(ap.stdin_eof_frame(10), ap.stdin_eof_frame(11))
    assert {agent.read(), agent.read()} == {ap.Exit(10, 0), ap.Exit(11, 0)}


def test_an_unknown_program_is_an_error_not_an_exit(agent: Agent) -> None:
    agent.send(ap.exec_frame(7, ["/no/such/program"]))
    message = agent.read()
    assert isinstance(message, ap.AgentError)
    assert message.id == 7
    assert "No such file" in message.message
    agent.send(ap.ping_frame(b"still there"))
    assert agent.read() == ap.Pong(b"still there")


def test_an_id_in_use_is_refused(agent: Agent) -> None:
    agent.send(ap.exec_frame(8, ["cat"]), ap.exec_frame(8, ["true"]))
    message = agent.read()
    assert isinstance(message, ap.AgentError) and "already running" in message.message
    agent.send(ap.stdin_eof_frame(8))
    assert agent.read() == ap.Exit(8, 0)


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"\x00\x00\x00\x00rubbish", "bad frame length 0"),
        (b"\xff\xff\xff\xff", "bad frame length"),
        (ap.encode_frame(99, b"x"), "unexpected frame type 99"),
        (ap.encode_frame(ap.FrameType.EXEC, b"\x00\x00\x00\x01ls"), "NUL-terminated"),
        (ap.encode_frame(ap.FrameType.EXEC, b"\x00\x00"), "without an id"),
        (ap.encode_frame(ap.FrameType.EXEC, b"\x00\x00\x00\x00ls\x00"), "id 0"),
        (ap.encode_frame(ap.FrameType.SIGNAL, b"\x00"), "8 bytes"),
        (ap.stdin_frame(404, b"x"), "no command 404"),
    ],
)
def test_malformed_input_gets_an_error_and_the_agent_lives_on(
    agent: Agent, raw: bytes, complaint: str
) -> None:
    agent.send(raw)
    message = agent.read()
    assert isinstance(message, ap.AgentError), message
    assert complaint in message.message
    assert agent.run(12, "true") == (b"", b"", 0)


def test_usage_error_for_unknown_arguments(agent_binary: Path) -> None:
    result = subprocess.run([agent_binary, "serve"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_spawn_works_on_com2_too_with_its_chunk_size(agent: Agent) -> None:
    agent.send(ap.spawn_frame(13, ["sh", "-c", "head -c 10000 /dev/zero; cat"]))
    agent.send(ap.stdin_frame(13, b"typed"), ap.stdin_eof_frame(13))
    out, acked = b"", 0
    while not isinstance(message := agent.read(), ap.Exit):
        if isinstance(message, ap.Output):
            assert len(message.data) <= ap.CHUNK
            out += message.data
        else:
            assert isinstance(message, ap.StdinAck), message
            acked += message.count
    assert (message, out, acked) == (ap.Exit(13, 0), bytes(10000) + b"typed", 5)
