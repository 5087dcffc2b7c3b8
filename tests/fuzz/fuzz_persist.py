"""Fuzz kasou.persist's readers with atheris: whatever bytes arrive, the only exception that
may escape is SnapshotFormatError (anything else is a crash, and atheris stops on it).

Each input is fed, as is, to every reader of untrusted data:

- ``unpack_sections``, then ``decode_state`` of each section it accepts into ``SampleState``
  (a nested frozen dataclass with every kind of field a State has);
- ``decode_state`` directly, so msgpack decoding is fuzzed without a CRC in front of it;
- ``read_frame``, frame after frame until the bytes run out;
- ``check_stream_hello`` on its first 12 bytes.

It is also read as a recipe for a valid file (section payloads that are encoded states), which
must round-trip and then be damaged at a chosen place: so the parser's paths behind the CRCs
are reached too.

Run::

    .venv/bin/python tests/fuzz/fuzz_persist.py --write-seeds corpus/
    .venv/bin/python tests/fuzz/fuzz_persist.py -max_total_time=20
    .venv/bin/python tests/fuzz/fuzz_persist.py -atheris_runs=100000 corpus/

(libFuzzer's flags; crashes are written to ``crash-<sha1>`` in the working directory unless
``-artifact_prefix=DIR/`` says where.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["kasou.persist"]):
    from kasou.persist import (
        SnapshotFormatError,
        check_stream_hello,
        decode_state,
        encode_state,
        frame_header,
        pack_sections,
        read_frame,
        stream_hello,
        unpack_sections,
    )


@dataclass(frozen=True)
class QueueState:
    index: int
    ready: bool
    desc_gpa: int | None


@dataclass(frozen=True)
class SampleState:
    name: str
    regs: bytes
    msrs: tuple[tuple[int, int], ...]
    queues: tuple[QueueState, ...]
    pending: QueueState | None
    halted: bool = False


class EndOfInput(Exception):
    """The fuzz input ran out: what a socket reader raises at end of stream."""


def read_frames(data: bytes) -> None:
    offset = 0

    def recv_exactly(size: int) -> bytes:
        nonlocal offset
        if offset + size > len(data):
            raise EndOfInput
        chunk = data[offset : offset + size]
        offset += size
        return chunk

    try:
        while True:
            read_frame(recv_exactly)
    except (EndOfInput, SnapshotFormatError):
        pass


def read_as_is(data: bytes) -> None:
    try:
        for name, payload in unpack_sections(data, source="fuzz").items():
            try:
                decode_state(payload, SampleState, what=name)
            except SnapshotFormatError:
                pass
    except SnapshotFormatError:
        pass
    try:
        decode_state(data, SampleState, what="fuzz")
    except SnapshotFormatError:
        pass
    read_frames(data)
    try:
        check_stream_hello(data[:12])
    except SnapshotFormatError:
        pass


def sample_state(provider: atheris.FuzzedDataProvider) -> SampleState:
    queues = tuple(
        QueueState(
            provider.ConsumeIntInRange(0, 1023),
            provider.ConsumeBool(),
            provider.ConsumeIntInRange(0, 2**64 - 1) if provider.ConsumeBool() else None,
        )
        for _ in range(provider.ConsumeIntInRange(0, 3))
    )
    return SampleState(
        name=provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 16)),
        regs=provider.ConsumeBytes(provider.ConsumeIntInRange(0, 64)),
        msrs=tuple(
            (provider.ConsumeIntInRange(0, 2**32 - 1), provider.ConsumeIntInRange(0, 2**64 - 1))
            for _ in range(provider.ConsumeIntInRange(0, 4))
        ),
        queues=queues,
        pending=queues[0] if queues and provider.ConsumeBool() else None,
        halted=provider.ConsumeBool(),
    )


def read_damaged(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    states = {
        f"dev{index}": sample_state(provider) for index in range(provider.ConsumeIntInRange(0, 4))
    }
    packed = pack_sections({name: encode_state(state) for name, state in states.items()})
    sections = unpack_sections(packed, source="fuzz")
    decoded = {
        name: decode_state(payload, SampleState, what=name) for name, payload in sections.items()
    }
    if decoded != states:
        raise AssertionError(f"round trip changed the states: {states!r} -> {decoded!r}")

    damaged = bytearray(packed)
    for _ in range(provider.ConsumeIntInRange(0, 3)):
        damaged[provider.ConsumeIntInRange(0, len(damaged) - 1)] ^= provider.ConsumeIntInRange(
            1, 255
        )
    del damaged[len(damaged) - provider.ConsumeIntInRange(0, len(damaged)) :]
    read_as_is(bytes(damaged))


def test_one_input(data: bytes) -> None:
    read_as_is(data)
    read_damaged(data)


def write_seeds(corpus: Path) -> None:
    """Valid inputs to start from (a section file of encoded states, an encoded state,
    frames, a hello), so the paths behind the magic and the CRCs are reached at once."""
    queue = QueueState(0, True, 0x10000)
    state = SampleState("blk", b"\x01" * 16, ((0x10, 7),), (queue,), queue, halted=True)
    files = {
        "sections": pack_sections({"vcpu0": encode_state(state), "empty": b""}),
        "state": encode_state(state),
        "frames": frame_header(1, b"page") + b"page" + frame_header(2, b""),
        "hello": stream_hello(),
    }
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (corpus / name).write_bytes(data)


def main() -> None:
    if sys.argv[1:2] == ["--write-seeds"] and len(sys.argv) == 3:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
