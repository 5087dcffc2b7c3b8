"""kasou's kernel config fragment and the merge/check the builder applies to it."""

from __future__ import annotations

from kasou.image._kernel import FRAGMENT, check_config, merge_fragment, parse_config

# What the default guest needs of its kernel (shared/ENVIRONMENT.md "A guest kernel", and the
# devices kasou gives it). The fragment may ask for more; it must ask for all of these.
REQUIRED_ON = [
    "64BIT",
    "PRINTK",
    "TTY",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD",
    "RD_GZIP",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "PROC_FS",
    "SYSFS",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "TMPFS",
    "VIRTIO",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "VIRTIO_BLK",
    "VIRTIO_NET",
    "VIRTIO_CONSOLE",
    "VIRTIO_BALLOON",
    "HW_RANDOM_VIRTIO",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "NET",
    "INET",
    "UNIX",
    "PACKET",
    "EXT4_FS",
    "HYPERVISOR_GUEST",
    "PARAVIRT",
    "KVM_GUEST",
    "SMP",
    "FUTEX",
    "EPOLL",
    "X86_MPPARSE",
    "PVH",
    "MULTIUSER",
    "SHMEM",
    "FILE_LOCKING",
    "POSIX_TIMERS",
    "SIGNALFD",
    "TIMERFD",
    "EVENTFD",
    "PROC_SYSCTL",
    "UNIX98_PTYS",
    "RTC_CLASS",
    "RTC_DRV_CMOS",
    "X86_IOPL_IOPERM",
    # ACPI: kasou's tables, the PM timer, the power button of `kasou shutdown`; Linux 6.1
    # loads no ACPI tables without PCI.
    "ACPI",
    "X86_PM_TIMER",
    "ACPI_TINY_POWER_BUTTON",
    "PCI",
]
REQUIRED_OFF = ["MODULES"]


def test_fragment_asks_for_everything_the_guest_needs() -> None:
    fragment = parse_config(FRAGMENT.read_text())
    assert {f"CONFIG_{name}": "y" for name in REQUIRED_ON}.items() <= fragment.items()
    assert {f"CONFIG_{name}": "n" for name in REQUIRED_OFF}.items() <= fragment.items()


def test_the_power_button_asks_busybox_init_to_power_off() -> None:
    # The tiny driver signals init (PID 1); busybox init powers off on SIGUSR2 (12 on x86),
    # runs its ::shutdown entries first, and ignores systemd's default SIGRTMIN+4.
    fragment = parse_config(FRAGMENT.read_text())
    assert fragment["CONFIG_ACPI_TINY_POWER_BUTTON_SIGNAL"] == "12"
    assert fragment["CONFIG_ACPI_BUTTON"] == "n"  # the tiny driver needs it off


def test_fragment_gives_the_agent_a_second_uart() -> None:
    fragment = parse_config(FRAGMENT.read_text())
    assert int(fragment["CONFIG_SERIAL_8250_NR_UARTS"]) >= 2
    assert int(fragment["CONFIG_SERIAL_8250_RUNTIME_UARTS"]) >= 2


def test_parse_reads_set_and_unset_lines_and_skips_comments() -> None:
    text = '# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="rtc0"\n\nCONFIG_D=4\n'
    assert parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_C": '"rtc0"',
        "CONFIG_D": "4",
    }


def test_merge_replaces_the_configs_values_with_the_fragments() -> None:
    config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_KEEP=m\n"
    merged = merge_fragment(config, {"CONFIG_A": "n", "CONFIG_B": "y", "CONFIG_NEW": "3"})
    assert parse_config(merged) == {
        "CONFIG_A": "n",
        "CONFIG_B": "y",
        "CONFIG_C": "y",
        "CONFIG_KEEP": "m",
        "CONFIG_NEW": "3",
    }
    # Each option appears once: Kconfig would warn about (and pick one of) duplicates.
    names = [line.split("=")[0].removeprefix("# ").split()[0] for line in merged.splitlines()]
    assert len(names) == len(set(names))


def test_check_names_every_option_olddefconfig_dropped() -> None:
    final = parse_config("CONFIG_A=y\nCONFIG_NR=2\n# CONFIG_OFF is not set\n")
    fragment = {
        "CONFIG_A": "y",
        "CONFIG_B": "y",
        "CONFIG_NR": "4",
        "CONFIG_OFF": "n",
        "CONFIG_ABSENT_OFF": "n",
    }
    assert check_config(final, fragment) == [
        "CONFIG_B: asked y, got n",
        "CONFIG_NR: asked 4, got 2",
    ]
