"""The Docker-like commands on kasoud (``kasou ps|create|start|rm|logs|console|events|top|
inspect``) and the daemon half of the commands that also drive a single ``kasou run`` through
its control socket (``kasou stop|pause|resume|status|shutdown|exec``: ``--sock S`` or a NAME).

Each command only translates arguments into SDK calls (``kasou.sdk``) and replies into text;
none reaches kasoud's internals. The SDK (httpx, pydantic) and rich are imported inside the
commands, so ``kasou --help`` and the control-socket commands do not pay for them. Every
error is one line, ``kasou: error: ...``, and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from kasou.sdk import Client
    from kasou.spec import Event, VmInfo

__all__ = [
    "act",
    "exec_in",
    "move_vm",
    "print_status",
    "register",
    "require_one",
    "shutdown_vms",
]


def _complete_names(incomplete: str) -> list[str]:
    """Shell completion of VM names: asks kasoud, quietly gives nothing if it does not answer."""
    from kasou.errors import KasouError
    from kasou.sdk import Client

    try:
        with Client(timeout=1.0) as client:
            return [vm.name for vm in client.vms.list() if vm.name.startswith(incomplete)]
    except KasouError:
        return []


HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="KASOU_HOST",
        help="kasoud's socket, or http(s)://HOST:PORT. Default: /run/kasou/kasoud.sock",
        show_default=False,
    ),
]
NameArgument = Annotated[str, typer.Argument(help="The VM's name.", autocompletion=_complete_names)]
NamesArgument = Annotated[
    list[str], typer.Argument(help="VM names.", autocompletion=_complete_names)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(error: object) -> NoReturn:
    typer.echo(f"kasou: error: {error}", err=True)
    raise typer.Exit(2)


def require_one(sock: Path | None, names: list[str] | None, command: str) -> bool:
    """Whether the command goes to a control socket (True) or to kasoud (False); exactly one
    of --sock and NAME... must be given."""
    if sock is not None and names:
        fail(f"give --sock or NAME..., not both (kasou {command} --help)")
    if sock is None and not names:
        fail(
            f"Missing option '--sock' or argument NAME: kasou {command} --sock S drives a "
            f"`kasou run`, kasou {command} NAME a VM of kasoud"
        )
    return sock is not None


@contextlib.contextmanager
def _connected(host: str | None, timeout: float = 30.0) -> Iterator[Client]:
    """An SDK client; every kasou error inside becomes one line and exit status 2."""
    from kasou.errors import KasouError
    from kasou.sdk import Client

    try:
        with Client(host, timeout=timeout) as client:
            yield client
    except KasouError as error:
        fail(error)


def _dump(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _vm_json(vm: VmInfo) -> dict[str, Any]:
    return vm.model_dump(mode="json")


def act(verb: str, names: list[str], host: str | None) -> None:
    """start/stop/pause/resume/restart each VM; print ``NAME STATE`` for each. A VM that
    refuses does not stop the others; the command then exits 2."""
    from kasou.errors import KasouError

    failed = False
    with _connected(host) as client:
        for name in names:
            try:
                vm = getattr(client.vms, verb)(name)
            except KasouError as error:
                typer.echo(f"kasou: error: {error}", err=True)
                failed = True
                continue
            typer.echo(f"{vm.name} {vm.state.value}")
    if failed:
        raise typer.Exit(2)


def shutdown_vms(names: list[str], timeout: float, host: str | None) -> None:
    """ACPI shutdown of each VM through kasoud, waiting up to ``timeout`` for each."""
    from kasou.errors import KasouError

    failed = False
    with _connected(host, timeout=timeout + 15) as client:
        for name in names:
            try:
                vm = client.vms.shutdown(name, timeout=timeout)
            except KasouError as error:
                typer.echo(f"kasou: error: {error}", err=True)
                failed = True
                continue
            typer.echo(f"{vm.name} {vm.state.value}")
    if failed:
        raise typer.Exit(2)


def print_status(names: list[str], host: str | None) -> None:
    """What each VM's process says of itself (its control socket's ``status``), as JSON."""
    with _connected(host) as client:
        for name in names:
            _dump(client.vms.request(name, "status"))


def exec_in(
    words: list[str], timeout: float | None, interactive: bool, tty: bool, host: str | None
) -> NoReturn:
    """``kasou exec NAME [--] CMD...`` through kasoud; exits with the command's status."""
    if tty:
        fail("--tty needs the VM's control socket: kasou exec --sock S -t -- CMD")
    name, argv = words[0], words[1:]
    if argv[:1] == ["--"]:  # options end at NAME, so click leaves a later "--" in the words
        argv = argv[1:]
    if not argv:
        fail(f"Missing command: kasou exec {name} -- CMD [ARG...]")
    # The API takes stdin whole, before the command runs: only read it when asked to.
    stdin = sys.stdin.read() if interactive else ""
    limit = 60.0 if timeout is None else timeout
    # Output is printed as the guest writes it (the API's streamed exec), each stream flushed
    # at once so that the two keep their order on a shared terminal.
    with (
        _connected(host, timeout=limit + 15) as client,
        client.vms.exec_stream(name, argv, stdin=stdin, timeout=limit) as run,
    ):
        for chunk in run:
            out = sys.stdout if chunk.stream == "stdout" else sys.stderr
            out.write(chunk.data)
            out.flush()
        status = run.exit_code
    raise typer.Exit(255 if status is None else status)


def move_vm(
    name: str,
    to_host: str,
    to_token_file: Path | None,
    listen: str,
    connect: str | None,
    downtime: float,
    json_output: bool,
    host: str | None,
) -> None:
    """``kasou migrate NAME --to-host B --listen URL``: move a running VM to the kasoud
    ``to_host``, live (``client.vms.move``), with a progress bar; it is removed here after."""
    from kasou.errors import KasouError
    from kasou.sdk import Client

    token = None
    if to_token_file is not None:
        try:
            token = to_token_file.read_text().strip()
        except OSError as error:
            fail(f"cannot read --to-token-file {to_token_file}: {error.strerror}")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with _connected(host) as client:
        try:
            destination = Client(to_host, token=token)
        except KasouError as error:
            fail(f"--to-host: {error}")
        with (
            destination,
            Progress(*columns, transient=True, disable=json_output) as progress,
        ):
            task = progress.add_task(f"moving {name} to {to_host}", total=1.0)
            result: dict[str, Any] = {}

            def report(operation: Any) -> None:
                progress.update(task, completed=operation.progress)
                result.update(operation.result or {})

            try:
                vm = client.vms.move(
                    name,
                    destination,
                    listen=listen,
                    connect=connect,
                    downtime=downtime,
                    progress=report,
                )
            except KeyboardInterrupt:
                progress.stop()
                here = {vm.name: vm.state.value for vm in client.vms.list()}.get(name)
                if here == "running":
                    fail(f"interrupted: the move was cancelled; {name} runs on here")
                fail(f"interrupted: see where {name} runs with `kasou ps` on both hosts")
    if json_output:
        _dump({"vm": _vm_json(vm), "migration": result})
        return
    typer.echo(
        f"moved {name} to {to_host}: running there (pid {vm.pid}), removed here; downtime "
        f"{float(result.get('downtime') or 0) * 1000:.0f} ms"
    )


# ---- read commands


def _age(since: float | None) -> str:
    if since is None:
        return "-"
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_QUIET_STATES = {"created", "stopped", "failed"}


def ps(
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Also VMs that do not run (created, stopped).")
    ] = False,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Only VMs with this label, KEY=VALUE (repeatable)."),
    ] = None,
    json_output: JsonOption = False,
    host: HostOption = None,
) -> None:
    """List kasoud's VMs: the running ones, or all with --all."""
    labels = _labels(label)
    with _connected(host) as client:
        vms = client.vms.list(labels=labels or None)
    if not show_all:
        vms = [vm for vm in vms if vm.state.value not in _QUIET_STATES]
    if json_output:
        _dump([_vm_json(vm) for vm in vms])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "STATE", "PID", "VCPUS", "MEMORY", "UP", "RESTARTS", "LABELS", box=None)
    for vm in vms:
        table.add_row(
            vm.name,
            vm.state.value,
            "-" if vm.pid is None else str(vm.pid),
            str(vm.spec.vcpus),
            vm.spec.memory,
            _age(vm.started_at) if vm.pid is not None else "-",
            str(vm.restarts),
            ",".join(f"{key}={value}" for key, value in vm.spec.labels.items()),
        )
    Console().print(table)


def inspect(name: NameArgument, json_output: JsonOption = True, host: HostOption = None) -> None:
    """Show everything kasoud knows of a VM (its spec and state) as JSON."""
    with _connected(host) as client:
        _dump(_vm_json(client.vms.get(name)))


def _labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or ():
        key, equals, value = pair.partition("=")
        if not equals or not key:
            fail(f"--label {pair!r}: give KEY=VALUE")
        labels[key] = value
    return labels


def _absolute_disk(text: str) -> str:
    """A --disk value with its path made absolute: kasoud runs elsewhere."""
    path, comma, rest = text.partition(",")
    if path and "=" not in path:
        path = os.path.abspath(path)
    return path + comma + rest


def create(
    name: Annotated[str, typer.Argument(help="The VM's name: a-z, 0-9 and '-'.")],
    kernel: Annotated[
        Path | None,
        typer.Option(help="Linux kernel (vmlinux or bzImage). Default: the default guest."),
    ] = None,
    initrd: Annotated[Path | None, typer.Option(help="Initial ramdisk.")] = None,
    image: Annotated[
        Path | None,
        typer.Option(help="A disk image to boot (raw or qcow2), as `kasou run --image`."),
    ] = None,
    cmdline: Annotated[str | None, typer.Option(help="Kernel command line.")] = None,
    memory: Annotated[str | None, typer.Option(help="Guest RAM, like 512M. Default: 256M.")] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs. Default: 1.")] = None,
    disk: Annotated[
        list[str] | None,
        typer.Option(help="A virtio-blk disk, PATH[,ro][,format=raw|qcow2] (repeatable)."),
    ] = None,
    net: Annotated[
        list[str] | None,
        typer.Option(help="A virtio-net interface, [tap=NAME][,mac=MAC] (repeatable)."),
    ] = None,
    rng: Annotated[bool, typer.Option("--rng", help="A virtio-rng device.")] = False,
    balloon: Annotated[bool, typer.Option("--balloon", help="A virtio-balloon device.")] = False,
    no_acpi: Annotated[bool, typer.Option("--no-acpi", help="No ACPI tables.")] = False,
    restart: Annotated[
        str, typer.Option(help="Restart policy: never, on-failure or always.")
    ] = "never",
    label: Annotated[
        list[str] | None,
        typer.Option(help="A label, KEY=VALUE (repeatable)."),
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Start it once created.")] = False,
    incoming: Annotated[
        str | None,
        typer.Option(
            help="Wait for a VM sent by `kasou migrate` on unix:PATH or tcp://HOST:PORT "
            "instead of booting (kasou restore makes one from a snapshot). With a kernel, "
            "image or cmdline too, starts after it arrived boot from them."
        ),
    ] = None,
    json_output: JsonOption = False,
    host: HostOption = None,
) -> None:
    """Declare a VM in kasoud (and start it with --start).

    Relative paths (kernel, initrd, image, disks) are taken from the current folder."""
    fields: dict[str, Any] = {
        "name": name,
        "disks": [_absolute_disk(value) for value in disk or ()],
        "nets": list(net or ()),
        "rng": rng,
        "balloon": balloon,
        "acpi": not no_acpi,
        "restart": restart,
        "labels": _labels(label),
    }
    for key, path in (("kernel", kernel), ("initrd", initrd), ("image", image)):
        if path is not None:
            fields[key] = os.path.abspath(path)
    for key, value in (
        ("cmdline", cmdline),
        ("memory", memory),
        ("vcpus", vcpus),
        ("incoming", incoming),
    ):
        if value is not None:
            fields[key] = value
    with _connected(host) as client:
        vm = client.vms.create(start=start, **fields)
    if json_output:
        _dump(_vm_json(vm))
    else:
        typer.echo(f"{vm.name} {vm.state.value}")


def start(names: NamesArgument, host: HostOption = None) -> None:
    """Start VMs."""
    act("start", names, host)


def restart(names: NamesArgument, host: HostOption = None) -> None:
    """Stop VMs and start them again."""
    act("restart", names, host)


def rm(
    names: NamesArgument,
    force: Annotated[bool, typer.Option("--force", "-f", help="Stop running VMs first.")] = False,
    host: HostOption = None,
) -> None:
    """Remove VMs (a running one only with -f)."""
    from kasou.errors import KasouError

    failed = False
    with _connected(host) as client:
        for name in names:
            try:
                client.vms.delete(name, force=force)
            except KasouError as error:
                typer.echo(f"kasou: error: {error}", err=True)
                failed = True
                continue
            typer.echo(name)
    if failed:
        raise typer.Exit(2)


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def logs(
    name: NameArgument,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then print new output as it comes.")
    ] = False,
    tail: Annotated[
        int | None,
        typer.Option(help="Only the last N bytes of the log."),
    ] = None,
    host: HostOption = None,
) -> None:
    """Print a VM's console log (COM1's output); -f follows it.

    With -f, new output is printed as it comes until Ctrl-C or the VM ends."""
    with _connected(host) as client:
        if not follow:
            _write(client.vms.logs(name, tail=tail).encode())
            return
        # The console is joined before the log is read so that no output falls between
        # the two; output written in between may then show twice, never not at all.
        with client.vms.console(name) as console:
            _write(client.vms.logs(name, tail=tail).encode())
            try:
                while chunk := console.recv():
                    _write(chunk)
            except KeyboardInterrupt:
                pass


_DETACH = b"\x1d"  # Ctrl-]


def console(name: NameArgument, host: HostOption = None) -> None:
    """Attach to a VM's serial console (Ctrl-] detaches).

    Keys go to the guest and its output comes here; the VM runs on after you detach."""
    import select
    import termios
    import threading
    import tty

    with _connected(host) as client, client.vms.console(name) as session:
        stdin = sys.stdin.fileno()
        is_tty = os.isatty(stdin)
        if is_tty:
            typer.echo(f"attached to {name}: Ctrl-] detaches", err=True)
        ended = threading.Event()

        def pump_output() -> None:
            while chunk := session.recv():
                _write(chunk)
            ended.set()

        threading.Thread(target=pump_output, name="kasou-console", daemon=True).start()
        saved = termios.tcgetattr(stdin) if is_tty else None
        try:
            if is_tty:
                tty.setraw(stdin)
            reading = True
            while not ended.is_set():
                if not reading:
                    ended.wait(0.5)
                    continue
                ready, _, _ = select.select([stdin], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(stdin, 4096)
                if not data:  # stdin ended (a pipe): output keeps coming until Ctrl-C
                    reading = False
                    continue
                keys, detach, _ = data.partition(_DETACH)
                if keys:
                    session.send(keys)
                if detach:
                    break
        except (KeyboardInterrupt, BrokenPipeError):
            pass
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        if is_tty:
            typer.echo("\r\ndetached" if not ended.is_set() else "\r\nthe console closed", err=True)


def _event_line(event: Event) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time))
    parts = [f"{event.id:>6}", stamp, event.vm or "-", event.kind]
    if event.state is not None:
        parts.append(event.state.value)
    if event.message:
        parts.append(event.message)
    return "  ".join(parts)


def events(
    since: Annotated[int, typer.Option(help="Only events after this id.")] = 0,
    vm: Annotated[str | None, typer.Option(help="Only this VM's events.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Wait for new events (until Ctrl-C).")
    ] = True,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    host: HostOption = None,
) -> None:
    """Print kasoud's event log (state changes, restarts, errors), then follow it."""

    def show(event: Event) -> None:
        line = event.model_dump_json() if json_output else _event_line(event)
        typer.echo(line)

    with _connected(host) as client:
        if not follow:
            for event in client.event_log(since, vm=vm):
                show(event)
            return
        try:
            with client.events(since, vm=vm) as stream:
                for event in stream:
                    show(event)
        except KeyboardInterrupt:
            pass


_KVM_EXITS = "kasou_vm_kvm_exits_total"


def _vm_samples(text: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per-VM values from Prometheus text: {vm: {metric name: value}}, summed over other
    labels (a VM's disks, kasou's exit reasons); and KVM's exit counters {vm: {reason:
    value}}, kept apart because KVM's reasons overlap and do not sum."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, dict[str, float]] = {}
    kvm_exits: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            vm = sample.labels.get("vm") or sample.labels.get("name")
            if vm is None:
                continue
            if sample.name == _KVM_EXITS:
                kvm_exits.setdefault(vm, {})[sample.labels.get("reason", "")] = sample.value
                continue
            row = values.setdefault(vm, {})
            row[sample.name] = row.get(sample.name, 0.0) + sample.value
    return values, kvm_exits


def _pick(row: dict[str, float], *words: str) -> float | None:
    """The first metric whose name holds every one of ``words`` (kasoud's names may gain a
    prefix or a unit suffix)."""
    for metric, value in sorted(row.items()):
        if all(word in metric for word in words):
            return value
    return None


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between frames.")] = 1.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="One frame as JSON: each VM's metrics by name.")
    ] = False,
    host: HostOption = None,
) -> None:
    """A live table of the running VMs: CPU, VM exits a second (as KVM counts them), memory
    (RSS, PSS, guest RAM), restarts. --json adds KVM's exit counters by reason."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    previous: dict[str, tuple[float, float]] = {}  # vm -> (monotonic time, cpu seconds)
    exits_before: dict[str, tuple[float, float]] = {}  # vm -> (monotonic time, KVM's exits)

    def rate(
        table: dict[str, tuple[float, float]], vm: str, now: float, value: float
    ) -> float | None:
        """``value``'s change a second since the last frame (None on the first)."""
        before = table.get(vm)
        table[vm] = (now, value)
        if before is None or now <= before[0]:
            return None
        return (value - before[1]) / (now - before[0])

    def frame(client: Client) -> Table:
        vms = [vm for vm in client.vms.list() if vm.state.value not in _QUIET_STATES]
        samples, kvm_exits = _vm_samples(client.metrics())
        table = Table(
            "NAME", "STATE", "CPU%", "CPU s", "EXITS/s", "RSS", "PSS", "GUEST", "RESTARTS", "UP"
        )
        now = time.monotonic()
        for vm in vms:
            row = samples.get(vm.name, {})
            cpu = _pick(row, "cpu", "seconds")
            percent = "-"
            if cpu is not None:
                change = rate(previous, vm.name, now, cpu)
                percent = "-" if change is None else f"{100 * change:.1f}"
            exits = kvm_exits.get(vm.name, {}).get("all")
            exit_rate = "-"
            if exits is not None:
                change = rate(exits_before, vm.name, now, exits)
                exit_rate = "-" if change is None else f"{change:.0f}"
            table.add_row(
                vm.name,
                vm.state.value,
                percent,
                "-" if cpu is None else f"{cpu:.2f}",
                exit_rate,
                _size(_pick(row, "rss")),
                _size(_pick(row, "pss")),
                _size(_pick(row, "guest", "memory")),
                str(vm.restarts),
                _age(vm.started_at),
            )
        return table

    out = Console()
    with _connected(host) as client:
        if json_output:
            vms = [vm for vm in client.vms.list() if vm.state.value not in _QUIET_STATES]
            samples, kvm_exits = _vm_samples(client.metrics())
            frame_json: dict[str, dict[str, Any]] = {}
            for vm in vms:
                frame_json[vm.name] = {"state": vm.state.value, **samples.get(vm.name, {})}
                if vm.name in kvm_exits:  # absent where the host's KVM has no binary stats
                    frame_json[vm.name]["kvm_exits"] = kvm_exits[vm.name]
            typer.echo(json.dumps(frame_json, indent=2, sort_keys=True))
            return
        if once:
            out.print(frame(client))
            return
        try:
            with Live(frame(client), console=out, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(frame(client), refresh=True)
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    """Add the daemon-only commands to ``app`` (the shared ones live in ``cli/app.py``)."""
    commands = (
        (ps, "ps", "kasou ps --all"),
        (create, "create", "kasou create web --kernel vmlinux --memory 512M --start"),
        (start, "start", "kasou start web db"),
        (restart, "restart", "kasou restart web"),
        (rm, "rm", "kasou rm -f web"),
        (logs, "logs", "kasou logs -f --tail 4096 web"),
        (console, "console", "kasou console web"),
        (events, "events", "kasou events --since 0 --no-follow --json"),
        (top, "top", "kasou top --once"),
        (inspect, "inspect", "kasou inspect web --json"),
    )
    for function, name, example in commands:
        app.command(name, epilog=f"Example: {example}")(function)
