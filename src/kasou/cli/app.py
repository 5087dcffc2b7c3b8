"""The typer app behind ``kasou``: every command but the fast path of ``kasou run``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kasou.cli import backups, vms
from kasou.cli.disk import disk_app
from kasou.cli.options import RUN_EXAMPLE
from kasou.cli.sandbox import sandbox_app

__all__ = ["app"]

app = typer.Typer(
    name="kasou",
    help="kasou (仮想): a virtual machine monitor in Python on Linux KVM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(error: Exception) -> None:
    typer.echo(f"kasou: error: {error}", err=True)
    raise typer.Exit(2)


@app.command(epilog=f"Example: {RUN_EXAMPLE}")
def run(
    kernel: Annotated[
        Path | None,
        typer.Option(
            help="Linux kernel: a vmlinux (ELF) or a bzImage; or a Multiboot kernel. Default: "
            "the default guest."
        ),
    ] = None,
    initrd: Annotated[
        list[str] | None,
        typer.Option(
            help="Initial ramdisk (cpio, optionally compressed). For a Multiboot kernel: a "
            "module, repeatable, its string the path as given."
        ),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            help="Boot a disk image (raw or qcow2, e.g. a Debian cloud image): its kernel, "
            "initrd and root file system, the image as /dev/vda behind a throw-away overlay."
        ),
    ] = None,
    image_writable: Annotated[
        bool,
        typer.Option(
            "--image-writable",
            help="With --image: the guest writes to the image itself, not to an overlay.",
        ),
    ] = False,
    cmdline: Annotated[
        str | None,
        typer.Option(help="Kernel command line. Default: console=ttyS0 reboot=k panic=-1"),
    ] = None,
    vcpus: Annotated[int, typer.Option(help="Number of virtual CPUs.")] = 1,
    memory: Annotated[str, typer.Option(help="Guest RAM, like 512M or 2G.")] = "512M",
    console: Annotated[
        str,
        typer.Option(
            help=(
                "Where COM1 goes: stdio, file:PATH, none, or sock:PATH[,log=FILE] (a Unix socket: "
                "each client gets the output from when it connects and its bytes are the input; "
                "log= keeps every byte in FILE)."
            )
        ),
    ] = "stdio",
    api_sock: Annotated[
        Path | None,
        typer.Option(help="Serve the control socket (status, pause, resume, stop) here."),
    ] = None,
    on_reboot: Annotated[
        str, typer.Option(help="What a guest reboot does: exit kasou, or restart the guest.")
    ] = "exit",
    disk: Annotated[
        list[str] | None,
        typer.Option(
            help="A virtio-blk disk: PATH[,ro][,format=raw|qcow2][,serial=ID][,sector=512|4096]. "
            "Repeatable; the first is /dev/vda."
        ),
    ] = None,
    net: Annotated[
        list[str] | None,
        typer.Option(
            help="A virtio-net interface on a TAP: [tap=NAME][,mac=MAC] (an empty value: a new "
            "TAP). Repeatable."
        ),
    ] = None,
    vsock: Annotated[
        str | None,
        typer.Option(
            help="A virtio-vsock device: cid=N,uds=PATH (host side on Unix sockets, as "
            "Firecracker)."
        ),
    ] = None,
    rng: Annotated[
        bool, typer.Option("--rng", help="A virtio-rng device (the host's getrandom).")
    ] = False,
    no_acpi: Annotated[
        bool,
        typer.Option(
            "--no-acpi",
            help="No ACPI tables (CPUs from the MP table, no power button for `kasou shutdown`).",
        ),
    ] = False,
    no_seccomp: Annotated[
        bool,
        typer.Option(
            "--no-seccomp", help="No seccomp allow-lists on kasou's threads (on by default)."
        ),
    ] = False,
    balloon: Annotated[
        bool,
        typer.Option(
            "--balloon", help="A virtio-balloon device (target set through the control socket)."
        ),
    ] = False,
    reclaim: Annotated[
        str | None,
        typer.Option(
            help="With --balloon: inflate it under host memory pressure, "
            "max=SIZE[,min-free=SIZE|PERCENT][,step=SIZE][,interval=SECONDS] (see kasou reclaim)."
        ),
    ] = None,
    virtio_console: Annotated[
        str | None,
        typer.Option(help="A virtio-console (hvc0, plus a second port on sock=PATH)."),
    ] = None,
    debug_exit: Annotated[
        str | None,
        typer.Option(
            help="A debug-exit port, PORT[,size=1|2|4] (0xf4 or 244): a guest write of V there "
            "ends kasou with status (V << 1) | 1, as QEMU's isa-debug-exit."
        ),
    ] = None,
    cloud_init: Annotated[
        str | None,
        typer.Option(
            help="A cloud-init NoCloud seed, attached read-only after the other disks: "
            "USER-DATA or user-data=PATH[,meta-data=PATH][,network-config=PATH]."
        ),
    ] = None,
    restore: Annotated[
        Path | None,
        typer.Option(
            help="Start from a snapshot folder (kasou snapshot create) instead of booting; "
            "--disk, --net, --vsock, --api-sock and --console replace what it saved."
        ),
    ] = None,
    clone: Annotated[
        bool,
        typer.Option(
            "--clone",
            help="With --restore: a clone of the snapshot (its own overlay on every writable "
            "disk, new MACs, and the guest told it was cloned through its VM generation ID).",
        ),
    ] = False,
    incoming: Annotated[
        str | None,
        typer.Option(
            help="Wait for a VM sent by `kasou migrate` on tcp://ADDR:PORT or unix:PATH, then "
            "run it."
        ),
    ] = None,
    cpus_quota: Annotated[
        str | None,
        typer.Option(
            help="CPU time kasou may use, in host CPUs (0.5: half of one). Changeable: kasou "
            "limits."
        ),
    ] = None,
    cpu_weight: Annotated[
        str | None,
        typer.Option(help="kasou's share of contended CPUs, 1-10000 (default 100)."),
    ] = None,
    cpu_pin: Annotated[
        str | None,
        typer.Option(help="Pin vCPU threads to host CPUs: VCPU=CPU,... like 0=2,1=3."),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            help="Memory kasou may use, guest RAM included, like 1G (at least RAM + 16M; give "
            "64M more to be safe)."
        ),
    ] = None,
    pids_limit: Annotated[str | None, typer.Option(help="Tasks (threads) kasou may have.")] = None,
    jail: Annotated[
        bool,
        typer.Option(
            "--jail",
            help="Run the VMM jailed (root only): its own namespaces and root folder, an "
            "unprivileged uid without capabilities.",
        ),
    ] = False,
    jail_dir: Annotated[
        str | None,
        typer.Option(help="With --jail: where jail folders are made. Default: /run/kasou/jail"),
    ] = None,
    jail_uid: Annotated[
        int | None, typer.Option(help="With --jail: the VMM's uid (not 0). Default: 64990")
    ] = None,
    jail_gid: Annotated[
        int | None, typer.Option(help="With --jail: the VMM's gid (not 0). Default: 64990")
    ] = None,
) -> None:
    """Boot a guest and attach its serial console (Ctrl-A X quits).

    Without --kernel, boots kasou's default guest (built on first use) with a shell on the
    console."""
    from kasou.cli.fastrun import run_vm

    status = run_vm(
        {
            "kernel": kernel,
            "initrd": initrd,
            "image": image,
            "image_writable": image_writable,
            "cmdline": cmdline,
            "vcpus": vcpus,
            "memory": memory,
            "console": console,
            "api_sock": api_sock,
            "on_reboot": on_reboot,
            "disk": disk,
            "net": net,
            "vsock": vsock,
            "rng": rng,
            "no_acpi": no_acpi,
            "no_seccomp": no_seccomp,
            "balloon": balloon,
            "reclaim": reclaim,
            "virtio_console": virtio_console,
            "cloud_init": cloud_init,
            "debug_exit": debug_exit,
            "restore": restore,
            "clone": clone,
            "incoming": incoming,
            "cpus_quota": cpus_quota,
            "cpu_weight": cpu_weight,
            "cpu_pin": cpu_pin,
            "memory_limit": memory_limit,
            "pids_limit": pids_limit,
            "jail": jail,
            "jail_dir": jail_dir,
            "jail_uid": jail_uid,
            "jail_gid": jail_gid,
        }
    )
    raise typer.Exit(status)


@app.command(epilog="Example: kasou host")
def host() -> None:
    """Show the KVM backend, the capabilities kasou uses and what cannot run here."""
    from rich.console import Console
    from rich.table import Table

    from kasou.kvm.host import REQUIRED, probe_host

    info = probe_host()
    out = Console()
    out.print(f"[bold]KVM backend:[/bold] {info.backend.value} ({info.device})")
    if info.problem:
        out.print(f"[red]{info.problem}[/red]")
        raise typer.Exit(1)
    out.print(f"API version {info.api_version}, at most {info.max_vcpus} vCPUs per VM")
    table = Table("capability", "value", "kasou needs it")
    for name, value in info.capabilities.items():
        needed = "yes" if name in REQUIRED else "optional"
        style = "red" if name in REQUIRED and value <= 0 else ""
        table.add_row(name, str(value), needed, style=style)
    out.print(table)
    if info.missing:
        out.print(f"[red]missing: {', '.join(info.missing)}[/red]")
    if info.limits:
        out.print("[yellow]On this backend:[/yellow]")
        for limit in info.limits:
            out.print(f"  - {limit}")
    if info.backend.boots_linux:
        out.print("Linux guests boot directly here.")


def _request(sock: Path, name: str, **arguments: object) -> None:
    from kasou.client import ControlClient
    from kasou.errors import KasouError

    try:
        with ControlClient(sock) as client:
            result = client.request(name, **arguments)
    except KasouError as error:
        _fail(error)
    typer.echo(json.dumps(result, indent=2))


SockOption = Annotated[
    Path, typer.Option("--sock", help="The VM's control socket (--api-sock of kasou run).")
]
# Commands that drive either one `kasou run` (--sock) or kasoud's VMs (NAME...).
EitherSockOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--sock", help="A `kasou run`'s control socket (its --api-sock), instead of NAME."
    ),
]
NamesOption = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Argument(help="kasoud's VMs, instead of --sock.", show_default=False),
]


@app.command(epilog="Examples: kasou status --sock /tmp/vm.sock; kasou status web")
def status(
    names: NamesOption = None, sock: EitherSockOption = None, host: vms.HostOption = None
) -> None:
    """Show a running VM's state (what its process reports)."""
    if vms.require_one(sock, names, "status"):
        _request(sock, "status")  # type: ignore[arg-type]
    else:
        vms.print_status(names or [], host)


@app.command(epilog="Examples: kasou pause --sock /tmp/vm.sock; kasou pause web")
def pause(
    names: NamesOption = None, sock: EitherSockOption = None, host: vms.HostOption = None
) -> None:
    """Pause a running VM's vCPUs."""
    if vms.require_one(sock, names, "pause"):
        _request(sock, "pause")  # type: ignore[arg-type]
    else:
        vms.act("pause", names or [], host)


@app.command(epilog="Examples: kasou resume --sock /tmp/vm.sock; kasou resume web")
def resume(
    names: NamesOption = None, sock: EitherSockOption = None, host: vms.HostOption = None
) -> None:
    """Resume a paused VM."""
    if vms.require_one(sock, names, "resume"):
        _request(sock, "resume")  # type: ignore[arg-type]
    else:
        vms.act("resume", names or [], host)


@app.command(epilog="Example: kasou devices --sock /tmp/vm.sock")
def devices(sock: SockOption) -> None:
    """List a VM's virtio devices with their state and counters (I/O, packets, bytes)."""
    _request(sock, "devices")


@app.command(epilog="Example: kasou balloon --sock /tmp/vm.sock --target 256M")
def balloon(
    sock: SockOption,
    target: Annotated[
        str | None,
        typer.Option(help="Memory to take from the guest, like 256M (0 gives it all back)."),
    ] = None,
) -> None:
    """Show the balloon's state and statistics, or set its target."""
    if target is None:
        _request(sock, "balloon")
    else:
        _request(sock, "balloon", target=target)


@app.command(epilog="Example: kasou reclaim --sock /tmp/vm.sock --max 1G --min-free 5%")
def reclaim(
    sock: SockOption,
    limit: Annotated[
        str | None,
        typer.Option("--max", help="The most kasou may inflate the balloon to, like 1G."),
    ] = None,
    min_free: Annotated[
        str | None,
        typer.Option(help="Host MemAvailable below which kasou reclaims: a size, or 5%."),
    ] = None,
    step: Annotated[str | None, typer.Option(help="How much one move takes, like 64M.")] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between readings.")] = None,
) -> None:
    """Show the memory reclaim of a VM run with --balloon --reclaim (the host's pressure,
    the balloon target, what kasou took back), or change its policy."""
    given = {"max": limit, "min_free": min_free, "step": step, "interval": interval}
    _request(sock, "reclaim", **{key: value for key, value in given.items() if value is not None})


@app.command(
    "rate-limit", epilog="Example: kasou rate-limit --sock /tmp/vm.sock block0 --bw 10M --iops 500"
)
def rate_limit(
    sock: SockOption,
    device: Annotated[str, typer.Argument(help="The disk or interface, as in `kasou devices`.")],
    bw: Annotated[str | None, typer.Option(help="Disk bytes a second, like 10M.")] = None,
    iops: Annotated[str | None, typer.Option(help="Disk requests a second.")] = None,
    bw_burst: Annotated[str | None, typer.Option(help="One-time extra bytes.")] = None,
    iops_burst: Annotated[str | None, typer.Option(help="One-time extra requests.")] = None,
    rx_bw: Annotated[str | None, typer.Option(help="Bytes a second to the guest.")] = None,
    rx_pps: Annotated[str | None, typer.Option(help="Frames a second to the guest.")] = None,
    tx_bw: Annotated[str | None, typer.Option(help="Bytes a second from the guest.")] = None,
    tx_pps: Annotated[str | None, typer.Option(help="Frames a second from the guest.")] = None,
) -> None:
    """Show or change a disk's or network interface's rate limits, live; `none` removes
    one. Prints the limits and how often and how long the device was held back."""
    given = {
        "bw": bw,
        "iops": iops,
        "bw_burst": bw_burst,
        "iops_burst": iops_burst,
        "rx_bw": rx_bw,
        "rx_pps": rx_pps,
        "tx_bw": tx_bw,
        "tx_pps": tx_pps,
    }
    changes = {
        key: None if value.lower() == "none" else value
        for key, value in given.items()
        if value is not None
    }
    _request(sock, "rate-limit", device=device, **changes)


@app.command(epilog="Examples: kasou stop --sock /tmp/vm.sock; kasou stop web db")
def stop(
    names: NamesOption = None, sock: EitherSockOption = None, host: vms.HostOption = None
) -> None:
    """Stop a VM at once; `kasou run` then exits with status 0."""
    if vms.require_one(sock, names, "stop"):
        _request(sock, "stop")  # type: ignore[arg-type]
    else:
        vms.act("stop", names or [], host)


@app.command(epilog="Examples: kasou shutdown --sock /tmp/vm.sock --timeout 30; kasou shutdown web")
def shutdown(
    names: NamesOption = None,
    sock: EitherSockOption = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the guest to power off.")
    ] = 60.0,
    host: vms.HostOption = None,
) -> None:
    """Press the VM's ACPI power button and wait for the guest to shut down and power off.

    Exits 0 once the guest has powered off; 1 when it has not within --timeout or the VM
    ended another way. A guest without ACPI (or still booting) has no power button to press:
    `kasou stop` ends a VM at once."""
    from kasou.client import ControlClient
    from kasou.errors import KasouError

    if not 0 < timeout <= 86400:
        _fail(ValueError("--timeout must be above 0 seconds, at most 86400"))
    if not vms.require_one(sock, names, "shutdown"):
        vms.shutdown_vms(names or [], timeout, host)
        return
    assert sock is not None
    try:
        with ControlClient(sock) as client:
            result = client.shutdown(wait=timeout)
    except KasouError as error:
        _fail(error)
    ending = result["ending"]
    if ending is None:
        typer.echo(
            f"kasou: the guest did not power off within {timeout:g} s (it may ignore the "
            f"power button): `kasou stop --sock {sock}` ends the VM at once",
            err=True,
        )
        raise typer.Exit(1)
    if ending["kind"] not in ("poweroff", "closed"):
        typer.echo(f"kasou: the VM ended without powering off: {ending['reason']}", err=True)
        raise typer.Exit(1)
    how = "the guest powered off" if ending["kind"] == "poweroff" else "the VM ended"
    typer.echo(f"{how} after {result['seconds']:.1f} s")


@app.command(
    "exec",
    epilog="Examples: kasou exec --sock /tmp/vm.sock -- uname -a; kasou exec web -- uname -a",
    context_settings={"allow_interspersed_args": False},
)
def exec_(
    command: Annotated[
        list[str],
        typer.Argument(
            help="[NAME] -- the command and its arguments (NAME: a VM of kasoud, without --sock).",
            metavar="[NAME] -- COMMAND...",
        ),
    ],
    sock: EitherSockOption = None,
    host: vms.HostOption = None,
    timeout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Seconds the command may run (default: no limit; 60 over COM2)."),
    ] = None,
    interactive: Annotated[
        bool,
        typer.Option("--interactive", "-i", help="Forward stdin even when it is a terminal."),
    ] = False,
    tty: Annotated[
        bool,
        typer.Option(
            "--tty", "-t", help="Run the command on a terminal in the guest (implies -i)."
        ),
    ] = False,
) -> None:
    """Run a command in the guest through its agent; exit with the command's status.

    With the VM's vsock device, output streams as it comes, stdin is forwarded unless it is
    a terminal (-i forwards it anyway), and Ctrl-C, SIGTERM and SIGHUP reach the command.
    Without it, the command runs over COM2 and its output comes at the end. Through kasoud
    (NAME), output comes at the end and stdin is sent only with -i."""
    from kasou.cli.guest import exec_command
    from kasou.errors import KasouError

    if sock is None:
        vms.exec_in(command, timeout=timeout, interactive=interactive, tty=tty, host=host)
    try:
        status = exec_command(sock, command, timeout=timeout, interactive=interactive, tty=tty)
    except KasouError as error:
        _fail(error)
    raise typer.Exit(status)


@app.command(
    "cp",
    epilog="Examples: kasou cp --sock /tmp/vm.sock ./dir :/root/ ; "
    "kasou cp web:/etc/hostname ./ ; kasou cp ./app.conf web:/etc/",
)
def cp(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="SRC... DEST: guest paths written :PATH with --sock, NAME:PATH for kasoud's VMs.",
            metavar="SRC... DEST",
        ),
    ],
    sock: EitherSockOption = None,
    host: vms.HostOption = None,
) -> None:
    """Copy files or directory trees into the guest or out of it (needs the VM's vsock).

    With --sock (one `kasou run`), guest paths are written :PATH (kasou cp --sock S
    :/etc/hostname ./). An existing directory receives the sources under their own names;
    otherwise the one source gets that name. Directories go recursively, symbolic links as
    links. Copies to the host refuse anything that would land outside DEST, keep files'
    permission bits but not setuid/setgid or group/other write, and give directories
    default modes.

    Without --sock, one file goes through kasoud: kasou cp NAME:PATH LOCAL or kasou cp
    LOCAL NAME:PATH (a local folder, or a guest path ending in /, keeps the file's name)."""
    from kasou.errors import KasouError

    if sock is None:
        from kasou.cli.cp_daemon import copy

        if len(paths) != 2:
            _fail(ValueError("through kasoud, give one SRC and one DEST (NAME:PATH on one side)"))
        try:
            typer.echo(copy(paths[0], paths[1], host))
        except KasouError as error:
            _fail(error)
        return

    from kasou.cli.guest import cp_command

    try:
        status = cp_command(sock, paths)
    except KasouError as error:
        _fail(error)
    raise typer.Exit(status)


snapshot_app = typer.Typer(
    help="Snapshots: save a running VM to a folder, fold diffs, inspect.", no_args_is_help=True
)
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command(
    "create",
    epilog="Examples: kasou snapshot create --sock /tmp/vm.sock /var/tmp/snap1; "
    "kasou snapshot create web /var/tmp/snap1",
)
def snapshot_create(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="PATH, the folder to write (an old snapshot there is replaced); NAME PATH "
            "for a VM of kasoud.",
            metavar="[NAME] PATH",
        ),
    ],
    sock: EitherSockOption = None,
    diff: Annotated[
        bool,
        typer.Option(
            "--diff",
            help="Only the pages written since this VM's previous snapshot (fold it into that "
            "one with `kasou snapshot merge`).",
        ),
    ] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the VM once it is saved.")] = False,
    copy_disks: Annotated[
        bool,
        typer.Option(
            "--copy-disks",
            help="Copy every writable disk into the folder while the VM is paused (sparse), "
            "so a restore runs on the disks as they were; read-only disks are not copied.",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    host: vms.HostOption = None,
) -> None:
    """Pause the VM, write its state and memory to a folder, and resume it (or stop it).

    Restore it with `kasou run --restore PATH` (or `kasou restore PATH --name NEW` on
    kasoud). Writing is atomic: if it fails the VM runs on and any snapshot already at PATH
    is intact. Disks you attached stay where they are unless --copy-disks (a kasoud backup
    always copies them)."""
    if sock is None:
        if len(targets) != 2 or diff or stop or copy_disks:
            _fail(
                ValueError(
                    "through kasoud give NAME PATH (no --diff, --stop, --copy-disks: "
                    "`kasou backup create NAME` copies the disks); else --sock S"
                )
            )
        from kasou.cli.backups import snapshot_vm

        snapshot_vm(targets[0], Path(targets[1]), json_output, host)
        return
    if len(targets) != 1:
        _fail(ValueError("with --sock give one PATH"))
    path = Path(targets[0])
    from kasou.client import ControlClient
    from kasou.errors import KasouError

    try:
        with ControlClient(sock) as client:
            result = client.snapshot(path, diff=diff, stop=stop, copy_disks=copy_disks)
    except KasouError as error:
        _fail(error)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"{result['kind']} snapshot {result['path']}: {result['pages']} pages "
        f"({result['bytes'] / 2**20:.1f} MiB) in {result['seconds']:.3f} s, VM paused "
        f"{result['paused_seconds'] * 1000:.0f} ms, now {result['state']}"
    )
    for disk in result.get("disks", []):
        if disk.get("copy") is not None:
            typer.echo(f"  disk {disk['path']} copied as {disk['copy']}")


@snapshot_app.command(
    "merge", epilog="Example: kasou snapshot merge /var/tmp/snap1 /var/tmp/snap1-diff1"
)
def snapshot_merge(
    base: Annotated[Path, typer.Argument(help="The full snapshot to fold the diffs into.")],
    diffs: Annotated[
        list[Path], typer.Argument(help="Diff snapshots, in the order they were taken.")
    ],
) -> None:
    """Fold diff snapshots into their full snapshot (replaced in one step at the end)."""
    from kasou.errors import KasouError
    from kasou.vmm.snapshot import merge_snapshots

    try:
        result = merge_snapshots(base, diffs)
    except KasouError as error:
        _fail(error)
    typer.echo(
        f"merged {result['diffs']} diff(s), {result['pages_merged']} pages, into {result['path']}"
    )


@snapshot_app.command("info", epilog="Example: kasou snapshot info /var/tmp/snap1")
def snapshot_info(
    path: Annotated[Path, typer.Argument(help="A snapshot folder.")],
) -> None:
    """Show what a snapshot holds (JSON)."""
    from kasou.errors import KasouError
    from kasou.vmm.snapshot import snapshot_info as info

    try:
        result = info(path)
    except KasouError as error:
        _fail(error)
    typer.echo(json.dumps(result, indent=2))


@app.command(
    epilog="Examples: kasou migrate --sock /tmp/vm.sock tcp://127.0.0.1:4444; "
    "kasou migrate web unix:/run/in.sock; "
    "kasou migrate web --to-host https://b:8443 --to-token-file b.token --listen tcp://0.0.0.0:4444"
)
def migrate(
    targets: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(
            help="URL, where `kasou run --incoming` listens: tcp://HOST:PORT or unix:PATH; "
            "NAME URL for a VM of kasoud.",
            metavar="[NAME] URL",
            show_default=False,
        ),
    ] = None,
    sock: EitherSockOption = None,
    downtime: Annotated[
        float, typer.Option(help="The longest pause of the guest to aim for, in seconds.")
    ] = 0.3,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="Cancel the migration under way.")
    ] = False,
    to_host: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Move the VM to this other kasoud (its socket, or https://HOST:PORT): a VM "
            "of the same name waits there on --listen, and the VM is removed here once it "
            "runs there. Disks named by path must be at the same path there (shared "
            "storage); scratch disks travel with the VM.",
            show_default=False,
        ),
    ] = None,
    to_token_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="The bearer token of --to-host's TCP listener.", show_default=False),
    ] = None,
    listen: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="With --to-host: where the destination's VM waits, on its host: "
            "tcp://HOST:PORT or unix:PATH.",
            show_default=False,
        ),
    ] = None,
    connect: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="With --to-host: where this host reaches --listen, if not at that URL "
            "(default: --listen; tcp://0.0.0.0 becomes --to-host's host).",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    host: vms.HostOption = None,
) -> None:
    """Send a running VM to another kasou while it runs (live migration).

    Memory is copied while the guest runs, in rounds, until what is left fits the downtime
    target; then the guest pauses, the rest and its devices' state go over, and it runs on
    at the destination. A guest that dirties memory faster than the link carries is slowed
    down (auto-converge). Ctrl-C cancels: the VM runs on here. Exits 0 once the VM runs at
    the destination. `kasou migrate NAME --to-host B --listen URL` moves a VM of kasoud to
    the kasoud B (made there, removed here); if it fails the VM runs on here."""
    given = targets or []
    if to_host is not None or listen is not None:
        if to_host is None or listen is None or sock is not None or cancel or len(given) != 1:
            vms.fail(
                "to move a VM of kasoud to another give NAME --to-host SOCKET_OR_URL "
                "--listen URL (where the VM waits there: tcp://HOST:PORT or unix:PATH)"
            )
        vms.move_vm(given[0], to_host, to_token_file, listen, connect, downtime, json_output, host)
        return
    if sock is None:
        if len(given) != 2 or cancel:
            _fail(ValueError("through kasoud give NAME URL; else --sock S URL"))
        from kasou.cli.backups import migrate_vm

        migrate_vm(given[0], given[1], downtime, json_output, host)
        return
    if len(given) > 1:
        _fail(ValueError("with --sock give one URL"))
    url = given[0] if given else None
    from kasou.client import ControlClient
    from kasou.errors import KasouError

    try:
        with ControlClient(sock) as client:
            if cancel:
                typer.echo(json.dumps(client.request("migrate-cancel"), indent=2))
                return
            if url is None:
                _fail(ValueError("give the destination: tcp://HOST:PORT or unix:PATH"))
            client.request("migrate", url=url, downtime=downtime)
            result = _follow_migration(client, quiet=json_output)
    except KasouError as error:
        _fail(error)
    except KeyboardInterrupt:
        with ControlClient(sock) as client:
            client.request("migrate-cancel")
        typer.echo("kasou: migration cancelled; the VM runs on here", err=True)
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    if result["phase"] != "completed":
        typer.echo(f"kasou: migration {result['phase']}: {result['error']}", err=True)
        raise typer.Exit(1)
    if not json_output:
        typer.echo(
            f"migrated to {result['url']} in {result['seconds']:.2f} s: downtime "
            f"{result['downtime'] * 1000:.0f} ms, {result['bytes_sent'] / 2**20:.1f} MiB sent "
            f"in {result['round'] + 1} rounds"
            + (
                f", guest slowed down up to {result['throttle_max']:.0%}"
                if result["throttle_max"]
                else ""
            )
        )


def _follow_migration(client: Any, quiet: bool) -> dict[str, Any]:
    """Poll the migration's progress until it ends, with a progress bar unless ``quiet``."""
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    request = client.request
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with Progress(*columns, transient=True, disable=quiet) as progress:
        task = progress.add_task("connecting", total=None)
        while True:
            state: dict[str, Any] = request("migration")
            if state["phase"] in ("completed", "failed", "cancelled"):
                return state
            throttle = float(state["throttle"])
            progress.update(
                task,
                total=int(state["memory"]),
                completed=int(state["pages_sent"]) * 4096,
                description=f"{state['phase']} round {state['round']}, dirty "
                f"{float(state['dirty_rate']) / 2**20:.0f} MiB/s, "
                f"expected downtime {float(state['expected_downtime']) * 1000:.0f} ms"
                + (f", throttle {throttle:.0%}" if throttle else ""),
            )
            time.sleep(0.1)


image_app = typer.Typer(help="Guest images: the default guest, Debian 12.", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(disk_app, name="disk")
app.add_typer(sandbox_app, name="sandbox")
vms.register(app)
backups.register(app)


@image_app.command(
    "build", epilog="Examples: kasou image build; kasou image build --distro debian-12"
)
def image_build(
    force: Annotated[bool, typer.Option(help="Rebuild even what is cached.")] = False,
    distro: Annotated[
        str | None,
        typer.Option(
            help="Build a distribution's image instead: debian-12 (a Debian cloud-style qcow2 "
            "disk with its kernel and initramfs; needs root and Debian's mirror)."
        ),
    ] = None,
) -> None:
    """Build (or find cached) the default guest: kernel, initramfs, root disk. With --distro
    debian-12: a Debian 12 disk image (qcow2) and the kernel and initramfs that boot it."""
    from kasou import image
    from kasou.cli.progress import BuildProgress
    from kasou.errors import KasouError

    if distro is not None and distro != "debian-12":
        _fail(KasouError(f"--distro {distro}: the one distribution kasou builds is debian-12"))
    try:
        with BuildProgress() as progress:
            if distro is not None:
                debian = image.build_debian(force=force, progress=progress)
            else:
                guest = image.build(force=force, progress=progress)
    except KasouError as error:
        _fail(error)
    if distro is not None:
        for name in ("disk", "kernel", "initrd"):
            typer.echo(f"{name:<8} {getattr(debian, name)}")
        typer.echo(f"cmdline  {debian.cmdline}")
        return
    for name in ("kernel", "bzimage", "initrd", "rootfs"):
        typer.echo(f"{name:<8} {getattr(guest, name)}")
    typer.echo(f"cmdline  {guest.cmdline}")


@app.command(
    epilog="Example: kasou nested -- ls -l /dev/kvm; kasou nested --forward 8080:80 -- CMD",
    context_settings={"allow_interspersed_args": False},
)
def nested(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments.")],
    timeout: Annotated[float, typer.Option(help="Seconds before the outer VM is killed.")] = 1800.0,
    cpus: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="vCPUs of the outer VM (default 1: faster and steadier here)."),
    ] = None,
    share: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="A host folder the command may write to (same path inside)."),
    ] = None,
    forward: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            metavar="HOSTPORT:GUESTPORT",
            help="Let 127.0.0.1:HOSTPORT here reach GUESTPORT inside (TCP; repeatable).",
        ),
    ] = None,
) -> None:
    """Run a command with a real /dev/kvm inside a nested host (QEMU TCG with AMD-V).

    This host's root is mounted read-only inside with a writable overlay on top that is
    thrown away; --share gives writable access to a host folder. The nested host has no
    network: --forward lets one TCP port in, and nothing goes out. Exits with the command's
    status, or 124 when the outer VM hung and was killed at --timeout."""
    from kasou.errors import KasouError
    from kasou.nested import NestedError, parse_forward, run_nested

    try:
        forwards = [parse_forward(text) for text in forward or ()]
        result = run_nested(
            command,
            cwd=Path.cwd(),
            timeout=timeout,
            cpus=cpus,
            shares=share or (),
            forwards=forwards,
        )
    except NestedError as error:
        typer.echo(f"kasou: error: {error}", err=True)
        raise typer.Exit(124 if "hung" in str(error) else 2) from None
    except KasouError as error:
        _fail(error)
    raise typer.Exit(result.status)


@app.command(epilog="Example: kasou limits --sock /tmp/vm.sock --cpus-quota 0.5 --cpu-pin 0=1")
def limits(
    sock: SockOption,
    cpus_quota: Annotated[
        str | None, typer.Option(help="CPU time in host CPUs, like 0.5; none lifts it.")
    ] = None,
    cpu_weight: Annotated[
        str | None, typer.Option(help="Share of contended CPUs, 1-10000; none lifts it.")
    ] = None,
    cpu_pin: Annotated[
        str | None, typer.Option(help="VCPU=CPU,... like 0=2,1=3; none unpins every vCPU.")
    ] = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Memory, guest RAM included, like 1G; none lifts it.")
    ] = None,
    pids_limit: Annotated[str | None, typer.Option(help="Tasks kasou may have.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Show a VM's CPU, memory and task limits, its vCPUs' host CPUs and what it uses; change
    any of them while it runs."""
    from kasou.client import ControlClient
    from kasou.errors import KasouError

    given = {
        "cpus_quota": cpus_quota,
        "cpu_weight": cpu_weight,
        "cpu_pin": cpu_pin,
        "memory_limit": memory_limit,
        "pids_limit": pids_limit,
    }
    changes = {
        name: None if value == "none" else value
        for name, value in given.items()
        if value is not None
    }
    try:
        with ControlClient(sock) as client:
            result = client.limits(**changes)
    except KasouError as error:
        _fail(error)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    usage = result["usage"]
    rows = [
        ("cpus quota", result["cpus_quota"], f"{usage['cpu_seconds']:.2f} s CPU used"),
        ("cpu weight", result["cpu_weight"], ""),
        ("memory limit", result["memory_limit"], f"{usage['memory_bytes']} bytes used"),
        ("pids limit", result["pids_limit"], f"{usage['tasks']} tasks"),
    ]
    for name, value, used in rows:
        typer.echo(f"{name:<13} {'-' if value is None else value!s:<12} {used}")
    for vcpu in result["vcpus"]:
        pinned = result["cpu_pin"].get(str(vcpu["vcpu"]))
        typer.echo(
            f"vcpu{vcpu['vcpu']:<9} {'-' if pinned is None else pinned!s:<12} may run on "
            f"{vcpu['cpus']}, last on {vcpu['last_cpu']} (thread {vcpu['tid']})"
        )


@app.command(epilog="Example: kasou demo --vcpus 2")
def demo(
    vcpus: Annotated[int, typer.Option(help="vCPUs for the guest.")] = 2,
    here: Annotated[
        bool, typer.Option(help="Run on this host's KVM even if it is not hardware KVM.")
    ] = False,
) -> None:
    """Boot the default guest, run uname/nproc/free in it, print the boot times."""
    from kasou.cli.demo import demo as run_demo
    from kasou.errors import KasouError

    try:
        status = run_demo(vcpus, here)
    except KasouError as error:
        _fail(error)
    raise typer.Exit(status)
