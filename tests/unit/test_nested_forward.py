"""Forwarded ports of the nested host: parsing, QEMU's options, a taken port refused before QEMU
starts, and the outer VM's image changing with the network set-up.

The forward working for real (a server inside answering on this host) is in
tests/nested/test_nested_forward.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kasou.cli.app import app
from kasou.errors import ConfigError
from kasou.nested import Forward, parse_forward, run_nested
from kasou.nested import _image as image
from kasou.nested._run import qemu_command


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program listens on, on 127.0.0.1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port: int = listener.getsockname()[1]
        yield port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", Forward(8080, 80)),
        ("18080", Forward(18080, 18080)),
        (" 1:65535 ", Forward(1, 65535)),
    ],
)
def test_forwards_are_parsed(text: str, expected: Forward) -> None:
    assert parse_forward(text) == expected
    assert str(expected) == f"{expected.host_port}:{expected.guest_port}"


@pytest.mark.parametrize(
    "text", ["", ":80", "8080:", "http:80", "8080:80:90", "-1:80", "0:80", "8080:65536", "8e3:1"]
)
def test_unusable_forwards_are_refused(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_forward(text)
    assert raised.value.field == "forward"


def argv(*forwards: Forward) -> list[str]:
    return qemu_command(
        "qemu", Path("/cache"), Path("/work"), memory_mib=1024, cpus=1, forwards=forwards
    )


def test_without_forwards_the_nested_host_has_no_nic() -> None:
    words = argv()
    assert "-nodefaults" in words  # so QEMU adds no NIC of its own either
    assert "-netdev" not in words
    assert not any("virtio-net" in word for word in words)


def test_forwards_ride_one_restricted_user_network_nic() -> None:
    words = argv(Forward(18080, 8080), Forward(2222, 22))
    assert words.count("-netdev") == 1
    netdev = words[words.index("-netdev") + 1]
    kind, *options = netdev.split(",")
    assert kind == "user"
    # restrict=on: the nested host reaches nothing outside; only the rules let traffic in, on
    # this host's loopback only.
    assert "restrict=on" in options
    assert [o for o in options if o.startswith("hostfwd=")] == [
        "hostfwd=tcp:127.0.0.1:18080-:8080",
        "hostfwd=tcp:127.0.0.1:2222-:22",
    ]
    netdev_id = next(o for o in options if o.startswith("id=")).removeprefix("id=")
    assert f"virtio-net-pci,netdev={netdev_id}" in words


def test_a_taken_host_port_is_refused_before_qemu_starts(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no QEMU here: the refusal comes first
    with pytest.raises(ConfigError, match=f"port {taken_port} on 127.0.0.1 is taken") as raised:
        run_nested(["true"], cwd=Path("/"), forwards=[Forward(taken_port, 80)])
    assert raised.value.field == "forward"
    assert "--forward OTHER:80" in str(raised.value)


def test_one_host_port_cannot_be_forwarded_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=f"host port {port} is forwarded twice"):
        run_nested(["true"], cwd=Path("/"), forwards=[Forward(port, 80), Forward(port, 81)])


def test_the_command_line_refuses_a_bad_or_taken_forward(taken_port: int) -> None:
    result = CliRunner().invoke(app, ["nested", "--forward", "80:x", "--", "true"])
    assert result.exit_code == 2
    assert "HOSTPORT:GUESTPORT" in result.output
    result = CliRunner().invoke(app, ["nested", "--forward", f"{taken_port}:80", "--", "true"])
    assert result.exit_code == 2
    assert f"port {taken_port} on 127.0.0.1 is taken" in result.output


def test_init_brings_up_the_nic_with_slirps_guest_address() -> None:
    init = image.init_script(["virtio_net"])
    assert 'ip addr add 10.0.2.15/24 dev "$nic"' in init
    assert "virtio_net" in image._WANTED_MODULES


def test_the_cache_key_changes_with_the_network_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    busybox = b"\x7fELF pretend busybox"
    key = image._cache_key(busybox)
    without_nic = tuple(name for name in image._WANTED_MODULES if name != "virtio_net")
    monkeypatch.setattr(image, "_WANTED_MODULES", without_nic)
    assert image._cache_key(busybox) != key
    monkeypatch.undo()
    monkeypatch.setattr(image, "GUEST_ADDRESS", "10.0.3.15/24")
    assert image._cache_key(busybox) != key
    monkeypatch.undo()
    monkeypatch.setattr(image, "_INIT", image._INIT.replace("ip addr add", "ip address add"))
    assert image._cache_key(busybox) != key
