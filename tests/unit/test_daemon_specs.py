"""What the daemon refuses in a VM spec beyond its shape, and the ``kasou run`` argv it makes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.cli.fastrun import parser
from kasou.daemon import Daemon
from kasou.daemon._specs import boots_once_arrived, check_spec, run_argv
from kasou.errors import ConflictError, SpecError
from kasou.spec import Limits, VmSpec


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return path


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kernel": "/no/such/vmlinux"}, "kernel"),
        ({"kernel": "relative/vmlinux"}, "kernel"),
        ({"memory": "100000G"}, "memory"),
        ({"disks": ["a.img,bogus"]}, "disks[0]"),
        ({"disks": ["/no/such/disk.img"]}, "disks[0]"),
        ({"nets": ["tap=t0,color=red"]}, "nets[0]"),
        ({"limits": Limits(memory_limit="lots")}, "limits.memory_limit"),
        ({"limits": Limits(cpu_pin={3: 0})}, "limits.cpu_pin"),
        ({"initrd": "KERNEL"}, "initrd"),  # an initrd without a kernel
    ],
)
def test_bad_specs_name_the_field(kernel: Path, fields: dict[str, object], field: str) -> None:
    if fields.get("initrd") == "KERNEL":
        fields = {"initrd": str(kernel)}
    elif "kernel" not in fields:
        fields = {"kernel": str(kernel), **fields}
    spec = VmSpec(name="vm", **fields)  # type: ignore[arg-type]
    with pytest.raises(SpecError) as raised:
        check_spec(spec)
    assert raised.value.field == field


def test_a_good_spec_passes(kernel: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    check_spec(
        VmSpec(name="vm", kernel=str(kernel), disks=[f"{disk},ro"], nets=["tap=t0"], memory="64M")
    )


def test_memory_is_checked_against_the_host(kernel: Path) -> None:
    spec = VmSpec(name="vm", kernel=str(kernel), memory="2G")
    check_spec(spec, host_memory=4 << 30)
    with pytest.raises(SpecError, match="more than the host"):
        check_spec(spec, host_memory=1 << 30)


def test_argv_is_what_kasou_run_parses(kernel: Path) -> None:
    spec = VmSpec(
        name="vm",
        kernel=str(kernel),
        cmdline="console=ttyS0 quiet",
        vcpus=2,
        memory="96M",
        disks=["/d.img,ro", "/e.img"],
        nets=["tap=t0"],
        rng=True,
        balloon=True,
        acpi=False,
        limits=Limits(cpus_quota=0.5, cpu_weight=50, cpu_pin={1: 3, 0: 2}, pids_limit=64),
    )
    options = vars(parser().parse_args(run_argv(spec, Path("/s/api.sock"), "file:/s/log")))
    assert options["kernel"] == str(kernel)
    assert options["cmdline"] == "console=ttyS0 quiet"
    assert (options["vcpus"], options["memory"]) == (2, "96M")
    assert options["disk"] == ["/d.img,ro", "/e.img"]
    assert options["net"] == ["tap=t0"]
    assert options["rng"] and options["balloon"] and options["no_acpi"]
    assert options["cpus_quota"] == "0.5" and options["cpu_weight"] == "50"
    assert options["cpu_pin"] == "0=2,1=3"
    assert options["pids_limit"] == "64"
    assert options["api_sock"] == "/s/api.sock"
    assert options["console"] == "file:/s/log"


def test_an_incoming_vm_may_carry_its_boot_fields_checked_as_a_new_vms(
    kernel: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    spec = VmSpec(
        name="vm",
        kernel=str(kernel),
        cmdline="console=ttyS0",
        disks=[str(disk)],
        rng=True,
        incoming="unix:/run/in.sock",
    )
    check_spec(spec)
    assert boots_once_arrived(spec)
    for bad, field in [
        ({"kernel": "/no/such/vmlinux"}, "kernel"),
        ({"disks": [f"{tmp_path}/gone.img"]}, "disks[0]"),
        ({"image": str(disk)}, "image"),  # a kernel or an image, not both
    ]:
        with pytest.raises(SpecError) as raised:
            check_spec(spec.model_copy(update=bad))
        assert raised.value.field == field
    with pytest.raises(SpecError) as raised:
        check_spec(spec.model_copy(update={"incoming": "ftp://x"}))
    assert raised.value.field == "incoming"


def test_a_restored_vm_still_refuses_boot_fields(kernel: Path) -> None:
    for fields, field in [({"kernel": str(kernel)}, "kernel"), ({"balloon": True}, "balloon")]:
        with pytest.raises(SpecError, match="a restored one has its own") as raised:
            check_spec(VmSpec(name="vm", restore="/var/snap/vm", **fields))  # type: ignore[arg-type]
        assert raised.value.field == field


def test_an_incoming_vm_without_boot_fields_waits_at_every_start() -> None:
    spec = VmSpec(name="vm", incoming="unix:/run/in.sock", disks=["/d.img"], nets=["tap=t0"])
    assert not boots_once_arrived(spec)
    assert not boots_once_arrived(VmSpec(name="vm", cmdline="quiet"))  # no incoming
    options = vars(parser().parse_args(run_argv(spec, Path("/s/api.sock"), "file:/s/log")))
    # Disks and nets given replace the arriving VM's own (on one host it needs its own TAP).
    assert options["incoming"] == "unix:/run/in.sock"
    assert options["disk"] == ["/d.img"] and options["net"] == ["tap=t0"]


def test_argv_of_an_incoming_vm_with_boot_fields_waits_for_the_stream(kernel: Path) -> None:
    spec = VmSpec(
        name="vm",
        kernel=str(kernel),
        cmdline="console=ttyS0",
        memory="96M",
        vcpus=2,
        disks=["/d.img"],
        nets=["tap=t0"],
        rng=True,
        acpi=False,
        limits=Limits(pids_limit=64),
        incoming="tcp://0.0.0.0:4444",
    )
    options = vars(parser().parse_args(run_argv(spec, Path("/s/api.sock"), "file:/s/log")))
    # kasou run refuses boot options beside --incoming: memory, vCPUs and devices (its disks
    # and interfaces too, at the same paths) come in the stream.
    assert options["incoming"] == "tcp://0.0.0.0:4444"
    assert options["kernel"] is None and options["cmdline"] is None
    assert not options["disk"] and not options["net"]
    assert not options["rng"] and not options["no_acpi"]
    assert options["pids_limit"] == "64" and options["api_sock"] == "/s/api.sock"
    # Once it arrived the daemon drops incoming: the same spec boots like a new VM.
    booted = run_argv(spec.model_copy(update={"incoming": None}), Path("/s/a"), "file:/s/l")
    options = vars(parser().parse_args(booted))
    assert options["incoming"] is None and options["kernel"] == str(kernel)
    assert options["disk"] == ["/d.img"] and options["net"] == ["tap=t0"]
    assert (options["vcpus"], options["memory"]) == (2, "96M")
    assert options["rng"] and options["no_acpi"]


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    opened = Daemon.open(folder)
    yield opened
    opened.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_create_refuses_a_taken_name_and_a_bad_spec(daemon: Daemon, kernel: Path) -> None:
    daemon.create(VmSpec(name="web", kernel=str(kernel)))
    with pytest.raises(ConflictError, match="web"):
        daemon.create(VmSpec(name="web", kernel=str(kernel)))
    with pytest.raises(SpecError) as raised:
        daemon.create(VmSpec(name="db", kernel=str(kernel), disks=["x.img,bogus"]))
    assert raised.value.field == "disks[0]"
    assert [vm.name for vm in daemon.list()] == ["web"]  # the refused one left no trace
    assert [e.kind for e in daemon.events()] == ["created"]


def test_create_keeps_an_incoming_vms_boot_fields(daemon: Daemon, kernel: Path) -> None:
    spec = VmSpec(name="db", kernel=str(kernel), incoming="unix:/run/kasou-in.sock")
    assert daemon.create(spec).spec == spec
    with pytest.raises(SpecError) as raised:
        daemon.create(spec.model_copy(update={"name": "db2", "kernel": "/no/such/vmlinux"}))
    assert raised.value.field == "kernel"
    assert [vm.name for vm in daemon.list()] == ["db"]


def test_boot_after_arrival_needs_incoming() -> None:
    with pytest.raises(SpecError, match="incoming") as refused:
        check_spec(VmSpec(name="a", boot_after_arrival=True))
    assert refused.value.field == "boot_after_arrival"
