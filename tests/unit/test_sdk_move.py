"""The parts of ``client.vms.move`` that need no kasoud: where the source connects, and the
VM declared on the destination. The move itself is tested against two live kasouds in
tests/kvm/test_daemon_move.py."""

from __future__ import annotations

from pathlib import Path

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


def test_the_destination_vm_is_the_whole_spec_waiting() -> None:
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
        nets=["tap=db0"],
    )
    there = destination_spec(spec, "tcp://0.0.0.0:4444")
    assert there == spec.model_copy(
        update={"incoming": "tcp://0.0.0.0:4444", "boot_after_arrival": True}
    )
    with pytest.raises(InvalidSpec, match="incoming"):
        destination_spec(spec, "")


@pytest.mark.parametrize(
    "spec",
    [
        VmSpec(name="db", restore="/var/snap/db", memory="512M", labels={"tier": "db"}),
        VmSpec(name="db", incoming="unix:/run/in.sock", memory="512M", labels={"tier": "db"}),
    ],
)
def test_a_vm_with_nothing_to_boot_from_moves_with_its_size_only(spec: VmSpec) -> None:
    there = destination_spec(spec, "unix:/run/in.sock")
    assert there == VmSpec(
        name="db", memory="512M", labels={"tier": "db"}, incoming="unix:/run/in.sock"
    )


def test_the_default_guest_moves_whole_and_boots_as_itself_after_arrival() -> None:
    """A spec of the default guest (a size, disks, no kernel) is bootable as it is: the
    destination keeps it whole, marked to boot once the VM arrived."""
    from kasou.daemon._specs import boots_once_arrived, run_argv

    spec = VmSpec(name="db", memory="512M", labels={"tier": "db"}, disks=["/srv/db.img"])
    there = destination_spec(spec, "unix:/run/in.sock")
    assert there.disks == ["/srv/db.img"] and there.boot_after_arrival
    assert boots_once_arrived(there)
    waiting = run_argv(there, Path("/s/api.sock"), "sock:/s/c.sock")
    assert waiting[:2] == ["--incoming", "unix:/run/in.sock"] and "--disk" not in waiting
    arrived = there.model_copy(update={"incoming": None, "boot_after_arrival": False})
    booting = run_argv(arrived, Path("/s/api.sock"), "sock:/s/c.sock")
    assert booting[:4] == ["--memory", "512M", "--vcpus", "1"]
    assert booting[booting.index("--disk") + 1] == "/srv/db.img"
