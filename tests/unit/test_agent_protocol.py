"""The guest agent's wire codec (kasou.agent.protocol)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.agent import protocol as ap
from kasou.agent.protocol import Frame, FrameDecoder, FrameType
from kasou.errors import GuestError

frames = st.builds(Frame, st.integers(0, 255), st.binary(max_size=300))


def test_frame_layout_is_length_type_payload() -> None:
    # length counts the type byte and the payload, big endian.
    assert ap.encode_frame(FrameType.PING, b"abc") == b"\x00\x00\x00\x04\x09abc"
    assert ap.ready_frame() == b"\x00\x00\x00\x0e\x01kasou-agent 2"


def test_exec_frame_carries_id_and_nul_terminated_argv() -> None:
    raw = ap.exec_frame(7, ["uname", "-a"])
    assert raw == b"\x00\x00\x00\x0e\x02\x00\x00\x00\x07uname\x00-a\x00"
    (frame,) = FrameDecoder().feed(raw)
    assert frame.type == FrameType.EXEC
    assert ap.parse_exec(frame.payload) == (7, [b"uname", b"-a"])


@pytest.mark.parametrize(
    ("argv", "problem"),
    [([], "empty"), ([""], "empty"), (["a\0b"], "NUL"), ([b"ls", b"x\0"], "NUL")],
)
def test_exec_frame_refuses_argv_it_cannot_send(argv: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ap.exec_frame(1, argv)


@pytest.mark.parametrize("bad_id", [0, -1, 2**32])
def test_command_ids_are_nonzero_u32(bad_id: int) -> None:
    with pytest.raises(ValueError, match="command id"):
        ap.stdin_frame(bad_id, b"x")


def test_encode_refuses_a_frame_over_the_cap() -> None:
    ap.encode_frame(FrameType.STDIN, bytes(ap.MAX_FRAME - 1))
    with pytest.raises(ValueError, match="limit"):
        ap.encode_frame(FrameType.STDIN, bytes(ap.MAX_FRAME))


def test_guest_frames_parse_to_typed_messages() -> None:
    stream = b"".join(
        [
            ap.ready_frame(),
            ap.output_frame("stdout", 3, b"Linux kasou\n"),
            ap.output_frame("stderr", 3, b"warning\n"),
            ap.exit_frame(3, 130),
            ap.error_frame(4, "cannot run nope: No such file or directory"),
            ap.pong_frame(b"\x01\x02"),
        ]
    )
    messages = [ap.parse_guest_frame(f) for f in FrameDecoder().feed(stream)]
    assert messages == [
        ap.Ready("kasou-agent 2"),
        ap.Output(3, "stdout", b"Linux kasou\n"),
        ap.Output(3, "stderr", b"warning\n"),
        ap.Exit(3, 130),
        ap.AgentError(4, "cannot run nope: No such file or directory"),
        ap.Pong(b"\x01\x02"),
    ]


def test_exit_status_is_signed() -> None:
    assert ap.parse_exit(ap.exit_frame(1, -1)[5:]) == (1, -1)


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.EXIT, b"\x00\x00\x00\x01\x00"),  # too short
        Frame(FrameType.EXIT, bytes(9)),  # too long
        Frame(FrameType.STDOUT, b"\x00\x00"),  # no room for the id
        Frame(FrameType.READY, b"\xff"),  # not ASCII
        Frame(FrameType.EXEC, b"\x00\x00\x00\x01ls"),  # the agent never sends EXEC
        Frame(200, b""),
    ],
)
def test_malformed_guest_frames_raise_the_protocol_error(frame: Frame) -> None:
    with pytest.raises(ap.AgentProtocolError):
        ap.parse_guest_frame(frame)


def test_protocol_error_is_a_guest_error() -> None:
    assert issubclass(ap.AgentProtocolError, GuestError)


def test_decoder_waits_for_a_whole_frame() -> None:
    raw = ap.stdin_frame(9, b"hello")
    decoder = FrameDecoder()
    assert decoder.feed(raw[:3]) == []
    assert decoder.feed(raw[3:-1]) == []
    assert decoder.buffered == len(raw) - 1
    assert decoder.feed(raw[-1:]) == [Frame(FrameType.STDIN, b"\x00\x00\x00\x09hello")]
    assert decoder.buffered == 0


@given(st.lists(frames, max_size=20), st.data())
@settings(max_examples=100, deadline=None)
def test_any_chunking_decodes_to_the_same_frames(frames: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(f.encode() for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += decoder.feed(stream[start:end])
    assert decoded == frames
    assert decoder.buffered == 0


@given(st.lists(st.binary(max_size=64), max_size=20))
@settings(max_examples=150, deadline=None)
def test_garbage_raises_only_the_protocol_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame=4096)
    for chunk in chunks:
        with contextlib.suppress(ap.AgentProtocolError):
            for frame in decoder.feed(chunk):
                assert 0 <= frame.type <= 255
                with contextlib.suppress(ap.AgentProtocolError):
                    ap.parse_guest_frame(frame)
        # Whatever came in, the decoder never holds more than one frame's worth.
        assert decoder.buffered <= 4 + 4096


def test_bad_length_drops_the_buffer_and_decoding_goes_on() -> None:
    decoder = FrameDecoder()
    good = ap.ping_frame(b"ok")
    # A good frame, then a zero length: the good frame comes out first ...
    assert decoder.feed(good + b"\x00\x00\x00\x00junk") == [Frame(FrameType.PING, b"ok")]
    # ... and the next call reports the bad header, dropping what was buffered.
    with pytest.raises(ap.AgentProtocolError, match="bad frame length 0"):
        decoder.feed(b"")
    assert decoder.buffered == 0
    assert decoder.feed(good) == [Frame(FrameType.PING, b"ok")]


def test_length_over_the_cap_is_refused_before_buffering_it() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ap.AgentProtocolError, match=str(ap.MAX_FRAME + 1)):
        decoder.feed((ap.MAX_FRAME + 1).to_bytes(4, "big") + b"\x05")
    assert decoder.buffered == 0


def test_signal_and_stdin_eof_round_trip() -> None:
    (sig, eof) = FrameDecoder().feed(ap.signal_frame(5, 15) + ap.stdin_eof_frame(5))
    assert (sig.type, ap.parse_signal(sig.payload)) == (FrameType.SIGNAL, (5, 15))
    assert (eof.type, ap.parse_id(eof.payload)) == (FrameType.STDIN_EOF, 5)


def test_spawn_frame_layout_and_round_trip() -> None:
    raw = ap.spawn_frame(7, ["sh", "-c", "stty size"], tty=(40, 120), env={"LANG": "C.UTF-8"})
    head = b"\x00\x00\x00\x07" + b"\x00\x00\x00\x01" + b"\x00\x28\x00\x78" + b"\x00\x00\x00\x03"
    strings = b"sh\x00-c\x00stty size\x00LANG=C.UTF-8\x00"
    assert raw == (1 + len(head) + len(strings)).to_bytes(4, "big") + b"\x0c" + head + strings
    (frame,) = FrameDecoder().feed(raw)
    assert frame.type == FrameType.SPAWN
    assert ap.parse_spawn(frame.payload) == ap.Spawn(
        7, [b"sh", b"-c", b"stty size"], [b"LANG=C.UTF-8"], (40, 120)
    )


def test_spawn_without_a_terminal_has_no_flag_and_no_size() -> None:
    raw = ap.spawn_frame(1, ["true"])
    assert raw[5 + 4 : 5 + 12] == bytes(8)  # flags, rows, cols
    assert ap.parse_spawn(raw[5:]) == ap.Spawn(1, [b"true"], [], None)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"argv": []}, "empty"),
        ({"argv": [""]}, "empty"),
        ({"argv": ["a\0b"]}, "NUL"),
        ({"env": {"": "x"}}, "environment name"),
        ({"env": {"A=B": "x"}}, "environment name"),
        ({"env": {"A": "x\0"}}, "NUL"),
        ({"tty": (70000, 80)}, "16-bit"),
        ({"argv": ["x"] * (ap.MAX_ARGS + 1)}, "limit"),
    ],
)
def test_spawn_frame_refuses_what_it_cannot_send(kwargs: dict[str, Any], problem: str) -> None:
    arguments: dict[str, Any] = {"argv": ["true"], **kwargs}
    with pytest.raises(ValueError, match=problem):
        ap.spawn_frame(1, arguments.pop("argv"), **arguments)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"\x00\x00\x00\x01", "at least 16"),
        (bytes.fromhex("00000001 00000002 0000 0000 00000001") + b"ls\0", "unknown flags"),
        (bytes.fromhex("00000001 00000000 0000 0000 00000000") + b"ls\0", "argc 0"),
        (bytes.fromhex("00000001 00000000 0000 0000 00000002") + b"ls\0", "fewer than argc"),
        (bytes.fromhex("00000001 00000000 0000 0000 00000001") + b"ls", "NUL-terminated"),
        (bytes.fromhex("00000001 00000000 0000 0000 00000001") + b"ls\0=x\0", "NAME=VALUE"),
        (bytes.fromhex("00000001 00000000 0000 0000 00000001") + b"ls\0PATH\0", "NAME=VALUE"),
    ],
)
def test_malformed_spawn_payloads_raise_the_protocol_error(payload: bytes, problem: str) -> None:
    with pytest.raises(ap.AgentProtocolError, match=problem):
        ap.parse_spawn(payload)


def test_resize_and_stdin_ack_round_trip() -> None:
    resize, ack = FrameDecoder().feed(ap.resize_frame(3, 50, 132) + ap.stdin_ack_frame(3, 65536))
    assert resize == Frame(FrameType.RESIZE, b"\x00\x00\x00\x03\x00\x32\x00\x84")
    assert ap.parse_resize(resize.payload) == (3, 50, 132)
    assert ap.parse_session_frame(ack) == ap.StdinAck(3, 65536)


def test_stdin_ack_is_a_session_message_not_a_com2_one() -> None:
    # The VMM's COM2 channel (EXEC only) must never be handed a message it does not know.
    (ack,) = FrameDecoder().feed(ap.stdin_ack_frame(1, 1))
    with pytest.raises(ap.AgentProtocolError):
        ap.parse_guest_frame(ack)
    (pong,) = FrameDecoder().feed(ap.pong_frame(b"x"))
    assert ap.parse_session_frame(pong) == ap.Pong(b"x")


@pytest.mark.parametrize(
    "bad", [Frame(FrameType.STDIN_ACK, bytes(7)), Frame(FrameType.RESIZE, b"")]
)
def test_short_ack_and_resize_payloads_are_refused(bad: Frame) -> None:
    with pytest.raises(ap.AgentProtocolError):
        if bad.type == FrameType.RESIZE:
            ap.parse_resize(bad.payload)
        else:
            ap.parse_session_frame(bad)


def test_the_stream_window_fits_the_agents_stdin_queue() -> None:
    # A host keeping to STDIN_WINDOW never makes the agent drop stdin (its queue is 4 MiB).
    assert ap.STREAM_CHUNK <= ap.STDIN_WINDOW <= 4 << 20
    assert ap.STREAM_CHUNK + 9 < ap.MAX_FRAME
