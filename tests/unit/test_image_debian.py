"""The Debian 12 image (kasou.image._debian): its cache key, identifiers, partition table and
manifest without building anything, then one real build (as root, with Debian's mirror; cached
in the user's cache like the default guest, so only the first run or a changed recipe pays the
minutes) checked from the outside: qemu-img, sfdisk, blkid, debugfs on the file system at its
partition's offset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from kasou.cli import main
from kasou.image import DebianImage, ImageBuildError, _debian, debian_image

KEY = "0123456789abcdef"


def kasou(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``kasou argv``: (exit status, stdout, stderr), as the console script would."""
    try:
        status = main(argv)
    except SystemExit as leave:
        status = int(leave.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KASOU_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- the cache key ---------------------------------------------------------------------------


def test_the_key_changes_with_each_input_and_with_nothing_else() -> None:
    base = _debian.current_recipe()
    assert base.key() == _debian.current_recipe().key()
    assert len(base.key()) == 16
    files = dict(base.files)
    variants = [
        base._replace(version=base.version + "x"),
        base._replace(suite="trixie"),
        base._replace(variant="apt"),
        base._replace(packages=(*base.packages, "vim")),
        base._replace(packages=base.packages[:-1]),
        base._replace(dpkg_options=base.dpkg_options[1:]),
        base._replace(agent_source=base.agent_source + b"\n"),
        base._replace(files=(*base.files, ("rootfs/etc/motd", b"hi\n"))),
        base._replace(
            files=tuple(
                (name, data + b"#" if name == "hooks.sh" else data) for name, data in base.files
            )
        ),
        base._replace(
            files=tuple(
                (name, b"other\n" if name == "rootfs/etc/hostname" else data)
                for name, data in base.files
            )
        ),
    ]
    keys = {recipe.key() for recipe in variants}
    assert len(keys) == len(variants)
    assert base.key() not in keys
    # Parts are length-prefixed: moving a byte from one part to the next is a change.
    assert base._replace(suite="bookwor", variant="mminbase").key() != base.key()
    assert "hooks.sh" in files and "rootfs/etc/systemd/system/kasou-agent.service" in files


def test_the_key_follows_the_files_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = tmp_path / "rootfs"
    shutil.copytree(_debian.OVERLAY, overlay)
    monkeypatch.setattr(_debian, "OVERLAY", overlay)
    before = _debian.current_recipe().key()
    (overlay / "etc" / "hostname").write_text("changed\n")
    after = _debian.current_recipe().key()
    assert before != after
    (overlay / "etc" / "hostname").write_text("debian\n")
    assert _debian.current_recipe().key() == before


def test_identifiers_come_from_the_key() -> None:
    root = _debian.derived_uuid(KEY, "root")
    assert root == _debian.derived_uuid(KEY, "root")
    assert root != _debian.derived_uuid(KEY, "disk")
    assert root != _debian.derived_uuid("fedcba9876543210", "root")
    parsed = uuid.UUID(root)
    assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


# --- what the builder writes -----------------------------------------------------------------


def test_command_line_and_fstab_name_the_root_by_uuid() -> None:
    root = _debian.derived_uuid(KEY, "root")
    assert _debian.boot_cmdline(root) == f"console=ttyS0 root=UUID={root} ro"
    entries = [
        line.split() for line in _debian.fstab(root).splitlines() if not line.startswith("#")
    ]
    assert entries == [[f"UUID={root}", "/", "ext4", "rw,errors=remount-ro", "0", "1"]]


def _sfdisk_json(disk: Path) -> dict[str, object]:
    result = subprocess.run(
        ["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True
    )
    table: dict[str, object] = json.loads(result.stdout)["partitiontable"]
    return table


def _check_table(table: dict[str, object], key: str, node: str) -> None:
    """The GPT Debian's cloud images have, with GUIDs from ``key``."""
    assert table["label"] == "gpt"
    assert table["id"] == _debian.derived_uuid(key, "disk").upper()
    assert table["sectorsize"] == 512
    parts = table["partitions"]
    assert isinstance(parts, list)
    found = {int(part["node"].removeprefix(node)): part for part in parts}
    assert sorted(found) == [1, 14, 15]
    assert (found[14]["start"], found[14]["size"]) == (2048, 6144)
    assert (found[15]["start"], found[15]["size"]) == (8192, 253952)
    assert (found[1]["start"], found[1]["size"]) == (262144, 3930112)
    assert found[14]["type"] == "21686148-6449-6E6F-744E-656564454649"
    assert found[15]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert found[1]["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
    for number, part in found.items():
        assert part["uuid"] == _debian.derived_uuid(key, f"partition {number}").upper()
        # Each starts and ends on a MiB boundary; the root stays clear of the backup GPT.
        assert part["start"] % 2048 == 0 and part["size"] % 2048 == 0
    assert found[1]["start"] + found[1]["size"] - 1 <= table["lastlba"]
    assert table["lastlba"] == (2 << 30) // 512 - 34


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk (fdisk)")
def test_the_partition_script_makes_debians_cloud_layout(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as file:
        file.truncate(_debian.DISK_SIZE)
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", disk.name],
        input=_debian.partition_script(KEY, disk.name),
        text=True,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    _check_table(_sfdisk_json(disk), KEY, str(disk))


# --- the cache -------------------------------------------------------------------------------


def _manifest(root_uuid: str = "6cbb6905-ab9a-49e6-bcba-25e514acd28e") -> dict[str, str]:
    return {
        "recipe": "debian-1",
        "root_uuid": root_uuid,
        "kernel_version": "6.1.0-57-cloud-amd64",
        "cmdline": _debian.boot_cmdline(root_uuid),
    }


def test_a_manifest_gives_the_entrys_files_and_boot_parameters(tmp_path: Path) -> None:
    image = _debian.image_from_manifest(tmp_path, _manifest())
    assert image == DebianImage(
        disk=tmp_path / "disk.qcow2",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        root_uuid="6cbb6905-ab9a-49e6-bcba-25e514acd28e",
        kernel_version="6.1.0-57-cloud-amd64",
        cmdline="console=ttyS0 root=UUID=6cbb6905-ab9a-49e6-bcba-25e514acd28e ro",
    )
    incomplete = _manifest()
    del incomplete["root_uuid"]
    assert _debian.image_from_manifest(tmp_path, incomplete) is None


def test_without_a_build_an_empty_cache_says_what_to_run(cache: Path) -> None:
    assert _debian.find_debian() == (None, "not built")
    with pytest.raises(
        ImageBuildError, match=r"not built: run `kasou image build --distro debian-12"
    ):
        debian_image(build=False)


def test_an_entry_for_other_inputs_is_out_of_date_and_the_current_one_is_found(
    cache: Path,
) -> None:
    old = cache / "debian-12" / "fedcba9876543210"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps(_manifest()))
    assert _debian.find_debian() == (None, "out of date")
    with pytest.raises(ImageBuildError, match="out of date"):
        debian_image(build=False)
    current = cache / "debian-12" / _debian.current_recipe().key()
    current.mkdir()
    (current / "manifest.json").write_text(json.dumps(_manifest()))
    image = debian_image(build=False)
    assert image.disk == current / "disk.qcow2"
    assert image.cmdline == _manifest()["cmdline"]


def test_building_needs_root(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImageBuildError, match=r"needs root.*sudo kasou image build --distro"):
        _debian.build_debian()
    # Nothing was started: no staging directory is left, no entry made.
    assert not any((cache / "debian-12" / "tmp").glob("*"))
    assert _debian.find_debian() == (None, "not built")


def test_the_cli_names_the_distributions_it_builds(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = kasou(["image", "build", "--distro", "fedora-40"], capsys)
    assert (status, out) == (2, "")
    assert "the one distribution kasou builds is debian-12" in err


# --- one real build --------------------------------------------------------------------------

needs_build = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None,
    reason="building the Debian image needs root on Debian (mmdebstrap --mode=root)",
)


@pytest.fixture(scope="module")
def built() -> DebianImage:
    """The image in the user's cache, built if it is missing or out of date."""
    return debian_image()


class Fs:
    """debugfs on the root file system, inside the raw disk at the root partition's offset
    (e2fsprogs' unix I/O manager takes ``FILE?offset=BYTES``)."""

    def __init__(self, raw: Path) -> None:
        self.device = f"{raw}?offset={_debian.ROOT.offset}"

    def run(self, request: str) -> str:
        result = subprocess.run(
            ["debugfs", "-R", request, self.device], capture_output=True, text=True, check=True
        )
        return result.stdout

    def cat(self, path: str) -> str:
        return self.run(f"cat {path}")

    def names(self, path: str) -> set[str]:
        # ls -p: "/inode/mode/uid/gid/name/size/", one entry a line.
        lines = self.run(f"ls -p {path}").splitlines()
        return {line.split("/")[5] for line in lines if line.startswith("/")} - {".", ".."}

    def stat(self, path: str) -> str:
        return self.run(f"stat {path}")


@pytest.fixture(scope="module")
def raw(built: DebianImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("debian") / "disk.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(built.disk), str(path)],
        check=True,
    )
    yield path
    path.unlink()


@needs_build
def test_the_built_disk_is_a_sound_qcow2_of_two_gib(built: DebianImage) -> None:
    subprocess.run(["qemu-img", "check", str(built.disk)], capture_output=True, check=True)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(built.disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", 2 << 30)
    # Uncompressed clusters: what the guest reads costs no inflating.
    check = subprocess.run(
        ["qemu-img", "check", "--output=json", str(built.disk)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(check.stdout).get("compressed-clusters", 0) == 0


@needs_build
def test_the_built_disk_has_debians_partitions_and_file_systems(
    built: DebianImage, raw: Path
) -> None:
    key = built.disk.parent.name
    _check_table(_sfdisk_json(raw), key, str(raw))

    def probe(offset: int) -> dict[str, str]:
        out = subprocess.run(
            ["blkid", "-p", "-o", "export", "-O", str(offset), str(raw)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    root = probe(_debian.ROOT.offset)
    assert (root["TYPE"], root["UUID"], root["LABEL"]) == ("ext4", built.root_uuid, "root")
    assert built.root_uuid == _debian.derived_uuid(key, "root")
    esp = probe(_debian.ESP.offset)
    assert (esp["TYPE"], esp["LABEL"]) == ("vfat", "UEFI")
    subprocess.run(
        ["e2fsck", "-f", "-n", f"{raw}?offset={_debian.ROOT.offset}"],
        capture_output=True,
        check=True,
    )


@needs_build
def test_the_root_boots_its_own_kernel_by_uuid(built: DebianImage, raw: Path) -> None:
    fs = Fs(raw)
    version = built.kernel_version
    assert {f"vmlinuz-{version}", f"initrd.img-{version}"} <= fs.names("/boot")
    assert built.cmdline == f"console=ttyS0 root=UUID={built.root_uuid} ro"
    assert f"UUID={built.root_uuid} / ext4" in fs.cat("/etc/fstab")
    # The files beside the disk are the root's own.
    dumped = raw.parent / "vmlinuz"
    fs.run(f"dump /boot/vmlinuz-{version} {dumped}")
    assert dumped.read_bytes() == built.kernel.read_bytes()
    dumped.unlink()
    # The initramfs (zstd, the Debian default) has the drivers for a virtio-mmio disk.
    with open(built.initrd, "rb") as file:
        unpacked = zstandard.ZstdDecompressor().stream_reader(file).read()
    for module in ("virtio_mmio.ko", "virtio_blk.ko", "virtio_pci.ko"):
        assert f"/{module}".encode() in unpacked
    assert b"sbin/e2fsck" in unpacked
    assert "virtio_mmio" in fs.cat("/etc/initramfs-tools/modules").split()


@needs_build
def test_the_root_has_the_agent_network_and_cloud_init_setup(built: DebianImage, raw: Path) -> None:
    fs = Fs(raw)
    assert fs.cat("/etc/hostname") == "debian\n"
    assert "Mode:  0755" in fs.stat("/usr/local/sbin/kasou-agent")
    assert "kasou-agent.service" in fs.names("/etc/systemd/system/sysinit.target.wants")
    assert "Restart=always" in fs.cat("/etc/systemd/system/kasou-agent.service")
    assert "vmw_vsock_virtio_transport" in fs.cat("/etc/modules-load.d/kasou.conf")
    # Masked: COM2 is the agent's.
    assert 'Fast link dest: "/dev/null"' in fs.stat(
        "/etc/systemd/system/serial-getty@ttyS1.service"
    )
    for unit in ("systemd-networkd.service", "systemd-resolved.service"):
        wants = "multi-user.target.wants" if "networkd" in unit else "sysinit.target.wants"
        assert unit in fs.names(f"/etc/systemd/system/{wants}")
    assert "systemd-network-generator.service" in fs.names(
        "/etc/systemd/system/sysinit.target.wants"
    )
    assert "Name=en* eth*" in fs.cat("/etc/systemd/network/90-kasou-dhcp.network")
    assert "--timeout=" in fs.cat(
        "/etc/systemd/system/systemd-networkd-wait-online.service.d/kasou.conf"
    )
    assert "datasource_list: [ NoCloud, ConfigDrive ]" in fs.cat(
        "/etc/cloud/cloud.cfg.d/99_kasou.cfg"
    )


@needs_build
def test_the_root_is_clean_and_shared_by_no_machine(built: DebianImage, raw: Path) -> None:
    fs = Fs(raw)
    root_entry = next(line for line in fs.cat("/etc/shadow").splitlines() if line[:5] == "root:")
    assert root_entry.split(":")[1].startswith("!")
    assert not {name for name in fs.names("/etc/ssh") if name.startswith("ssh_host_")}
    assert fs.cat("/etc/machine-id") == ""
    assert fs.names("/var/lib/apt/lists") <= {"lock", "partial", "auxfiles"}
    assert not fs.names("/usr/share/man")
    # Owned by root, not by whoever ran the build or checked out the sources.
    assert "User:     0   Group:     0" in fs.stat("/etc/systemd/system/kasou-agent.service")


@needs_build
def test_the_cli_prints_the_cached_images_paths(
    built: DebianImage, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = kasou(["image", "build", "--distro", "debian-12"], capsys)
    assert status == 0
    assert f"disk     {built.disk}\n" in out
    assert f"cmdline  {built.cmdline}\n" in out
