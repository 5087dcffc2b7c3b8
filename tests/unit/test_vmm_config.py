"""VmConfig (kasou.vmm.config): a bad option is refused before anything is built, with the
option's name and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kasou.errors import ConfigError
from kasou.memory import host_memory_bytes
from kasou.vmm.config import ConsoleConfig, VmConfig, parse_console

MIB = 1 << 20


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF not really a kernel; the config only checks it can be read")
    return path


def test_defaults_make_a_valid_config(kernel: Path) -> None:
    config = VmConfig(kernel=kernel)
    assert config.vcpus == 1
    assert config.memory == 512 * MIB
    assert config.console == ConsoleConfig("stdio")
    assert config.on_reboot == "exit"
    assert config.initrd is None
    assert "console=ttyS0" in config.cmdline


@pytest.mark.parametrize(
    ("options", "field", "fix"),
    [
        ({"vcpus": 0}, "vcpus", "give 1 or more"),
        ({"vcpus": -3}, "vcpus", "give 1 or more"),
        ({"vcpus": 2.5}, "vcpus", "give 1 or more"),
        ({"vcpus": 255}, "vcpus", "254 at most"),
        ({"memory": 8 * MIB}, "memory", "at least 16M"),
        ({"memory": 0}, "memory", "at least 16M"),
        ({"memory": 64 * MIB + 100}, "memory", "4 KiB pages"),
        ({"on_reboot": "reboot"}, "on-reboot", "use exit or restart"),
        ({"memory_backing": "hugetlbfs"}, "memory-backing", "use anonymous or memfd"),
        ({"cmdline": "console=ttyS0\0init=/bin/sh"}, "cmdline", "NUL"),
    ],
)
def test_bad_values_name_the_option_and_the_fix(
    kernel: Path, options: dict[str, Any], field: str, fix: str
) -> None:
    with pytest.raises(ConfigError, match=fix) as caught:
        VmConfig(kernel=kernel, **options)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_the_limits_themselves_are_accepted(kernel: Path) -> None:
    assert VmConfig(kernel=kernel, vcpus=254, memory=16 * MIB).vcpus == 254


def test_a_missing_kernel_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vmlinux"
    with pytest.raises(ConfigError, match="does not exist: give the path of a kernel") as caught:
        VmConfig(kernel=missing)
    assert caught.value.field == "kernel"
    assert str(missing) in str(caught.value)


def test_a_directory_as_kernel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file: give the path of a kernel") as caught:
        VmConfig(kernel=tmp_path)
    assert caught.value.field == "kernel"


def test_the_initrd_is_checked_like_the_kernel(kernel: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        VmConfig(kernel=kernel, initrd=tmp_path / "initrd.cpio")
    assert caught.value.field == "initrd"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_kernel_is_refused(kernel: Path) -> None:
    kernel.chmod(0)
    with pytest.raises(ConfigError, match="not readable: check its permissions") as caught:
        VmConfig(kernel=kernel)
    assert caught.value.field == "kernel"


@pytest.mark.parametrize(
    ("text", "console"),
    [
        ("stdio", ConsoleConfig("stdio")),
        ("none", ConsoleConfig("none")),
        ("file:/tmp/guest.log", ConsoleConfig("file", Path("/tmp/guest.log"))),
        ("file:relative/log", ConsoleConfig("file", Path("relative/log"))),
    ],
)
def test_parse_console(text: str, console: ConsoleConfig) -> None:
    assert parse_console(text) == console


@pytest.mark.parametrize("text", ["", "file:", "file", "tty", "STDIO", "pty:/dev/pts/1"])
def test_parse_console_refuses_other_forms(text: str) -> None:
    with pytest.raises(ConfigError, match="use stdio, none or file:PATH") as caught:
        parse_console(text)
    assert caught.value.field == "console"


def test_from_options_reads_values_as_typed(kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(b"070701")
    config = VmConfig.from_options(
        kernel=str(kernel),
        memory="512M",
        console=f"file:{tmp_path / 'log'}",
        initrd=str(initrd),
        vcpus=2,
        on_reboot="restart",
    )
    assert config.kernel == kernel
    assert config.initrd == initrd
    assert config.memory == 512 * MIB
    assert config.console == ConsoleConfig("file", tmp_path / "log")
    assert (config.vcpus, config.on_reboot) == (2, "restart")


def test_from_options_without_initrd(kernel: Path) -> None:
    config = VmConfig.from_options(kernel=kernel, memory="1G", initrd="")
    assert config.initrd is None
    assert config.memory == 1 << 30


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"memory": "lots"}, "memory"),
        ({"memory": "8M"}, "memory"),
        ({"console": "serial"}, "console"),
        ({"vcpus": 0}, "vcpus"),
    ],
)
def test_from_options_refuses_with_the_option_name(
    kernel: Path, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        VmConfig.from_options(kernel=kernel, **options)
    assert caught.value.field == field


def test_check_host_refuses_more_vcpus_than_kvm_allows(kernel: Path) -> None:
    config = VmConfig(kernel=kernel, vcpus=8)
    config.check_host(max_vcpus=8)
    with pytest.raises(ConfigError, match="8 vCPUs, but this host's KVM allows 4") as caught:
        config.check_host(max_vcpus=4)
    assert caught.value.field == "vcpus"


def test_check_host_refuses_more_memory_than_the_host_has(kernel: Path) -> None:
    too_much = (host_memory_bytes() // 4096 + 1) * 4096
    config = VmConfig(kernel=kernel, memory=too_much)  # valid anywhere ...
    with pytest.raises(ConfigError, match=r"more than this host has .* give less") as caught:
        config.check_host(max_vcpus=254)  # ... but not here
    assert caught.value.field == "memory"
