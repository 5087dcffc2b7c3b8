"""The parts of ``client.vms.move`` that need no kasoud: where the source connects, and the
VM declared on the destination. The move itself is tested against two live kasouds in
tests/kvm/test_daemon_move.py."""

from __future__ import annotations

import pytest

from kasou.sdk import InvalidSpec
from kasou.sdk._move import connect_url, destination_spec
from kasou.spec import Limits, RestartPolicy, VmSpec


@pytest.mark.parametrize(
    ("listen", "destination", "connect"),
    [
        ("unix:/run/in.sock", None, "unix:/run/in.sock"),
        ("tcp://10.0.0.2:4444", "https://hostb:8443", "tcp://10.0.0.2:4444"),
        ("tcp://0.0.0.0:4444", "https://hostb:8443", "tcp://hostb:4444"),
        ("tcp://[::]:4444", "https://[fd00::2]:8443", "tcp://[fd00::2]:4444"),
        ("tcp://0.0.0.0:4444", None, "tcp://127.0.0.1:4444"),
        ("tcp://[::]:4444", None, "tcp://[::1]:4444"),
    ],
)
def test_the_source_connects_where_the_destination_listens(
    listen: str, destination: str | None, connect: str
) -> None:
    assert connect_url(listen, destination) == connect


def test_the_destination_vm_keeps_what_the_user_declared_and_waits() -> None:
    spec = VmSpec(
        name="db",
        kernel="/boot/vmlinux",
        cmdline="console=ttyS0",
        vcpus=2,
        memory="512M",
        rng=True,
        acpi=False,
        limits=Limits(cpu_weight=200),
        restart=RestartPolicy.ALWAYS,
        labels={"tier": "db"},
        disks=["/srv/db.img"],
    )
    there = destination_spec(spec, "tcp://0.0.0.0:4444")
    assert there == VmSpec(
        name="db",
        vcpus=2,
        memory="512M",
        acpi=False,
        limits=Limits(cpu_weight=200),
        restart=RestartPolicy.ALWAYS,
        labels={"tier": "db"},
        incoming="tcp://0.0.0.0:4444",
    )
    with pytest.raises(InvalidSpec, match="incoming"):
        destination_spec(spec, "")
