"""Sandbox start: request -> first exec answered, for a ``kasou.Sandbox`` cloned from a template
through kasoud, beside a cold ``kasou run`` of the default guest to its first exec. Run by
``make bench``; on a host whose KVM cannot boot Linux, ``bench/run.py`` runs this inside
``kasou nested``.

- sandbox: from ``Sandbox(template).__enter__`` (the SDK's create request: kasoud's warm
  template forks ``kasou run --restore TEMPLATE --clone``) to the answer of the first
  ``box.exec("echo ready")``; the VM's removal is not counted.
- cold boot: from spawning ``kasou run`` of the default guest (root on virtio-blk, as kasoud
  runs it; 512 MiB like the template) to the answer of its first exec through the control
  socket (``client.execute`` waits for the agent).

Each figure is the median of ``--runs``; the template is made once, through kasoud, first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kasou.cli.demo import launch_default_guest
from kasou.client import ControlClient
from kasou.sdk import Client, Sandbox

TIMEOUT = 180.0
MEMORY = "512M"  # launch_default_guest's


class Kasoud:
    """kasoud on a Unix socket in ``folder``, for the length of the benchmark."""

    def __init__(self, folder: Path) -> None:
        self.sock = folder / "k.sock"
        state = str(folder / "state")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kasou.cli.daemon",
                "--state-dir",
                state,
                "--socket",
                str(self.sock),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(self.sock, timeout=5) as client:
                    client.host()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("kasoud did not come up") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def sandbox_seconds(client: Client, template: Path) -> float:
    started = time.monotonic()
    with Sandbox(template, client, timeout=TIMEOUT, ready_timeout=TIMEOUT) as box:
        answer = box.exec("echo ready")
        elapsed = time.monotonic() - started
        if answer.stdout != "ready\n":
            raise RuntimeError(f"the sandbox answered {answer}")
    return elapsed


def cold_seconds(scratch: Path) -> float:
    booting = launch_default_guest(scratch, 1, root_disk=True)
    try:
        with ControlClient(booting.sock, timeout=TIMEOUT) as control:
            control.execute(["echo", "ready"], timeout=TIMEOUT)  # answered once the agent is up
            elapsed = (time.monotonic_ns() - booting.started_ns) / 1e9
            control.request("stop")
        booting.process.wait(60)
        return elapsed
    finally:
        booting.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="sandbox start, beside a cold kasou run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbs", dir="/tmp") as folder:
        root = Path(folder)
        kasoud = Kasoud(root)
        try:
            with Client(kasoud.sock, timeout=TIMEOUT) as client:
                made = time.monotonic()
                template = Sandbox.make_template(root / "template", client, memory=MEMORY)
                template_s = time.monotonic() - made
                sandbox = [sandbox_seconds(client, template) for _ in range(args.runs)]
        finally:
            kasoud.close()
        s = statistics.median(sandbox)
        print(f"\n## sandbox (default guest, 1 vCPU, {MEMORY}; median of {args.runs})")
        print(f"   {'figure':<22} {'seconds':>9}  definition")
        print(f"   {'sandbox':<22} {s:>8.3f}s  Sandbox(template) request -> first exec answered")
        cold = [cold_seconds(root) for _ in range(args.runs)]
    c = statistics.median(cold)
    print(f"   {'cold kasou run':<22} {c:>8.3f}s  process spawn -> first exec answered")
    print(f"   {'sandbox / cold':<22} {s / c:>8.3f}x")
    print(f"   (the template took {template_s:.1f} s to make: boot, agent, snapshot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
