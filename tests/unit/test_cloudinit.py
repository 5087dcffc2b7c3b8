"""NoCloud seeds (kasou.cloudinit, ``kasou run --cloud-init``): images that independent
readers (blkid, genisoimage's isoinfo) read back byte for byte, laid out like cloud-localds's,
and every input cloud-init would ignore refused in one line before anything is written."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.cloudinit import MAX_FILE_SIZE, SeedFiles, build_seed, parse_cloud_init
from kasou.errors import ConfigError, HostError

needs_isoinfo = pytest.mark.skipif(
    shutil.which("isoinfo") is None or shutil.which("blkid") is None,
    reason="isoinfo or blkid missing (apt-get install genisoimage util-linux)",
)
needs_cloud_localds = pytest.mark.skipif(
    shutil.which("cloud-localds") is None,
    reason="cloud-localds missing (apt-get install cloud-image-utils)",
)

USER_DATA = b"#cloud-config\nruncmd:\n  - [sh, -c, 'echo kasou-was-here > /run/mark']\n"
META_DATA = b"instance-id: iid-test-01\nlocal-hostname: seeded\n"
NETWORK_CONFIG = b"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
TREES = ("-J", "-R")  # Joliet, Rock Ridge: the trees a Linux guest reads names from
KASOU = str(Path(sys.executable).with_name("kasou"))


def iso_file(image: Path, name: str, tree: str) -> bytes:
    """A file of ``image`` as genisoimage's reader extracts it through ``tree``."""
    result = subprocess.run(
        ["isoinfo", tree, "-x", f"/{name}", "-i", str(image)], capture_output=True, check=True
    )
    return result.stdout


def iso_listing(image: Path, tree: str) -> dict[str, int]:
    """The root directory of ``image`` through ``tree`` ("" for plain ISO 9660): name -> size."""
    args = ["isoinfo", "-l", "-i", str(image)] + ([tree] if tree else [])
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    files = re.findall(r"^-\S*\s+\d+\s+\d+\s+\d+\s+(\d+) .*\]\s+(\S+)\s*$", output, re.M)
    return {name: int(size) for size, name in files}


def blkid(image: Path) -> dict[str, str]:
    result = subprocess.run(
        ["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True, check=True
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def seed_of(folder: Path, user_data: bytes, **others: bytes) -> Path:
    """Build a seed in ``folder`` from these contents (keywords: meta_data, network_config)."""
    files = SeedFiles(
        write(folder, "user-data.in", user_data),
        *(
            write(folder, f"{key}.in", others[key]) if key in others else None
            for key in ("meta_data", "network_config")
        ),
    )
    out = folder / "seed.iso"
    build_seed(out, files, hostname="kasou")
    return out


# -- the image --------------------------------------------------------------------------------


@needs_isoinfo
def test_the_seed_is_an_iso9660_volume_labelled_cidata(tmp_path: Path) -> None:
    info = blkid(seed_of(tmp_path, USER_DATA))
    assert info["TYPE"] == "iso9660"
    assert info["LABEL"] == "cidata"  # lower case, as cloud-localds writes it


@needs_isoinfo
@pytest.mark.parametrize("tree", TREES)
def test_every_file_reads_back_byte_exact_under_its_own_name(tmp_path: Path, tree: str) -> None:
    image = seed_of(tmp_path, USER_DATA, meta_data=META_DATA, network_config=NETWORK_CONFIG)
    assert iso_listing(image, tree) == {
        "meta-data": len(META_DATA),
        "network-config": len(NETWORK_CONFIG),
        "user-data": len(USER_DATA),
    }
    assert iso_file(image, "user-data", tree) == USER_DATA
    assert iso_file(image, "meta-data", tree) == META_DATA
    assert iso_file(image, "network-config", tree) == NETWORK_CONFIG


@needs_isoinfo
@needs_cloud_localds
@pytest.mark.parametrize("network", [False, True], ids=["plain", "network-config"])
def test_the_layout_is_cloud_localdss(tmp_path: Path, network: bool) -> None:
    user = write(tmp_path, "user-data", USER_DATA)
    meta = write(tmp_path, "meta-data", META_DATA)
    net = write(tmp_path, "network-config", NETWORK_CONFIG)
    peer = tmp_path / "peer.iso"
    subprocess.run(
        ["cloud-localds", *(["-N", str(net)] if network else []), str(peer), str(user), str(meta)],
        check=True,
        capture_output=True,
    )
    ours = tmp_path / "ours.iso"
    build_seed(ours, SeedFiles(user, meta, net if network else None), hostname="kasou")
    for tree in ("", *TREES):  # the 8.3 names too (USER_DAT.;1), for readers without either
        assert iso_listing(ours, tree) == iso_listing(peer, tree), tree
    assert blkid(ours)["LABEL"] == blkid(peer)["LABEL"]
    assert blkid(ours)["TYPE"] == blkid(peer)["TYPE"]


@needs_isoinfo
def test_without_meta_data_kasou_writes_a_stable_instance_id_and_the_host_name(
    tmp_path: Path,
) -> None:
    first = iso_file(seed_of(tmp_path, USER_DATA), "meta-data", "-J")
    again = iso_file(seed_of(tmp_path, USER_DATA), "meta-data", "-J")
    other = iso_file(seed_of(tmp_path, USER_DATA + b"packages: [htop]\n"), "meta-data", "-J")
    meta = yaml.safe_load(first)
    assert meta["local-hostname"] == "kasou"
    assert re.fullmatch(r"kasou-[0-9a-f]{16}", meta["instance-id"])
    assert again == first  # same inputs: same instance, per-instance modules do not re-run
    assert yaml.safe_load(other)["instance-id"] != meta["instance-id"]


@needs_isoinfo
def test_meta_data_without_an_instance_id_gets_one_and_keeps_the_rest(tmp_path: Path) -> None:
    given_meta = b"local-hostname: web1\npublic-keys: [ssh-ed25519 AAAA]\n"
    image = seed_of(tmp_path, USER_DATA, meta_data=given_meta)
    meta = yaml.safe_load(iso_file(image, "meta-data", "-R"))
    assert list(meta) == ["instance-id", "local-hostname", "public-keys"]
    assert meta["instance-id"].startswith("kasou-")
    assert meta["local-hostname"] == "web1"  # the user's, not the VM's name
    assert meta["public-keys"] == ["ssh-ed25519 AAAA"]


@needs_isoinfo
def test_a_host_name_yaml_would_read_as_a_boolean_stays_a_string(tmp_path: Path) -> None:
    out = tmp_path / "seed.iso"
    build_seed(out, SeedFiles(write(tmp_path, "ud", USER_DATA)), hostname="true")
    assert yaml.safe_load(iso_file(out, "meta-data", "-J"))["local-hostname"] == "true"


@needs_isoinfo
@pytest.mark.parametrize(
    "user_data",
    [
        b"#!/bin/sh\necho hello > /run/hello\n",
        b"#include\nhttps://example.invalid/cloud-config.yaml\n",
        b"#include-once\nhttps://example.invalid/once.yaml\n",
        b"#cloud-boothook\n#!/bin/sh\necho early\n",
        b"#part-handler\ndef list_types():\n    return []\n",
        b"## template: jinja\n#cloud-config\nhostname: {{ v1.instance_id }}\n",
        b"#cloud-config-archive\n- type: text/cloud-config\n  content: 'runcmd: [ls]'\n",
        b"#cloud-config\n",  # empty: nothing to do, but cloud-init reads it
        b"  #Cloud-Config\nruncmd: [ls]\n",  # cloud-init lower-cases and strips the start
        gzip.compress(USER_DATA),  # stays compressed in the seed: cloud-init gunzips it
        b"Content-Type: multipart/mixed; boundary=XX\nMIME-Version: 1.0\n\n--XX\n"
        b"Content-Type: text/cloud-config\n\nruncmd: [ls]\n--XX\n"
        b"Content-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--XX--\n",
    ],
    ids=[
        "script",
        "include",
        "include-once",
        "boothook",
        "part-handler",
        "jinja",
        "archive",
        "empty-config",
        "indented-mixed-case",
        "gzip",
        "mime",
    ],
)
def test_each_kind_cloud_init_acts_on_is_taken_as_it_is(tmp_path: Path, user_data: bytes) -> None:
    image = seed_of(tmp_path, user_data)
    assert iso_file(image, "user-data", "-J") == user_data


# -- refused input ----------------------------------------------------------------------------

MIME_HEAD = b"Content-Type: multipart/mixed; boundary=XX\nMIME-Version: 1.0\n\n--XX\n"


@pytest.mark.parametrize(
    ("user_data", "says"),
    [
        (b"runcmd: [ls]\n", "add '#cloud-config' as its first line"),
        (b"#cloud-config\nruncmd: [ls]\n  bad: indent\n", "lines 2-3: "),
        (b"#cloud-config\nruncmd: [ls\n", "lines 2-3: "),
        (b"#cloud-config\n- a list\n", "is a YAML list, not a mapping"),
        (b"#cloud-config\njust words\n", "is a YAML scalar, not a mapping"),
        (b"#cloud-config\na: 1\n---\nb: 2\n", "but found another document"),
        (b"#cloud-config\nwhen: 2001-13-45\n", "cannot be read (month must be in 1..12)"),
        (b"#cloud-config\na: 1\x01\n", "line 2: unacceptable character #x0001"),
        (b"#cloud-config\nname: caf\xe9\n", "is not UTF-8 (byte 23)"),
        (b"#!/bin/sh\necho caf\xe9\n", "is not UTF-8"),
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),
        (b"\xef\xbb\xbf#cloud-config\na: 1\n", "byte-order mark"),
        (b"Content-Type: text/cloud-config\n\na: 1\n", "add one"),  # no MIME-Version
        (b"echo hello\n", "start it with #cloud-config (YAML), #! (a script)"),
        (b"#cloud-config-archive\na: 1\n", "make it a list"),
        (b"#cloud-config\n" + b"[" * 200_000, "line 2: "),
        (MIME_HEAD + b"Content-Type: text/cloud-config\n\n- a\n--XX--\n", "part 1 is a YAML list"),
        (MIME_HEAD + b"Content-Type: text/plain\n\ncaf\xe9\n--XX--\n", "is a MIME archive that"),
        (gzip.compress(b"runcmd: [ls]\n"), "(gzip) is YAML without the '#cloud-config'"),
        (gzip.compress(USER_DATA)[:-12], "truncated gzip data"),
        (b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff\xff", "is not valid gzip data (Error -3"),
        (gzip.compress(b"#!/bin/sh\n" + bytes(MAX_FILE_SIZE)), "decompresses to more than 1 MiB"),
        (b"#!/bin/sh\n" + b"#" * MAX_FILE_SIZE, "is larger than 1 MiB"),
    ],
    ids=[
        "plain-yaml",
        "bad-indent",
        "unclosed-flow",
        "list",
        "scalar",
        "two-documents",
        "bad-date",
        "control-char",
        "latin1-config",
        "latin1-script",
        "empty",
        "blank",
        "bom",
        "content-type-only",
        "no-header",
        "archive-not-list",
        "deep-nesting",
        "mime-part-list",
        "mime-not-utf8",
        "gzip-plain-yaml",
        "gzip-truncated",
        "gzip-garbage",
        "gzip-bomb",
        "too-large",
    ],
)
def test_user_data_cloud_init_would_ignore_is_refused(
    tmp_path: Path, user_data: bytes, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        seed_of(tmp_path, user_data)
    message = str(caught.value)
    assert says in message
    assert message.startswith(f"cloud-init: user-data {tmp_path / 'user-data.in'}")
    assert "\n" not in message
    assert not (tmp_path / "seed.iso").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["user-data.in"]  # no temp file


@pytest.mark.parametrize(
    ("others", "says"),
    [
        ({"meta_data": b"- a\n- b\n"}, "meta-data"),
        ({"meta_data": b"instance-id: a\nlocal-hostname: b: c\nx: 1\n"}, "line 2: "),
        ({"meta_data": b"instance-id: caf\xe9\n"}, "is not UTF-8"),
        ({"network_config": b"ethernets: {}\n"}, "has no 'version: 1' or 'version: 2'"),
        ({"network_config": b"network: [a]\n"}, "has a 'network:' that is not a mapping"),
        ({"network_config": b""}, "is empty, not a mapping"),
        ({"network_config": b"version: 2\n  x: [\n"}, "line 2: "),
    ],
    ids=[
        "meta-list",
        "meta-bad-yaml",
        "meta-latin1",
        "net-no-version",
        "net-network-list",
        "net-empty",
        "net-bad-yaml",
    ],
)
def test_meta_data_and_network_config_must_be_mappings_cloud_init_reads(
    tmp_path: Path, others: dict[str, bytes], says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        seed_of(tmp_path, USER_DATA, **others)
    (key,) = others
    name = key.replace("_", "-")
    assert str(caught.value).startswith(f"cloud-init: {name} {tmp_path / f'{key}.in'} ")
    assert says in str(caught.value)
    assert not (tmp_path / "seed.iso").exists()


@needs_isoinfo
@pytest.mark.parametrize(
    "network",
    [b"network:\n  version: 1\n  config: []\n", b"network:\n  config: disabled\n"],
    ids=["v1-wrapped", "disabled"],
)
def test_other_network_config_shapes_cloud_init_reads(tmp_path: Path, network: bytes) -> None:
    image = seed_of(tmp_path, USER_DATA, network_config=network)
    assert iso_file(image, "network-config", "-R") == network


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    user = write(tmp_path, "user-data", USER_DATA)
    cases = [
        (SeedFiles(tmp_path / "nope"), f"user-data {tmp_path / 'nope'} does not exist"),
        (SeedFiles(tmp_path), f"user-data {tmp_path} is a folder"),
        (SeedFiles(user, tmp_path / "md"), f"meta-data {tmp_path / 'md'} does not exist"),
        (SeedFiles(user, None, tmp_path), f"network-config {tmp_path} is a folder"),
    ]
    for files, says in cases:
        with pytest.raises(ConfigError, match=re.escape(says)):
            build_seed(tmp_path / "seed.iso", files, hostname="kasou")
    assert not (tmp_path / "seed.iso").exists()


@pytest.mark.parametrize("hostname", ["", "under_score", "-leading", "a" * 64, "a..b", "a b"])
def test_a_vm_name_that_is_no_host_name_is_refused(tmp_path: Path, hostname: str) -> None:
    user = write(tmp_path, "u", USER_DATA)
    with pytest.raises(ConfigError, match="is not a host name"):
        build_seed(tmp_path / "s.iso", SeedFiles(user), hostname=hostname)
    assert not (tmp_path / "s.iso").exists()
    # Meta-data of the user's own names the host: the VM's name is not written then.
    build_seed(
        tmp_path / "s.iso", SeedFiles(user, write(tmp_path, "m", META_DATA)), hostname=hostname
    )
    assert (tmp_path / "s.iso").exists()


def test_refused_input_leaves_an_existing_seed_as_it_was(tmp_path: Path) -> None:
    out = write(tmp_path, "seed.iso", b"the previous seed")
    with pytest.raises(ConfigError):
        build_seed(out, SeedFiles(write(tmp_path, "u", b"a: 1\n")), hostname="kasou")
    assert out.read_bytes() == b"the previous seed"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["seed.iso", "u"]


def test_a_folder_that_is_not_there_is_a_host_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="cannot write the cloud-init seed"):
        build_seed(
            tmp_path / "gone" / "seed.iso",
            SeedFiles(write(tmp_path, "u", USER_DATA)),
            hostname="kasou",
        )


@given(
    user_data=st.one_of(
        st.binary(max_size=3000),
        st.tuples(
            st.sampled_from(
                [
                    b"#cloud-config\n",
                    b"#cloud-config-archive\n",
                    b"#!/bin/sh\n",
                    b"#include\n",
                    b"MIME-Version: 1.0\nContent-Type: text/cloud-config\n\n",
                    b"MIME-Version: 1.0\nContent-Transfer-Encoding: base64\n\n",
                    b"",
                    b"a: ",
                ]
            ),
            st.one_of(st.binary(max_size=2000), st.text(max_size=2000).map(str.encode)),
        ).map(b"".join),
    )
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@needs_isoinfo
def test_any_user_data_is_refused_or_read_back_exactly(user_data: bytes) -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        try:
            image = seed_of(folder, user_data)
        except ConfigError as error:
            assert "\n" not in str(error)
            assert not (folder / "seed.iso").exists()
            return
        for tree in TREES:
            assert iso_file(image, "user-data", tree) == user_data


# -- --cloud-init -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "files"),
    [
        ("ud.yaml", SeedFiles(Path("ud.yaml"))),
        ("a,b.yaml", SeedFiles(Path("a,b.yaml"))),  # no '=': one path, commas and all
        ("user-data=u", SeedFiles(Path("u"))),
        ("meta-data=m,user-data=u", SeedFiles(Path("u"), Path("m"))),
        (
            "user-data=u,meta-data=m,network-config=n",
            SeedFiles(Path("u"), Path("m"), Path("n")),
        ),
        ("user-data=/x=y/u", SeedFiles(Path("/x=y/u"))),
    ],
)
def test_cloud_init_option_forms(text: str, files: SeedFiles) -> None:
    assert parse_cloud_init(text) == files


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "give a user-data file"),
        ("meta-data=m", "add user-data=PATH"),
        ("user-data=u,user-data=v", "user-data is given twice"),
        ("user-data=", "user-data= needs a path"),
        ("user-data=u,vendor-data=v", "'vendor-data=v' is not a seed file"),
        ("user-data=u,", "'' is not a seed file"),
        ("/a=b/ud.yaml", "a path with '=' in it: write user-data=PATH"),
    ],
)
def test_cloud_init_option_errors(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_cloud_init(text)


def kasou_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``kasou run`` with its own temporary folder, to see what it leaves there."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run(
        [KASOU, "run", "--memory", "64M", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    return result, scratch


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("plain.yaml", "add '#cloud-config' as its first line"),
        ("missing.yaml", "missing.yaml does not exist"),
        ("user-data=plain.yaml,color=blue", "'color=blue' is not a seed file"),
    ],
)
def test_kasou_run_refuses_bad_seed_input_in_one_line_leaving_nothing(
    tmp_path: Path, option: str, says: str
) -> None:
    write(tmp_path, "plain.yaml", b"runcmd: [ls]\n")
    kernel = write(tmp_path, "vmlinux", b"\x7fELF")
    sock = tmp_path / "vm.sock"
    option = option.replace("plain.yaml", str(tmp_path / "plain.yaml"))
    result, scratch = kasou_run(
        tmp_path, "--kernel", str(kernel), "--api-sock", str(sock), "--cloud-init", option
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("kasou: error: cloud-init: ")
    assert says in line
    assert list(scratch.iterdir()) == []  # no seed, no folder for it
    assert not sock.exists()


def test_kasou_run_removes_its_seed_when_the_vm_cannot_start(tmp_path: Path) -> None:
    kernel = write(tmp_path, "notes.txt", b"not a kernel\n" * 100)
    user = write(tmp_path, "user-data", USER_DATA)
    result, scratch = kasou_run(tmp_path, "--kernel", str(kernel), "--cloud-init", str(user))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("kasou: error: ") and "cloud-init" not in line
    assert list(scratch.iterdir()) == []


@needs_isoinfo
def test_the_seed_is_the_last_disk_read_only_with_serial_cidata(tmp_path: Path) -> None:
    # The step of ``kasou run`` that turns its options into the VM's configuration.
    from kasou.cli.fastrun import _config, parser

    kernel = write(tmp_path, "vmlinux", b"\x7fELF")
    disk = write(tmp_path, "data.raw", bytes(4096))
    user = write(tmp_path, "user-data", USER_DATA)
    options = vars(
        parser().parse_args(
            ["--kernel", str(kernel), "--cloud-init", str(user), "--disk", f"{disk},ro"]
        )
    )
    scratch: list[Path] = []
    try:
        config = _config(options, scratch)
        first, seed = config.disks
        assert first.path == disk
        assert (seed.read_only, seed.format, seed.serial) == (True, "raw", "cidata")
        assert seed.path.parent in scratch
        assert blkid(seed.path)["LABEL"] == "cidata"
        assert iso_file(seed.path, "user-data", "-J") == USER_DATA
        meta = yaml.safe_load(iso_file(seed.path, "meta-data", "-J"))
        assert meta["local-hostname"] == config.name
    finally:
        for folder in scratch:
            shutil.rmtree(folder)
