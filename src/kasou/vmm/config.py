"""``VmConfig``: everything one VM is made of, validated before anything is built.

A bad value raises ``ConfigError`` naming the field as the user wrote it and the fix. Checks
that need the host (its memory, KVM's vCPU limit) run in ``check_host``, so a config can be
parsed and validated on any machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from kasou.devices.ratelimit import RateLimit, check_rate, parse_rate, rate_words
from kasou.errors import ConfigError
from kasou.jail import JailConfig
from kasou.memory import format_size, host_memory_bytes, parse_size
from kasou.resources import ResourceLimits  # a type msgspec resolves in saved configs
from kasou.vmm.reclaim import ReclaimConfig, check_reclaim

__all__ = [
    "ConsoleConfig",
    "DebugExitConfig",
    "DiskConfig",
    "NetConfig",
    "VmConfig",
    "VirtioConsoleConfig",
    "VsockConfig",
    "parse_console",
    "parse_debug_exit",
    "parse_disk",
    "parse_net",
    "parse_virtio_console",
    "parse_vsock",
]

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"
MIN_MEMORY = 16 << 20
# Below 4 GiB the guest's RAM stops at the MMIO hole; the rest goes above 4 GiB
# (arch/x86_64/layout.py), so large guests are fine.
MAX_VCPUS_MPTABLE = 254  # APIC ids are 8 bits in the MP table; 255 is broadcast

ConsoleKind = Literal["stdio", "file", "sock", "none"]
OnReboot = Literal["exit", "restart"]
# sun_path holds 108 bytes with its NUL, and listen_unix binds under ".NAME.PID" first.
MAX_SOCKET_PATH = 100


class ConsoleConfig(NamedTuple):
    """Where COM1 goes: the terminal, a file, a Unix socket (``path``; every connected client
    gets the output, and what clients send is the input), or nowhere. ``log``: a file that
    gets every byte of output besides the socket (``sock`` only)."""

    kind: ConsoleKind = "stdio"
    path: Path | None = None
    log: Path | None = None


def parse_console(text: str) -> ConsoleConfig:
    """Parse ``stdio``, ``none``, ``file:PATH`` or ``sock:PATH[,log=FILE]``. A socket's folder
    must exist and its path fit a Unix socket address; whether something else is at the path
    is checked when kasou listens there (``event/unix.py``)."""
    if text in ("stdio", "none"):
        return ConsoleConfig(text)  # type: ignore[arg-type]
    if text.startswith("file:") and len(text) > len("file:"):
        return ConsoleConfig("file", Path(text[len("file:") :]))
    if text.startswith("sock:"):
        return _parse_console_socket(text, text[len("sock:") :])
    raise ConfigError(
        "console",
        f"{text!r} is not a console: use stdio, none or file:PATH, or sock:PATH[,log=FILE]",
    )


def _parse_console_socket(text: str, rest: str) -> ConsoleConfig:
    words, pairs = _options("console", rest, ("log",))
    if len(words) != 1 or not words[0]:
        raise ConfigError("console", f"{text!r}: give sock:PATH[,log=FILE], like sock:/tmp/c.sock")
    path = Path(words[0])
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            "console", f"{path}: too long for a Unix socket ({MAX_SOCKET_PATH} bytes at most)"
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError("console", f"{path}: the folder {folder} does not exist")
    log = pairs.get("log")
    if log is not None and not log:
        raise ConfigError("console", f"{text!r}: log= needs a file name")
    return ConsoleConfig("sock", path, Path(log) if log else None)


class DiskConfig(NamedTuple):
    """One virtio-blk disk: ``--disk PATH[,ro][,format=raw|qcow2][,serial=ID][,sector=N]
    [,bw=RATE][,iops=N][,bw-burst=BYTES][,iops-burst=N]`` (``devices/ratelimit.py``)."""

    path: Path
    read_only: bool = False
    format: str | None = None  # None: probed from the file
    serial: str | None = None
    sector_size: int = 512  # the logical block size the guest sees
    # Made by kasou for this run and deleted when it ends (the default guest's overlay, a
    # cloud-init seed): a snapshot keeps a copy of it, since the file will not outlive kasou.
    scratch: bool = False
    rate: RateLimit | None = None  # bandwidth and requests a second


class NetConfig(NamedTuple):
    """One virtio-net interface on a TAP: ``--net [tap=NAME][,mac=MAC]``, with rate limits
    ``rx-bw=``, ``rx-pps=``, ``tx-bw=``, ``tx-pps=`` and their ``-burst`` (rx: TAP to guest,
    tx: guest to TAP). Without a name the kernel picks one (tapN); a name that does not
    exist is created for the VM's lifetime."""

    tap: str | None = None
    mac: str | None = None
    rx_rate: RateLimit | None = None
    tx_rate: RateLimit | None = None


class VsockConfig(NamedTuple):
    """The virtio-vsock device: ``--vsock cid=N,uds=PATH`` (host side on Unix sockets)."""

    cid: int
    uds: Path


class VirtioConsoleConfig(NamedTuple):
    """virtio-console: port 0 (hvc0) writes where COM1 does; port 1, a named port, is
    served on the Unix socket ``socket`` when given: ``--virtio-console [sock=PATH]``."""

    socket: Path | None = None


def parse_virtio_console(text: str) -> VirtioConsoleConfig:
    """Parse ``[sock=PATH]``."""
    words, pairs = _options("virtio-console", text, ("sock",)) if text else ([], {})
    if any(words):
        raise ConfigError("virtio-console", f"{text!r}: use sock=PATH or nothing")
    return VirtioConsoleConfig(Path(pairs["sock"]) if "sock" in pairs else None)


class DebugExitConfig(NamedTuple):
    """The debug-exit port (``devices/legacy/debug_exit.py``): ``--debug-exit PORT[,size=N]``.
    A guest write there ends kasou with status ``(value << 1) | 1``."""

    port: int
    size: int = 4


def parse_debug_exit(text: str) -> DebugExitConfig:
    """Parse ``PORT[,size=1|2|4]``, the port in hex (``0xf4``) or decimal (``244``)."""
    words, pairs = _options("debug-exit", text, ("size",))
    if len(words) != 1:
        raise ConfigError("debug-exit", f"{text!r}: give PORT[,size=1|2|4], like 0xf4")
    port = _port_number(words[0])
    size = pairs.get("size", "4")
    if size not in ("1", "2", "4"):
        raise ConfigError("debug-exit", f"size={size}: use 1, 2 or 4")
    return DebugExitConfig(port, int(size))


def _port_number(text: str) -> int:
    try:
        port = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise ConfigError(
            "debug-exit", f"{text!r} is not a port: give a number, hex (0xf4) or decimal"
        ) from None
    return port


# Ports KVM's in-kernel PIC and PIT answer before an access could reach kasou's bus: the
# 8259s (0x20, 0xa0), the 8254 (0x40-0x43), port B (0x61) and the ELCRs (0x4d0).
_KVM_PORTS = (
    ("the PIC", 0x20, 2),
    ("the PIT", 0x40, 4),
    ("port B (0x61)", 0x61, 1),
    ("the PIC", 0xA0, 2),
    ("the ELCR", 0x4D0, 2),
)


def _check_debug_exit(debug_exit: DebugExitConfig) -> None:
    port, size = debug_exit
    if size not in (1, 2, 4):
        raise ConfigError("debug-exit", f"size={size}: use 1, 2 or 4")
    if not 0 <= port <= 0x10000 - size:
        raise ConfigError(
            "debug-exit", f"port {port:#x}: x86 I/O ports end at 0xffff; give a lower one"
        )
    for owner, base, length in _KVM_PORTS:
        if port < base + length and base < port + size:
            raise ConfigError(
                "debug-exit",
                f"port {port:#x} is taken by {owner} (in the kernel's KVM): choose another, "
                "like 0xf4",
            )


MAX_SERIAL = 20  # VIRTIO_BLK_ID_BYTES (virtio 1.2 §5.2.6)
MAX_DISKS = 16
MAX_NETS = 8
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_TAP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1, no separators


def _options(field: str, text: str, known: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Split ``a,b=c,...`` into bare words and ``key=value`` pairs, refusing unknown keys."""
    words: list[str] = []
    pairs: dict[str, str] = {}
    for part in text.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in known:
                raise ConfigError(field, f"unknown option {key!r}: use {', '.join(known)}")
            if key in pairs:
                raise ConfigError(field, f"{key} is given twice")
            pairs[key] = value
        else:
            words.append(part)
    return words, pairs


def parse_disk(text: str) -> DiskConfig:
    """Parse ``PATH[,ro][,format=raw|qcow2][,serial=ID][,sector=512|4096]``."""
    words, pairs = _options("disk", text, ("format", "serial", "sector", *rate_words()))
    if not words or not words[0]:
        raise ConfigError("disk", f"{text!r}: give a path first, like --disk root.img,ro")
    path, flags = words[0], words[1:]
    for flag in flags:
        if flag not in ("ro", "rw"):
            raise ConfigError("disk", f"unknown flag {flag!r}: use ro, format=, serial=, sector=")
    sector = pairs.get("sector", "512")
    if not sector.isdigit():
        raise ConfigError("disk", f"sector={sector}: give 512, 1024, 2048 or 4096")
    return DiskConfig(
        path=Path(path),
        read_only="ro" in flags,
        format=pairs.get("format"),
        serial=pairs.get("serial"),
        sector_size=int(sector),
        rate=parse_rate("disk", pairs),
    )


def parse_net(text: str) -> NetConfig:
    """Parse ``[tap=NAME][,mac=MAC]`` (an empty string: a new TAP, a generated MAC)."""
    rates = (*rate_words("rx-", "pps"), *rate_words("tx-", "pps"))
    words, pairs = _options("net", text, ("tap", "mac", *rates)) if text else ([], {})
    if any(words):
        raise ConfigError("net", f"{text!r}: use tap=NAME and mac=MAC, like --net tap=tap0")
    return NetConfig(
        tap=pairs.get("tap"),
        mac=pairs.get("mac"),
        rx_rate=parse_rate("net", pairs, "rx-", "pps"),
        tx_rate=parse_rate("net", pairs, "tx-", "pps"),
    )


def parse_vsock(text: str) -> VsockConfig:
    """Parse ``cid=N,uds=PATH``."""
    words, pairs = _options("vsock", text, ("cid", "uds"))
    if any(words) or "cid" not in pairs or "uds" not in pairs:
        raise ConfigError("vsock", f"{text!r}: give cid=N,uds=PATH, like cid=3,uds=/tmp/v.sock")
    if not pairs["cid"].isdigit():
        raise ConfigError("vsock", f"cid={pairs['cid']} is not a number")
    return VsockConfig(cid=int(pairs["cid"]), uds=Path(pairs["uds"]))


def _check_disks(disks: tuple[DiskConfig, ...]) -> None:
    if len(disks) > MAX_DISKS:
        raise ConfigError("disk", f"{len(disks)} disks: kasou attaches {MAX_DISKS} at most")
    seen: set[Path] = set()
    for disk in disks:
        _check_readable("disk", disk.path, block_ok=True)
        if not disk.read_only and not os.access(disk.path, os.W_OK):
            raise ConfigError("disk", f"{disk.path} is not writable: add ,ro or fix its mode")
        resolved = disk.path.resolve()
        if resolved in seen and not disk.read_only:
            raise ConfigError("disk", f"{disk.path} is given twice: a disk is attached once")
        seen.add(resolved)
        if disk.format not in (None, "raw", "qcow2"):
            raise ConfigError("disk", f"format={disk.format}: use raw or qcow2")
        if disk.serial is not None and (
            len(disk.serial.encode()) > MAX_SERIAL or not disk.serial.isprintable()
        ):
            raise ConfigError(
                "disk", f"serial={disk.serial!r}: at most {MAX_SERIAL} printable bytes"
            )
        if disk.sector_size not in (512, 1024, 2048, 4096):
            raise ConfigError("disk", f"sector={disk.sector_size}: use 512, 1024, 2048 or 4096")
        if disk.rate is not None:
            check_rate("disk", disk.rate)


def _check_nets(nets: tuple[NetConfig, ...]) -> None:
    if len(nets) > MAX_NETS:
        raise ConfigError("net", f"{len(nets)} interfaces: kasou attaches {MAX_NETS} at most")
    for net in nets:
        for prefix, rate in (("rx-", net.rx_rate), ("tx-", net.tx_rate)):
            if rate is not None:
                check_rate("net", rate, prefix, "pps")
        if net.tap is not None and not _TAP_NAME.match(net.tap):
            raise ConfigError("net", f"tap={net.tap!r} is not an interface name (1-15 chars)")
        if net.mac is not None:
            if not _MAC.match(net.mac):
                raise ConfigError("net", f"mac={net.mac}: write it like 52:54:00:12:34:56")
            if int(net.mac[:2], 16) & 1:
                raise ConfigError("net", f"mac={net.mac} is a multicast address: use a unicast one")
    taps = [net.tap for net in nets if net.tap is not None]
    if len(set(taps)) != len(taps):
        raise ConfigError("net", "a TAP is given twice: each interface needs its own")


def _check_vsock(vsock: VsockConfig) -> None:
    # CIDs 0-2 are the hypervisor, local and host (virtio 1.2 §5.10.4); the field is 32 bits
    # in Linux's sockaddr_vm, and U32_MAX is VMADDR_CID_ANY.
    if not 3 <= vsock.cid < 0xFFFFFFFF:
        raise ConfigError("vsock", f"cid={vsock.cid}: give 3 or more (0-2 are reserved)")
    folder = vsock.uds.parent if str(vsock.uds.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError("vsock", f"uds={vsock.uds}: the folder {folder} does not exist")
    if len(str(vsock.uds).encode()) > 100:
        raise ConfigError("vsock", f"uds={vsock.uds}: too long for a Unix socket path")


@dataclass(frozen=True)
class VmConfig:
    """One VM. Sizes are bytes; ``parse_size`` turns "512M" into them."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    vcpus: int = 1
    memory: int = 512 << 20
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    api_sock: Path | None = None
    on_reboot: OnReboot = "exit"
    memory_backing: Literal["anonymous", "memfd"] = "anonymous"
    hugepages: bool = False
    name: str = "kasou"
    disks: tuple[DiskConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    vsock: VsockConfig | None = None
    rng: bool = False
    balloon: bool = False
    virtio_console: VirtioConsoleConfig | None = None
    acpi: bool = True  # ACPI tables (RSDP at 0xE0000); False leaves the MP table alone
    # Announce the virtio-mmio devices with ``virtio_mmio.device=`` words on the kernel
    # command line too, for kernels without ACPI (always, when ``acpi`` is off). A kernel
    # with ACPI and VIRTIO_MMIO_CMDLINE_DEVICES would otherwise probe every device twice,
    # the second probe failing with an error on the console: kasou turns the words off for
    # the kernels it knows use ACPI (the default guest's, a disk image's).
    virtio_cmdline: bool = True
    # --initrd given more than once: the files after the first (``initrd``). A Multiboot
    # kernel gets them all, in order, as modules; a Linux kernel takes one initrd.
    extra_initrds: tuple[Path, ...] = ()
    debug_exit: DebugExitConfig | None = None
    # Built from a snapshot or a migration stream: guest memory already holds the kernel,
    # so the kernel and initrds are neither loaded nor required to exist, and the devices
    # are checked (``check_devices``) once the restore has put this host's files in.
    restoring: bool = False
    # Memory reclaim under host pressure (``--reclaim``, vmm/reclaim.py): needs the balloon.
    reclaim: ReclaimConfig | None = None
    # Run the VMM jailed (``--jail``, kasou/jail/): namespaces, pivot_root, no privileges.
    jail: JailConfig | None = None
    # CPU, memory and task limits and vCPU pinning (``--cpus-quota`` etc., kasou/resources/).
    limits: ResourceLimits | None = None
    # seccomp-bpf allow-lists per thread role (``--no-seccomp`` turns them off,
    # kasou/jail/seccomp.py); applied by ``vmm.runner.run`` on the process's main thread.
    seccomp: bool = True  # see kasou.jail.seccomp

    def __post_init__(self) -> None:
        if not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise ConfigError("vcpus", f"{self.vcpus} is not a vCPU count: give 1 or more")
        if self.vcpus > MAX_VCPUS_MPTABLE:
            raise ConfigError(
                "vcpus", f"{self.vcpus} vCPUs: kasou's MP table holds {MAX_VCPUS_MPTABLE} at most"
            )
        if self.memory < MIN_MEMORY:
            raise ConfigError(
                "memory",
                f"{format_size(self.memory)} is too little: give at least "
                f"{format_size(MIN_MEMORY)}",
            )
        if self.memory % 4096:
            raise ConfigError("memory", f"{self.memory} is not a whole number of 4 KiB pages")
        if self.on_reboot not in ("exit", "restart"):
            raise ConfigError("on-reboot", f"{self.on_reboot!r}: use exit or restart")
        if self.memory_backing not in ("anonymous", "memfd"):
            raise ConfigError("memory-backing", f"{self.memory_backing!r}: use anonymous or memfd")
        if "\0" in self.cmdline:
            raise ConfigError("cmdline", "the command line contains a NUL byte")
        if self.extra_initrds and self.initrd is None:
            raise ConfigError("initrd", "extra initrds without a first one: set initrd too")
        if not self.restoring:
            _check_readable("kernel", self.kernel)
            for path in self.initrds:
                _check_readable("initrd", path)
            self.check_devices()
        if self.debug_exit is not None:
            _check_debug_exit(self.debug_exit)
        if self.reclaim is not None:
            if not self.balloon:
                raise ConfigError("reclaim", "reclaim inflates the balloon: add --balloon")
            check_reclaim(self.reclaim, self.memory)
        if self.limits is not None:
            from kasou.resources import check_limits

            check_limits(self.limits, vcpus=self.vcpus, memory=self.memory)

    @classmethod
    def from_options(
        cls,
        *,
        kernel: str | Path,
        memory: str | int = "512M",
        console: str = "stdio",
        initrd: str | Path | None = None,
        **others: object,
    ) -> VmConfig:
        """Build a config from strings as a user types them (CLI, API)."""
        try:
            size = parse_size(memory)
        except ValueError as error:
            raise ConfigError("memory", str(error)) from None
        return cls(
            kernel=Path(kernel),
            initrd=Path(initrd) if initrd else None,
            memory=size,
            console=parse_console(console),
            **others,  # type: ignore[arg-type]
        )

    def check_devices(self) -> None:
        """The disks, interfaces and vsock device: their values and their files. Run for
        every new config; a restored one (``restoring``) runs it once its disks and sockets
        are those of this host (``vmm/snapshot.py``, ``vmm/migration.py``)."""
        _check_disks(self.disks)
        _check_nets(self.nets)
        if self.vsock is not None:
            _check_vsock(self.vsock)

    @property
    def initrds(self) -> tuple[Path, ...]:
        """Every ``--initrd``, in the order given."""
        return ((self.initrd,) if self.initrd is not None else ()) + self.extra_initrds

    def check_host(self, max_vcpus: int) -> None:
        """Checks that need this host: its memory and KVM's vCPU limit."""
        if self.vcpus > max_vcpus:
            raise ConfigError(
                "vcpus", f"{self.vcpus} vCPUs, but this host's KVM allows {max_vcpus}"
            )
        host = host_memory_bytes()
        if self.memory > host:
            raise ConfigError(
                "memory",
                f"{format_size(self.memory)} is more than this host has "
                f"({host >> 20} MiB): give less",
            )


def _check_readable(name: str, path: Path, block_ok: bool = False) -> None:
    try:
        path.stat()
    except PermissionError:
        raise ConfigError(
            name, f"{path} is not reachable: check the permissions of its folders"
        ) from None
    except OSError:
        pass  # reported below, in words
    if not path.exists():
        raise ConfigError(name, f"{path} does not exist: give the path of a {name} image")
    if not path.is_file() and not (block_ok and path.is_block_device()):
        raise ConfigError(name, f"{path} is not a file: give the path of a {name} image")
    if not os.access(path, os.R_OK):
        raise ConfigError(name, f"{path} is not readable: check its permissions")
