"""The options of ``kasou run``, once, for both of its parsers."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["RUN_EXAMPLE", "RUN_OPTIONS", "RunOption"]


class RunOption(NamedTuple):
    name: str  # the long flag without dashes
    help: str
    default: str | int | None = None
    kind: type = str
    choices: tuple[str, ...] = ()
    repeat: bool = False  # may be given several times: a list, None when never given
    flag: bool = False  # takes no value: True when given


RUN_OPTIONS = (
    RunOption(
        "kernel",
        "Linux kernel: a vmlinux (ELF) or a bzImage; or a Multiboot kernel. Default: the "
        "default guest.",
    ),
    RunOption(
        "initrd",
        "Initial ramdisk (cpio, optionally compressed). For a Multiboot kernel: a module, "
        "repeatable, its string the path as given.",
        repeat=True,
    ),
    RunOption(
        "image",
        "Boot a disk image (raw or qcow2, e.g. a Debian cloud image): its kernel, initrd and "
        "root file system, the image as /dev/vda behind a throw-away overlay.",
    ),
    RunOption(
        "image-writable",
        "With --image: the guest writes to the image itself, not to an overlay.",
        False,
        bool,
        flag=True,
    ),
    RunOption("cmdline", "Kernel command line. Default: console=ttyS0 reboot=k panic=-1"),
    RunOption("vcpus", "Number of virtual CPUs.", 1, int),
    RunOption("memory", "Guest RAM, like 512M or 2G.", "512M"),
    RunOption(
        "console",
        "Where COM1 goes: stdio, file:PATH, none, or sock:PATH[,log=FILE] (a Unix socket: "
        "each client gets the output from when it connects and its bytes are the input; "
        "log= keeps every byte in FILE).",
        "stdio",
    ),
    RunOption("api-sock", "Serve the control socket (status, pause, resume, stop) here."),
    RunOption(
        "on-reboot",
        "What a guest reboot does: exit kasou, or restart the guest.",
        "exit",
        choices=("exit", "restart"),
    ),
    RunOption(
        "disk",
        "A virtio-blk disk: PATH[,ro][,format=raw|qcow2][,serial=ID][,sector=512|4096]. "
        "Repeatable; the first is /dev/vda.",
        repeat=True,
    ),
    RunOption(
        "net",
        "A virtio-net interface on a TAP: [tap=NAME][,mac=MAC] (an empty value: a new TAP). "
        "Repeatable.",
        repeat=True,
    ),
    RunOption(
        "vsock",
        "A virtio-vsock device: cid=N,uds=PATH (host side on Unix sockets, as Firecracker).",
    ),
    RunOption("rng", "A virtio-rng device (the host's getrandom).", False, bool, flag=True),
    RunOption(
        "no-acpi",
        "No ACPI tables (CPUs from the MP table, no power button for `kasou shutdown`).",
        False,
        bool,
        flag=True,
    ),
    RunOption(
        "no-seccomp",
        "No seccomp allow-lists on kasou's threads (on by default).",
        False,
        bool,
        flag=True,
    ),
    RunOption(
        "balloon",
        "A virtio-balloon device (target set through the control socket).",
        False,
        bool,
        flag=True,
    ),
    RunOption(
        "reclaim",
        "With --balloon: inflate it under host memory pressure, "
        "max=SIZE[,min-free=SIZE|PERCENT][,step=SIZE][,interval=SECONDS] (see kasou reclaim).",
    ),
    RunOption("virtio-console", "A virtio-console (hvc0, plus a second port on sock=PATH)."),
    RunOption(
        "debug-exit",
        "A debug-exit port, PORT[,size=1|2|4] (0xf4 or 244): a guest write of V there ends "
        "kasou with status (V << 1) | 1, as QEMU's isa-debug-exit.",
    ),
    RunOption(
        "cloud-init",
        "A cloud-init NoCloud seed, attached read-only after the other disks: USER-DATA or "
        "user-data=PATH[,meta-data=PATH][,network-config=PATH].",
    ),
    RunOption(
        "restore",
        "Start from a snapshot folder (kasou snapshot create) instead of booting; --disk, "
        "--net, --vsock, --api-sock and --console replace what it saved.",
    ),
    RunOption(
        "clone",
        "With --restore: a clone of the snapshot (its own overlay on every writable disk, new "
        "MACs, and the guest told it was cloned through its VM generation ID).",
        False,
        bool,
        flag=True,
    ),
    RunOption(
        "incoming",
        "Wait for a VM sent by `kasou migrate` on tcp://ADDR:PORT or unix:PATH, then run it.",
    ),
    RunOption(
        "cpus-quota",
        "CPU time kasou may use, in host CPUs (0.5: half of one). Changeable: kasou limits.",
    ),
    RunOption("cpu-weight", "kasou's share of contended CPUs, 1-10000 (default 100)."),
    RunOption("cpu-pin", "Pin vCPU threads to host CPUs: VCPU=CPU,... like 0=2,1=3."),
    RunOption(
        "memory-limit",
        "Memory kasou may use, guest RAM included, like 1G (at least RAM + 16M; give 64M "
        "more to be safe).",
    ),
    RunOption("pids-limit", "Tasks (threads) kasou may have."),
    RunOption(
        "jail",
        "Run the VMM jailed (root only): its own namespaces and root folder, an unprivileged "
        "uid without capabilities.",
        False,
        bool,
        flag=True,
    ),
    RunOption("jail-dir", "With --jail: where jail folders are made. Default: /run/kasou/jail"),
    RunOption("jail-uid", "With --jail: the VMM's uid (not 0). Default: 64990", kind=int),
    RunOption("jail-gid", "With --jail: the VMM's gid (not 0). Default: 64990", kind=int),
)

RUN_EXAMPLE = (
    "kasou run --kernel vmlinux --initrd initrd.cpio.gz --vcpus 2 --memory 1G "
    "--api-sock /tmp/vm.sock"
)
