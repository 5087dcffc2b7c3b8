"""The web console against the default Linux guest: Debian's Chromium, driven by Playwright on
this host, and kasoud inside a nested host, reached through a forwarded port.

This host's /dev/kvm (PVM) cannot run Linux to user space, and Chromium cannot reasonably run
under TCG, so the two are split::

    this host                                      nested host (QEMU TCG, real /dev/kvm)
    Chromium ── 127.0.0.1:PORT ── kasou nested --forward PORT:8480 ── kasoud --tcp 0.0.0.0:8480
                                                                       └── the default guest

The page creates a VM of the default guest with its form (no kernel: kasoud's default), the
test types ``uname -a`` into xterm and reads the answer from the terminal's rows, then stops
the VM from the page. kasoud's token and log sit in a folder shared with the nested host.

Each wait has a deadline. The nested host now and then hangs while booting under TCG: then
it is killed and booted once more, and the test says so if the second one hangs too. With
``KASOU_SCREENSHOTS=1`` the test writes docs/img/web-console-linux.png.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kasou.errors import KasouError
from kasou.nested import nested_available

CHROMIUM = Path("/usr/bin/chromium")
KASOU = str(Path(sys.executable).with_name("kasou"))
KASOUD = str(Path(sys.executable).with_name("kasoud"))
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "img" / "web-console-linux.png"
GUEST_PORT = 8480
NESTED_TIMEOUT = 900  # seconds the outer VM may live at most, whatever happens here
SERVE_DEADLINE = 240.0  # the nested host's boot and kasoud's start (about 30 s here)
BOOT_ATTEMPTS = 2
VM_MS = 180_000  # the VM created and running, the guest at its shell prompt (~20 s here)
ANSWER_MS = 120_000  # the page's own requests, the answer to uname -a, the VM stopped:
# every wait is given a deadline, none Playwright's 5 s (a busy host under TCG is slow)
PROMPT = "kasou:~#"  # the default guest's PS1 (image/rootfs/etc/profile) on host "kasou"

_REASON = nested_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_REASON is not None, reason=f"no nested host: {_REASON}"),
]

if not CHROMIUM.exists():
    pytest.skip(
        f"the browser test needs Debian's chromium at {CHROMIUM}: run `make setup`",
        allow_module_level=True,
    )

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


def _kernel_release() -> str:
    """The default guest's kernel release, from its bzImage's header: ``kernel_version``
    (offset 0x20e) points, less 0x200, at the version string (Documentation/arch/x86/
    boot.rst, "kernel_version")."""
    from kasou.image import default_guest

    try:
        bzimage = default_guest(build=False).bzimage.read_bytes()
    except KasouError as error:
        pytest.fail(f"{error} (make test builds it before this tier)")
    (pointer,) = struct.unpack_from("<H", bzimage, 0x20E)
    version = bzimage[pointer + 0x200 :].split(b"\0", 1)[0].decode()
    return version.split()[0]


@dataclass
class NestedKasoud:
    url: str
    token: str
    api: httpx.Client


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (the nested host's temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End ``kasou nested``: on SIGTERM it kills its QEMU and removes its temp folder."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(nothing)"


def _serving(
    process: subprocess.Popen[bytes], api: httpx.Client, deadline: float
) -> tuple[bool, str]:
    """Wait until kasoud answers through the forwarded port: (True, "") or (False, why)."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False, f"kasou nested exited with status {process.returncode}"
        try:
            if api.get("/v1/host").status_code == 200:
                return True, ""
        except httpx.TransportError:
            pass  # QEMU takes the connection and drops it until kasoud listens inside
        try:
            process.wait(0.5)  # polling another machine's boot, with a deadline
        except subprocess.TimeoutExpired:
            pass
    return False, f"no answer within {SERVE_DEADLINE:g} s"


@pytest.fixture
def nested_kasoud() -> Iterator[NestedKasoud]:
    """kasoud on TCP with a token, inside a nested host whose port is forwarded here; its VMs
    deleted and the nested host gone (no QEMU left, the temp folder removed) afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="kasou-weblinux-", dir="/tmp"))
    share, private = scratch / "share", scratch / "tmp"
    share.mkdir()
    private.mkdir()
    token = secrets.token_urlsafe(24)
    token_file = share / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    kasoud_log = share / "kasoud.log"
    inner = (
        f"exec {KASOUD} --tcp 0.0.0.0:{GUEST_PORT} --token-file {token_file} "
        f"--state-dir /run/kasou-state --socket /run/kasoud.sock > {kasoud_log} 2>&1"
    )
    process: subprocess.Popen[bytes] | None = None
    api: httpx.Client | None = None
    try:
        why = ""
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            nested_log = scratch / f"nested-{attempt}.log"
            options = ["--forward", f"{port}:{GUEST_PORT}", "--share", str(share)]
            command = [KASOU, "nested", "--timeout", str(NESTED_TIMEOUT), *options]
            with nested_log.open("wb") as out:
                process = subprocess.Popen(
                    [*command, "--", "sh", "-c", inner],
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "TMPDIR": str(private)},
                    start_new_session=True,
                )
            api = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            )
            up, why = _serving(process, api, time.monotonic() + SERVE_DEADLINE)
            if up:
                yield NestedKasoud(url, token, api)
                return
            booted = kasoud_log.exists()  # /init ran the command: the nested host is up
            _stop(process)
            api.close()
            if booted:
                pytest.fail(
                    f"kasoud inside the nested host did not serve ({why}); its log:\n"
                    f"{_tail(kasoud_log)}\nkasou nested said:\n{_tail(nested_log)}"
                )
        pytest.fail(
            f"the nested host did not boot, {BOOT_ATTEMPTS} times ({why}): it hangs now and "
            f"then under TCG; kasou nested said:\n{_tail(nested_log)}"
        )
    finally:
        if api is not None and process is not None and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                for vm in api.get("/v1/vms").json():
                    api.delete(f"/v1/vms/{vm['name']}", params={"force": "true"})
        if api is not None:
            api.close()
        if process is not None:
            _stop(process)
        leftover = _processes_mentioning(str(private))
        left_files = list(private.iterdir())
        shutil.rmtree(scratch, ignore_errors=True)
        assert leftover == [], f"the nested host left processes behind: {leftover}"
        assert left_files == [], f"kasou nested left files behind: {left_files}"


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which the tests are.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(ANSWER_MS)  # clicks, fills, navigation
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
            assert not errors, f"the page threw: {errors}"
        finally:
            browser.close()


def test_the_default_guest_answers_uname_in_the_browser_and_stops(
    nested_kasoud: NestedKasoud, page: Page
) -> None:
    release = _kernel_release()
    page.goto(f"{nested_kasoud.url}/?token={nested_kasoud.token}")
    page.wait_for_url(f"{nested_kasoud.url}/")
    expect(page.locator("#vm-empty")).to_be_visible(timeout=ANSWER_MS)

    # The default guest: no kernel and no command line, as the form's placeholders say.
    page.fill("#create-form input[name=name]", "linux-1")
    page.fill("#create-form input[name=memory]", "256M")
    page.click("#create-form button[type=submit]")
    row = page.locator('#vm-rows tr[data-vm="linux-1"]')
    expect(row.locator("td.state")).to_have_text("running", timeout=VM_MS)
    # The page selects the VM once the create request answers, which may come after the
    # list's refresh has shown it running.
    expect(page.locator("#detail-name")).to_have_text("linux-1", timeout=VM_MS)

    # The rows of xterm's screen: the replayed log tail, then the live console.
    terminal = page.locator("#terminal .xterm-rows")
    expect(terminal).to_contain_text(PROMPT, timeout=VM_MS)
    expect(terminal).not_to_contain_text("GNU/Linux")
    page.locator("#terminal").click()
    page.keyboard.type("uname -a")
    page.keyboard.press("Enter")
    # busybox uname -a: "Linux kasou 6.1.192 #1 SMP ... x86_64 GNU/Linux"
    expect(terminal).to_contain_text(f"Linux kasou {release} ", timeout=ANSWER_MS)
    expect(terminal).to_contain_text("GNU/Linux", timeout=ANSWER_MS)
    assert f"Linux kasou {release}" in nested_kasoud.api.get("/v1/vms/linux-1/logs").text
    if os.environ.get("KASOU_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))

    page.click('#detail button[data-action="stop"]')
    expect(row.locator("td.state")).to_have_text("stopped", timeout=ANSWER_MS)
    expect(page.locator("#console-status")).to_contain_text("closed", timeout=ANSWER_MS)
    assert nested_kasoud.api.get("/v1/vms/linux-1").json()["state"] == "stopped"
