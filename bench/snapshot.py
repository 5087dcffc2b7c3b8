"""Snapshots, restore and live migration: kasou beside QEMU on the guest kit's ``memcheck``.

Every guest is the guest kit's same ELF (kasou boots it by the 64-bit Linux boot protocol,
QEMU as Multiboot) running ``memcheck`` (guestkit/memcheck.py): in ring 3 it rewrites an
area of its RAM over and over, first checking that each word holds what it last wrote, and
prints ``memcheck: pass N`` every few passes. A restored or migrated guest must go on: its
first pass line above the pass it was saved in, no ``memcheck: ready`` (that would be a
fresh boot), no failed check; the bench stops with an error otherwise.

Definitions (each figure the median of repeated runs):
- snapshot write, 512 MiB and 4 GiB guests (memcheck over 64 MiB at native speed, about
  3 GiB/s): `kasou snapshot create --json`'s ``seconds`` (pause, every state, the memory
  file's non-zero pages, fsync), MB/s = memory bytes written over those seconds, and
  ``paused_seconds`` (the guest stopped). QEMU's savevm equivalent: QMP ``migrate`` to
  ``exec:cat > FILE`` (pre-copy while the guest runs, bandwidth uncapped): query-migrate's
  ``total-time``, the file's size over it, and its ``downtime``;
- restore, the same guests from the last of those snapshots (page cache warm): kasou's
  stamps on CLOCK_MONOTONIC (KASOU_TRACE_START) from ``restore begins`` (in ``run()``, just
  before the VM is built; the state file already read and checked) to the boot vCPU's first
  KVM_RUN, and from the exec of `kasou run --restore` to that KVM_RUN (Python's start-up
  included). QEMU: ``-incoming defer``, then QMP ``migrate-incoming`` of ``exec:cat FILE``:
  from that command, and from QEMU's exec, to ``query-status`` saying running (polled each
  millisecond);
- live migration over loopback TCP of a 1 GiB guest nearly idle (memcheck over 1 MiB at one
  page per ms: 4 MiB/s) and of one dirtying 250 MiB/s (64 pages per ms over 256 MiB):
  `kasou migrate --json` into `kasou run --incoming tcp://127.0.0.1:PORT` (downtime target
  300 ms; the bench sends the same requests as the CLI, polling faster to see the peak
  throttle): ``seconds``, ``downtime`` (the source's pause to the destination's RUNNING),
  rounds, bytes sent, the throttle reached, and converged (the pages left fit the target
  before the round cap). QEMU: QMP ``migrate`` into a second QEMU's ``-incoming
  tcp:127.0.0.1:PORT`` (auto-converge on, bandwidth uncapped, its default 300 ms downtime
  limit): query-migrate's ``total-time``, ``downtime``, ``dirty-sync-count`` as rounds,
  ``ram.transferred``, ``cpu-throttle-percentage``. Each repeat sends the VM on from the
  destination of the one before.

Snapshot files go to tmpfs (/dev/shm; ``--dir`` picks another folder): kasou fsyncs what it
writes and QEMU's ``exec:cat`` does not, so on a disk the two would not be measured alike.
Every ratio is kasou's figure over QEMU's: for times and bytes below 1 means kasou is
better, for MB/s above 1. Usage: ``python bench/snapshot.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kasou_peer
import qemu_peer
from kasou.guestkit import FAIL_PREFIX, cmdline
from kasou.guestkit.memcheck import MEMCHECK_STATUS_GPA, read_status
from kasou.memory import MemoryFile

__all__ = ["KasouVm", "bench_snapshot", "main"]

T = TypeVar("T")

SAVE_SIZES = (512, 4096)  # guest MiB for snapshot write and restore
SAVE_GUEST = cmdline("memcheck", mib=64, report=4)
MIGRATE_MIB = 1024
MIGRATIONS = (
    ("idle", cmdline("memcheck", mib=1, rate=1, report=1)),
    ("250 MiB/s", cmdline("memcheck", mib=256, rate=64, report=1)),
)
PASS = re.compile(r"^memcheck: pass (\d+)\n", re.MULTILINE)  # whole lines only
READY = "memcheck: ready"
WAIT = 60.0  # seconds for anything the bench waits on
QEMU_MIGRATION_LIMIT = 60.0  # seconds before a QEMU migration that has not ended is cancelled
DOWNTIME = 0.3  # seconds: kasou's downtime target (its default), QEMU's default limit
UNCAPPED = 100 << 30  # QEMU's max-bandwidth, bytes/s (its default is 32 MiB/s)
SHM = Path("/dev/shm")  # snapshots go to tmpfs unless --dir says otherwise
PASS_OFFSET = 24  # of the pass under way in memcheck's status block


def _until(what: str, check: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Poll ``check`` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def _passes(console: str, who: str) -> list[int]:
    """The pass lines ``console`` holds; an error if memcheck failed or booted afresh."""
    if FAIL_PREFIX in console:
        raise RuntimeError(f"{who}: memcheck found a wrong word:\n{console[-2000:]}")
    return [int(number) for number in PASS.findall(console)]


def _goes_on(console: str, saved: int, who: str) -> bool | None:
    """True once a restored guest printed a pass line above ``saved`` (None before)."""
    if READY in console:
        raise RuntimeError(f"{who}: the guest booted afresh instead of going on:\n{console}")
    passes = _passes(console, who)
    if not passes:
        return None
    if passes[0] <= saved:
        raise RuntimeError(f"{who}: the guest printed pass {passes[0]}, saved in pass {saved}")
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class KasouVm:
    """A ``kasou run`` in the background: COM1 in a file, a control socket, kasou's stderr
    lines kept as they come (its KASOU_TRACE_START stamps)."""

    def __init__(self, folder: Path, name: str, args: Sequence[str]) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        self.sock = folder / f"{name}.sock"
        self.stderr: list[str] = []
        self.started_ns = time.monotonic_ns()
        self.process = subprocess.Popen(
            [
                kasou_peer.KASOU,
                "run",
                *args,
                "--console",
                f"file:{self.log}",
                "--api-sock",
                str(self.sock),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "KASOU_TRACE_START": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line.rstrip("\n"))

    def wait_stderr(self, prefix: str) -> str:
        """The first stderr line starting with ``prefix``, once kasou has printed it."""

        def find() -> str | None:
            ended = self.process.poll() is not None and not self._reader.is_alive()
            for line in list(self.stderr):
                if line.startswith(prefix):
                    return line
            if ended:
                shown = "\n".join(self.stderr)
                raise RuntimeError(f"kasou ({self.name}) ended before {prefix!r}:\n{shown}")
            return None

        return _until(f"{prefix!r} from kasou ({self.name})", find)

    def stamp(self, what: str) -> int:
        """The CLOCK_MONOTONIC ns of ``kasou: WHAT at NS``."""
        return int(self.wait_stderr(f"kasou: {what} at ").rsplit(" ", 1)[1])

    def console(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def went_on(self, saved: int) -> bool | None:
        """Whether the guest went on from pass ``saved`` (``_goes_on``) on its console."""
        return _goes_on(self.console(), saved, f"kasou ({self.name})")

    def request(self, *args: str) -> dict[str, Any]:
        """``kasou ARGS --sock SOCK --json``: its JSON answer."""
        done = subprocess.run(
            [kasou_peer.KASOU, *args, "--sock", str(self.sock), "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        try:
            answer: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"kasou {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            ) from None
        return answer

    def migrate(self, url: str) -> dict[str, Any]:
        """Migrate to ``url`` as `kasou migrate --json` does (the ``migrate`` request, then
        ``migration`` polled until it ends; its last answer is what the CLI prints), polling
        every 20 ms to add ``throttle_peak``: the final answer shows the throttle lifted. One
        client only: the source exits once a client has read the final answer."""
        from kasou.client.control import ControlClient

        peak = 0.0
        with ControlClient(self.sock, timeout=120.0) as client:
            client.request("migrate", url=url, downtime=DOWNTIME)
            while True:
                progress = client.request("migration")
                peak = max(peak, float(progress["throttle"]))
                if progress["phase"] in ("completed", "failed", "cancelled"):
                    return {**progress, "throttle_peak": peak}
                time.sleep(0.02)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)


def _snapshot_ram(folder: Path, memory: int) -> MemoryFile:
    """A kasou snapshot's memory file read by guest-physical address (for read_status)."""
    from kasou.arch.x86_64.layout import ram_layout
    from kasou.vmm.snapshot import MEMORY_FILE

    return MemoryFile(folder / MEMORY_FILE, ram_layout(memory))


# --- kasou ---------------------------------------------------------------------------------


def _boot_kasou(elf: Path, folder: Path, name: str, mib: int, guest: str) -> KasouVm:
    vm = KasouVm(folder, name, ["--kernel", str(elf), "--memory", f"{mib}M", "--cmdline", guest])
    try:
        _until(f"memcheck under kasou ({name})", lambda: _passes(vm.console(), name) or None)
    except BaseException:
        vm.close()
        raise
    return vm


def kasou_save(
    elf: Path, mib: int, repeats: int, folder: Path
) -> tuple[list[dict[str, Any]], Path]:
    """``repeats`` snapshots of a running ``mib`` MiB guest; the last one's folder is kept."""
    vm = _boot_kasou(elf, folder, f"save{mib}", mib, SAVE_GUEST)
    results: list[dict[str, Any]] = []
    path = folder / "none"
    try:
        for index in range(repeats):
            previous, path = path, folder / f"snap{mib}-{index}"
            result = vm.request("snapshot", "create", str(path))
            if result.get("state") != "running":
                raise RuntimeError(f"kasou snapshot create left the VM {result.get('state')}")
            results.append(result)
            shutil.rmtree(previous, ignore_errors=True)
        seen = len(_passes(vm.console(), vm.name))
        _until(f"kasou's guest ({vm.name}) to go on after its snapshots",
               lambda: len(_passes(vm.console(), vm.name)) > seen or None)  # fmt: skip
    finally:
        vm.close()
    return results, path


def kasou_restore(snapshot: Path, mib: int, folder: Path, name: str) -> tuple[float, float]:
    """Seconds from ``restore begins`` and from exec to the first KVM_RUN, once the
    restored guest has gone on from the pass it was saved in."""
    saved = read_status(_snapshot_ram(snapshot, mib << 20)).pass_
    vm = KasouVm(folder, name, ["--restore", str(snapshot)])
    try:
        first = vm.stamp("first KVM_RUN")
        begins = vm.stamp("restore begins")
        _until(f"the guest restored by kasou ({name}) to go on", partial(vm.went_on, saved))
        return (first - begins) / 1e9, (first - vm.started_ns) / 1e9
    finally:
        vm.close()


def kasou_migrations(
    elf: Path, guest: str, repeats: int, folder: Path, tag: str
) -> list[dict[str, Any]]:
    """``repeats`` migrations of one VM, each from the destination of the one before."""
    source = _boot_kasou(elf, folder, f"{tag}0", MIGRATE_MIB, guest)
    results: list[dict[str, Any]] = []
    try:
        for hop in range(1, repeats + 1):
            port = _free_port()
            destination = KasouVm(folder, f"{tag}{hop}", ["--incoming", f"tcp://127.0.0.1:{port}"])
            try:
                destination.wait_stderr("kasou: waiting for a migration")
                result = source.migrate(f"tcp://127.0.0.1:{port}")
                if result["phase"] != "completed":
                    raise RuntimeError(f"kasou migrate {result['phase']}: {result['error']}")
                source.process.wait(30)
                last = max(_passes(source.console(), source.name), default=-1)
                _until(f"the migrated guest ({destination.name}) to go on",
                       partial(destination.went_on, last))  # fmt: skip
            except BaseException:
                destination.close()
                raise
            results.append(result)
            source.close()
            source = destination
    finally:
        source.close()
    return results


# --- QEMU ----------------------------------------------------------------------------------


def _qemu(elf: Path, guest: str, mib: int, extra: Sequence[str] = ()) -> qemu_peer.QemuGuest:
    return qemu_peer.QemuGuest(elf, guest, kvm=True, qmp=True, memory_mib=mib, extra=extra)


def _qemu_migrate(vm: qemu_peer.QemuGuest, uri: str) -> dict[str, Any]:
    """QMP ``migrate`` to ``uri`` until it ends; query-migrate's last answer. One that has
    not ended in QEMU_MIGRATION_LIMIT seconds is cancelled (status "cancelled");
    ``throttle-peak`` is the highest ``cpu-throttle-percentage`` seen."""
    vm.qmp("migrate-set-parameters", {"max-bandwidth": UNCAPPED})
    vm.qmp("migrate", {"uri": uri})
    deadline = time.monotonic() + QEMU_MIGRATION_LIMIT
    peak = 0  # cpu-throttle-percentage shows only while it throttles
    while True:
        info: dict[str, Any] = vm.qmp("query-migrate")  # type: ignore[assignment]
        peak = max(peak, int(info.get("cpu-throttle-percentage", 0)))
        if info.get("status") in ("completed", "failed", "cancelled"):
            return {**info, "throttle-peak": peak}
        if time.monotonic() > deadline:
            vm.qmp("migrate_cancel")
            return {**info, "status": "cancelled", "throttle-peak": peak}
        time.sleep(0.02)


def _saved_pass(vm: qemu_peer.QemuGuest) -> int:
    """The pass memcheck was in when QEMU stopped the guest (it is paused after migrate)."""
    return vm.read_u64(MEMCHECK_STATUS_GPA + PASS_OFFSET)


def _qemu_goes_on(vm: qemu_peer.QemuGuest, saved: int, who: str) -> None:
    line = vm.wait_for("memcheck: pass", WAIT)
    _goes_on("\n".join(vm.texts), saved, who)
    if int(line.text.rsplit(" ", 1)[1]) <= saved:
        raise RuntimeError(f"{who}: the guest printed {line.text!r}, saved in pass {saved}")


def qemu_save(elf: Path, mib: int, repeats: int, folder: Path) -> tuple[list[Any], Path, int]:
    """``repeats`` saves of a running ``mib`` MiB guest to files: (query-migrate, file size)
    each, the last file (kept) and the pass it was saved in."""
    results: list[Any] = []
    path = folder / "none"
    with _qemu(elf, SAVE_GUEST, mib) as vm:
        vm.wait_for("memcheck: pass", WAIT)
        for index in range(repeats):
            if index:
                vm.qmp("cont")
            previous, path = path, folder / f"qemu{mib}-{index}.mig"
            info = _qemu_migrate(vm, f"exec:cat > {path}")
            if info["status"] != "completed":
                raise RuntimeError(f"QEMU's migrate to a file ended {info['status']}: {info}")
            results.append((info, path.stat().st_size))
            previous.unlink(missing_ok=True)
        saved = _saved_pass(vm)
    return results, path, saved


def qemu_restore(elf: Path, mib: int, path: Path, saved: int) -> tuple[float, float]:
    """Seconds from ``migrate-incoming`` and from QEMU's exec to running, once the guest
    has gone on from the pass it was saved in."""
    started = time.monotonic()
    with _qemu(elf, SAVE_GUEST, mib, ["-incoming", "defer"]) as vm:
        vm.qmp("query-status")  # QEMU is up
        sent = time.monotonic()
        vm.qmp("migrate-incoming", {"uri": f"exec:cat {path}"})
        deadline = sent + WAIT
        while True:
            status: dict[str, Any] = vm.qmp("query-status")  # type: ignore[assignment]
            if status["status"] == "running":
                running = time.monotonic()
                break
            if time.monotonic() > deadline or status["status"] not in ("inmigrate", "paused"):
                raise RuntimeError(f"QEMU's restore from {path} is {status['status']}")
            time.sleep(0.001)
        _qemu_goes_on(vm, saved, "QEMU restore")
    return running - sent, running - started


def qemu_migrations(elf: Path, guest: str, repeats: int) -> list[dict[str, Any]]:
    """``repeats`` migrations of one VM between QEMUs, each from the last destination."""
    source = _qemu(elf, guest, MIGRATE_MIB)
    results: list[dict[str, Any]] = []
    try:
        source.wait_for("memcheck: pass", WAIT)
        for _ in range(repeats):
            port = _free_port()
            destination = _qemu(elf, guest, MIGRATE_MIB, ["-incoming", f"tcp:127.0.0.1:{port}"])
            try:
                destination.qmp("query-status")  # listening once QMP answers
                capability = {"capability": "auto-converge", "state": True}
                source.qmp("migrate-set-capabilities", {"capabilities": [capability]})
                info = _qemu_migrate(source, f"tcp:127.0.0.1:{port}")
                results.append(info)
                if info["status"] != "completed":
                    destination.close()  # the source runs on: send it again
                    continue
                _qemu_goes_on(destination, _saved_pass(source), "QEMU migration")
            except BaseException:
                destination.close()
                raise
            source.close()
            source = destination
    finally:
        source.close()
    return results


# --- the tables ----------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


class _Table:
    """Rows of one figure: guest, figure, kasou, QEMU, kasou/QEMU, target."""

    def __init__(self, title: str, with_qemu: bool) -> None:
        self.with_qemu = with_qemu
        print(f"\n   {title}")
        print(
            f"   {'guest':<10} {'figure':<22} {'kasou':>12} {'QEMU':>12} {'kasou/QEMU':>10}  target"
        )

    def row(
        self,
        guest: str,
        figure: str,
        kasou: float | str,
        qemu: float | str | None,
        shown: Callable[[float], str],
        target: str = "",
    ) -> None:
        kasou_text = shown(kasou) if isinstance(kasou, float | int) else kasou
        if not self.with_qemu:
            qemu_text, ratio = "(no QEMU)", ""
        elif qemu is None:
            qemu_text, ratio = "-", ""
        else:
            qemu_text = shown(qemu) if isinstance(qemu, float | int) else qemu
            both = isinstance(kasou, float | int) and isinstance(qemu, float | int) and qemu
            ratio = f"{kasou / qemu:.2f}x" if both else ""  # type: ignore[operator]
        print(f"   {guest:<10} {figure:<22} {kasou_text:>12} {qemu_text:>12} {ratio:>10}  {target}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s"


def _mbs(rate: float) -> str:
    return f"{rate:,.0f} MB/s"


def _mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def bench_snapshot(elf: Path, repeats: int, with_qemu: bool, folder: Path | None = None) -> None:
    """Prints the snapshot section: snapshot write, restore, live migration."""
    print(f"\n## snapshot, restore, live migration (guest kit memcheck, median of {repeats} runs)")
    print("   definitions: bench/snapshot.py; ratios are kasou/QEMU (time: below 1 is better)")
    if folder is None and SHM.is_dir():
        folder = SHM
    where = "tmpfs, the VMMs' own cost" if folder == SHM else "not tmpfs: kasou's fsync counts"
    print(f"   snapshot files in {folder or tempfile.gettempdir()} ({where})")
    with tempfile.TemporaryDirectory(prefix="kasou-bench-snap-", dir=folder) as tmp:
        scratch = Path(tmp)
        saves: dict[int, tuple[list[dict[str, Any]], Path]] = {}
        qemu_saves: dict[int, tuple[list[Any], Path, int]] = {}
        for mib in SAVE_SIZES:
            saves[mib] = kasou_save(elf, mib, repeats, scratch)
            if with_qemu:
                qemu_saves[mib] = qemu_save(elf, mib, repeats, scratch)

        table = _Table(
            "snapshot write (kasou snapshot create; QEMU migrate to exec:cat > FILE)", with_qemu
        )
        for mib in SAVE_SIZES:
            results = saves[mib][0]
            qemu = qemu_saves.get(mib)
            seconds = _median([r["seconds"] for r in results])
            rate = _median([r["bytes"] / max(r["seconds"], 1e-6) / 1e6 for r in results])
            paused = _median([r["paused_seconds"] for r in results])
            written = _median([r["bytes"] for r in results])
            q_seconds = q_rate = q_paused = q_bytes = None
            if qemu is not None:
                q_seconds = _median([info["total-time"] / 1e3 for info, _ in qemu[0]])
                q_rate = _median(
                    [size / max(info["total-time"], 1) / 1e3 for info, size in qemu[0]]
                )
                q_paused = _median([info["downtime"] / 1e3 for info, _ in qemu[0]])
                q_bytes = _median([size for _, size in qemu[0]])
            guest = _size(mib)
            table.row(guest, "time", seconds, q_seconds, _s)
            table.row(guest, "write rate", rate, q_rate, _mbs)
            table.row(guest, "guest paused", paused, q_paused, _ms)
            table.row(guest, "memory / file bytes", written, q_bytes, _mib)

        restores: dict[int, list[tuple[float, float]]] = {}
        qemu_restores: dict[int, list[tuple[float, float]]] = {}
        for mib in SAVE_SIZES:
            restores[mib] = [
                kasou_restore(saves[mib][1], mib, scratch, f"restore{mib}-{index}")
                for index in range(repeats)
            ]
            if with_qemu:
                _, path, saved = qemu_saves[mib]
                qemu_restores[mib] = [qemu_restore(elf, mib, path, saved) for _ in range(repeats)]
        table = _Table(
            "restore to running (kasou run --restore; QEMU -incoming defer + migrate-incoming)",
            with_qemu,
        )
        for mib in SAVE_SIZES:
            guest = _size(mib)
            samples = restores[mib]
            qemu_samples = qemu_restores.get(mib)
            table.row(
                guest,
                "restore → first run",
                _median([restore for restore, _ in samples]),
                _median([restore for restore, _ in qemu_samples]) if qemu_samples else None,
                _ms,
                "≤ 10 ms, flat in size",
            )
            table.row(
                guest,
                "process start → run",
                _median([start for _, start in samples]),
                _median([start for _, start in qemu_samples]) if qemu_samples else None,
                _ms,
            )
        print("   (kasou: first KVM_RUN; QEMU: query-status running; every guest went on)")

        table = _Table(
            "live migration, 1 GiB guest, loopback TCP (kasou migrate; QEMU migrate tcp:)",
            with_qemu,
        )
        targets = {"idle": "downtime ≤ 50 ms", "250 MiB/s": "converges, downtime ≤ 300 ms"}
        for name, guest_cmdline in MIGRATIONS:
            tag = "idle" if name == "idle" else "dirty"
            results = kasou_migrations(elf, guest_cmdline, repeats, scratch, tag)
            qemu_results = qemu_migrations(elf, guest_cmdline, repeats) if with_qemu else []
            _migration_rows(table, name, results, qemu_results, targets[name])
        print("   (each guest went on at every destination. downtime: kasou's is the source's")
        print("   pause until the destination says RUNNING, so it holds the destination's build")
        print("   of the VM; QEMU's is its source's stop until it has sent the last byte.")
        print("   rounds: copy passes, the paused one included; QEMU's dirty-sync-count)")


def _migration_rows(
    table: _Table,
    name: str,
    results: list[dict[str, Any]],
    qemu: list[dict[str, Any]],
    target: str,
) -> None:
    completed = [info for info in qemu if info.get("status") == "completed"]
    q_ok = completed or None

    def q(pick: Callable[[dict[str, Any]], float]) -> float | None:
        return _median([pick(info) for info in completed]) if q_ok else None

    table.row(name, "total time", _median([r["seconds"] for r in results]),
              q(lambda i: i["total-time"] / 1e3), _s)  # fmt: skip
    table.row(name, "downtime", _median([r["downtime"] for r in results]),
              q(lambda i: i["downtime"] / 1e3), _ms, target)  # fmt: skip
    table.row(name, "rounds", float(_median([r["round"] + 1 for r in results])),
              q(lambda i: i["ram"]["dirty-sync-count"]), lambda v: f"{v:.0f}")  # fmt: skip
    table.row(name, "bytes sent", _median([r["bytes_sent"] for r in results]),
              q(lambda i: i["ram"]["transferred"]), _mib)  # fmt: skip
    # QEMU computes its dirty rate over whole seconds: 0 in a shorter migration.
    q_rate = q(lambda i: i["ram"]["dirty-pages-rate"] * 4096 / 1e6)
    table.row(name, "dirty rate (last round)", _median([r["dirty_rate"] for r in results]) / 1e6,
              q_rate or None, _mbs)  # fmt: skip
    throttle = f"{max(r['throttle_peak'] for r in results):.0%}"
    q_throttle = f"{max(i['throttle-peak'] for i in qemu)}%" if qemu else None
    table.row(name, "throttle (max)", throttle, q_throttle, str)
    converged = sum(r["expected_downtime"] <= r["downtime_target"] for r in results)
    q_converged = f"{len(completed)}/{len(qemu)}" if qemu else None
    table.row(name, "converged", f"{converged}/{len(results)}", q_converged, str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="folder for snapshots (default: /dev/shm)")
    options = parser.parse_args(argv)

    from kasou.guestkit import build_guest

    with_qemu = shutil.which(qemu_peer.QEMU) is not None and qemu_peer.kvm_usable()
    if not with_qemu:
        print("QEMU with KVM is not available here: kasou's figures only")
    bench_snapshot(build_guest(), options.repeats, with_qemu, options.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
