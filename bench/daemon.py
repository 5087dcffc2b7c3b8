"""The host daemon's figures: how fast kasoud starts VMs and answers, and what a VM costs.

- request -> first KVM_RUN: a ``POST /v1/vms?start=true`` to kasoud, timed from just before
  the request to the boot vCPU's first KVM_RUN (CLOCK_MONOTONIC, stamped by the VM process in
  its stderr.log when KASOU_TRACE_START is set, which the warm template passes on), beside
  ``kasou run`` exec'd cold and QEMU exec'd (its ``kvm_vcpu_ioctl`` trace event), all booting
  the guest kit's ELF;
- create -> running rate: VMs per second for N started at once (each its own request, from N
  threads), until kasoud reports every one running;
- PSS per VM: proportional set size of each VM process outside its guest RAM mapping
  (/proc/PID/smaps), averaged, with 1, 10 and 50 VMs running (the template's pages are
  shared by all, so the figure falls as VMs are added);
- API latency: ``GET /v1/vms/NAME`` paced at 200 requests/s (open loop: a late answer does
  not delay the next request) with 50 VMs running, p50 and p99.

Run alone: ``.venv/bin/python bench/daemon.py``; in ``make bench`` as ``--only daemon``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kasou_peer
import qemu_peer
from kasou.guestkit import build_guest, cmdline

KASOUD = str(Path(sys.executable).with_name("kasoud"))
GUEST_MEMORY = "64M"
FIRST_RUN = "kasou: first KVM_RUN at "
TIMEOUT = 60.0


@contextmanager
def kasoud(folder: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """A kasoud on a Unix socket in ``folder``, its VMs deleted and it stopped at the end."""
    state, sock = folder / "state", folder / "kasoud.sock"
    env = {**os.environ, "KASOU_TRACE_START": "1"}
    process = subprocess.Popen(
        [KASOUD, "--state-dir", str(state), "--socket", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://kasoud", timeout=TIMEOUT
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                client.get("/v1/host").raise_for_status()
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    stderr = process.stderr.read().decode() if process.stderr else ""
                    raise RuntimeError(f"kasoud did not start: {stderr}") from None
                time.sleep(0.05)
        yield client, state
    finally:
        try:
            for vm in client.get("/v1/vms").json():
                client.delete(f"/v1/vms/{vm['name']}", params={"force": "true"})
        except httpx.HTTPError:
            pass  # kasoud died: its VMs are reported by the caller's figures already
        client.close()
        process.terminate()
        process.wait(30)


def _spec(name: str, elf: Path, workload: str = "wait") -> dict[str, object]:
    return {
        "name": name,
        "kernel": str(elf),
        "memory": GUEST_MEMORY,
        "cmdline": f"console=ttyS0 {cmdline(workload)}",
    }


def _first_run_ns(log: Path) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(FIRST_RUN):
                    return int(line.rsplit(" ", 1)[1])
        time.sleep(0.0005)
    raise RuntimeError(f"no first KVM_RUN stamp in {log}")


def template_start(client: httpx.Client, state: Path, elf: Path, name: str) -> float:
    start = time.monotonic_ns()
    reply = client.post("/v1/vms", params={"start": "true"}, json=_spec(name, elf))
    reply.raise_for_status()
    first = _first_run_ns(state / "vms" / name / "stderr.log")
    client.delete(f"/v1/vms/{name}", params={"force": "true"}).raise_for_status()
    return (first - start) / 1e9


def cold_start(elf: Path) -> float:
    start = time.monotonic_ns()
    run = kasou_peer.run_guest(elf, "kasou.test=hello", env={"KASOU_TRACE_START": "1"})
    for line in run.stderr.splitlines():
        if line.startswith(FIRST_RUN):
            return (int(line.rsplit(" ", 1)[1]) - start) / 1e9
    raise RuntimeError(f"kasou printed no start mark: {run.stderr}")


def qemu_start(elf: Path, folder: Path) -> float:
    trace = folder / "qemu-trace.log"
    command = qemu_peer.qemu_command(elf, "kasou.test=wait", kvm=True, memory_mib=64)
    start = time.time()
    process = subprocess.Popen(
        # The trace lines carry "PID@SECONDS.MICROS:" only with -msg timestamp=on.
        [*command, "-msg", "timestamp=on", "-trace", f"enable=kvm_vcpu_ioctl,file={trace}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return qemu_peer.first_kvm_run_seconds(trace, start, TIMEOUT)
    finally:
        process.kill()
        process.wait()
        trace.unlink(missing_ok=True)


def _wait_running(client: httpx.Client, names: set[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        states = {vm["name"]: vm["state"] for vm in client.get("/v1/vms").json()}
        failed = [name for name in names if states.get(name) == "failed"]
        if failed:
            raise RuntimeError(f"VMs failed to start: {failed}")
        if all(states.get(name) == "running" for name in names):
            return
        time.sleep(0.005)
    raise RuntimeError("VMs did not all reach running")


def start_many(client: httpx.Client, elf: Path, prefix: str, count: int) -> float:
    """Seconds from the first request to every one of ``count`` VMs running."""
    names = {f"{prefix}{i}" for i in range(count)}
    errors: list[str] = []

    def create(name: str) -> None:
        reply = client.post("/v1/vms", params={"start": "true"}, json=_spec(name, elf))
        if reply.status_code != 201:
            errors.append(reply.text)

    start = time.monotonic()
    threads = [threading.Thread(target=create, args=(name,)) for name in sorted(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"kasoud refused VMs: {errors[:3]}")
    _wait_running(client, names)
    return time.monotonic() - start


def pss_outside_guest(pid: int, guest_bytes: int) -> int:
    """Bytes of PSS of ``pid`` in mappings smaller than guest RAM (/proc/PID/smaps)."""
    total, counted = 0, True
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                low, high = (int(part, 16) for part in first.split("-"))
                counted = high - low < guest_bytes
            elif first == "Pss:" and counted:
                total += int(line.split()[1]) * 1024
    return total


def mean_pss(client: httpx.Client) -> float:
    pids = [vm["pid"] for vm in client.get("/v1/vms").json() if vm.get("pid")]
    return statistics.mean(pss_outside_guest(pid, 64 << 20) for pid in pids)


def api_latency(client: httpx.Client, names: list[str], rate: int, seconds: float) -> list[float]:
    """Latencies of GET /v1/vms/NAME sent on a fixed schedule of ``rate`` per second."""
    total = int(rate * seconds)
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.monotonic()
    slots = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                index = next(slots, None)
            if index is None:
                return
            due = start + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the open-loop schedule, not a wait for a result
            sent = time.monotonic()
            client.get(f"/v1/vms/{names[index % len(names)]}").raise_for_status()
            with lock:
                latencies.append(time.monotonic() - sent)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_daemon(elf: Path, repeats: int, with_qemu: bool, scale: int = 50) -> None:
    print("\n## the host daemon (kasoud): starting VMs, memory per VM, API latency")
    folder = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    try:
        with kasoud(folder) as (client, state):
            runs = max(repeats * 4, 20)
            warm = [template_start(client, state, elf, f"s{i}") for i in range(runs)]
            cold = [cold_start(elf) for _ in range(repeats)]
            qemu = [qemu_start(elf, folder) for _ in range(repeats)] if with_qemu else []
            print("   request -> first KVM_RUN (guest kit ELF, 64 MiB; target ≤ 10 ms)")
            print(
                f"   kasoud (warm template): median {statistics.median(warm) * 1e3:.1f} ms, "
                f"p99 {_percentile(warm, 0.99) * 1e3:.1f} ms over {runs}"
            )
            print(f"   kasou run (cold):       median {statistics.median(cold) * 1e3:.1f} ms")
            if qemu:
                median_qemu = statistics.median(qemu)
                print(
                    f"   QEMU (exec):            median {median_qemu * 1e3:.1f} ms; kasoud/QEMU "
                    f"{statistics.median(warm) / median_qemu:.2f}"
                )
            rate_count = min(scale, 20)
            seconds = start_many(client, elf, "r", rate_count)
            print(f"   create -> running: {rate_count} VMs at once in {seconds:.2f} s, "
                  f"{rate_count / seconds:.1f} VMs/s")  # fmt: skip
            for vm in client.get("/v1/vms").json():
                client.delete(f"/v1/vms/{vm['name']}", params={"force": "true"})
            print("   PSS per VM outside guest RAM (target ≤ 10 MiB):")
            running = 0
            for count in (1, 10, scale):
                start_many(client, elf, f"p{running}-", count - running)
                running = count
                print(f"     {count:>3} VMs: {mean_pss(client) / (1 << 20):.1f} MiB")
            names = [vm["name"] for vm in client.get("/v1/vms").json()]
            latencies = api_latency(client, names, rate=200, seconds=5.0)
            print(
                f"   GET /v1/vms/NAME at 200/s with {len(names)} VMs: p50 "
                f"{_percentile(latencies, 0.5) * 1e3:.2f} ms, p99 "
                f"{_percentile(latencies, 0.99) * 1e3:.2f} ms ({len(latencies)} requests)"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=50, help="VMs for the PSS and API figures")
    args = parser.parse_args()
    bench_daemon(build_guest(), args.repeats, qemu_peer.kvm_usable(), args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
