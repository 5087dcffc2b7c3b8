"""The web console in a real browser: Debian's Chromium, driven by Playwright, on a live
kasoud listening on 127.0.0.1 with a bearer token.

The guest is the guest kit's echo workload (it prints ``echo: ready``, then writes back every
byte it reads from COM1), which runs on PVM; typing ``uname -a`` at a shell and reading the
answer needs the default guest, which boots only in the nested host (tests/nested).

With ``KASOU_SCREENSHOTS=1`` the test also writes the README's screenshots to docs/img/.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kasou.guestkit import cmdline

CHROMIUM = Path("/usr/bin/chromium")
KASOUD = str(Path(sys.executable).with_name("kasoud"))
ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "src" / "kasou" / "api" / "web" / "vendor"
SCREENSHOTS = ROOT / "docs" / "img"
BOOT_TIMEOUT_MS = 60_000
METRICS_MS = 15_000

if not CHROMIUM.exists():
    pytest.skip(
        f"the browser test needs Debian's chromium at {CHROMIUM}: run `make setup`",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@dataclass
class Kasoud:
    url: str
    token: str
    api: httpx.Client
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:  # another process's start-up, with a deadline
        assert process.poll() is None, f"kasoud exited:\n{log.read_text()}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"kasoud did not listen:\n{log.read_text()}"
        time.sleep(0.02)


@pytest.fixture
def kasoud() -> Iterator[Kasoud]:
    """A kasoud with its own state dir, on a Unix socket and on TCP 127.0.0.1 with a token;
    every VM it still has is deleted (with force) before it is stopped."""
    assert (VENDOR / "xterm.mjs").exists(), f"{VENDOR} is empty: run `make setup`"
    state = Path(tempfile.mkdtemp(dir="/tmp", prefix="kw"))
    token = secrets.token_urlsafe(24)
    token_file = state / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = _free_port()
    log = state / "kasoud.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                KASOUD,
                "--state-dir",
                str(state / "s"),
                "--socket",
                str(state / "d.sock"),
                "--tcp",
                f"127.0.0.1:{port}",
                "--token-file",
                str(token_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    try:
        _wait_listening(process, port, log)
        yield Kasoud(url, token, api, log)
    finally:
        with contextlib.suppress(httpx.HTTPError):
            for vm in api.get("/v1/vms").json():
                api.delete(f"/v1/vms/{vm['name']}", params={"force": "true"})
        api.close()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which the tests are.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def _screenshot(page: Page, name: str, settle_ms: int = 0) -> None:
    """With KASOU_SCREENSHOTS=1, docs/img/web-NAME.png; ``settle_ms`` lets the graphs
    gather samples first (a picture's looks, nothing the test checks)."""
    if os.environ.get("KASOU_SCREENSHOTS") == "1":
        page.wait_for_timeout(settle_ms)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"web-{name}.png"))


def test_create_type_in_the_console_snapshot_and_stop(
    kasoud: Kasoud, page: Page, guest_elf: Path, tmp_path: Path
) -> None:
    page.goto(f"{kasoud.url}/?token={kasoud.token}")
    # The token moves to sessionStorage: it does not stay in the address bar (or history).
    page.wait_for_url(f"{kasoud.url}/")
    expect(page.locator("#vm-empty")).to_be_visible()

    # The echo guest reads more bytes than the test types, so it keeps running until stopped.
    page.fill("#create-form input[name=name]", "web-1")
    page.fill("#create-form input[name=kernel]", str(guest_elf))
    page.fill("#create-form input[name=memory]", "64M")
    page.fill("#create-form input[name=cmdline]", "console=ttyS0 " + cmdline("echo", n=64))
    page.click("#create-form button[type=submit]")

    row = page.locator('#vm-rows tr[data-vm="web-1"]')
    expect(row.locator("td.state")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    expect(page.locator("#detail-name")).to_have_text("web-1")
    terminal = page.locator("#terminal .xterm-rows")
    expect(terminal).to_contain_text("echo: ready n=64", timeout=BOOT_TIMEOUT_MS)
    expect(terminal).not_to_contain_text("uname")

    page.locator("#terminal").click()
    page.keyboard.type("uname")
    page.keyboard.press("Enter")
    expect(terminal).to_contain_text("uname", timeout=BOOT_TIMEOUT_MS)
    assert "uname" in kasoud.api.get("/v1/vms/web-1/logs").text  # the guest wrote it back

    # A snapshot from the button: an operation the page follows to its end.
    page.fill("#snapshot-form input[name=path]", str(tmp_path / "snap"))
    page.click("#snapshot-form button[type=submit]")
    expect(page.locator("#snapshot-status")).to_contain_text("written", timeout=BOOT_TIMEOUT_MS)
    assert (tmp_path / "snap" / "state.kasou").is_file()
    expect(row.locator("td.state")).to_have_text("running")  # and the VM runs on

    # The daemon's events reach the log, and the figures from /metrics reach the graphs.
    events = page.locator("#event-log li")
    expect(events.filter(has_text="web-1").first).to_be_visible()
    # a rate needs two scrapes, REFRESH_MS (2 s) apart
    expect(page.locator('[data-value="memory"]')).to_contain_text("iB", timeout=METRICS_MS)
    expect(row.locator("td.num").first).to_contain_text("%", timeout=METRICS_MS)
    _screenshot(page, "overview", settle_ms=40_000)

    # A problem+json answer shows in the banner: the name is taken.
    page.fill("#create-form input[name=name]", "web-1")
    page.fill("#create-form input[name=kernel]", str(guest_elf))
    page.click("#create-form button[type=submit]")
    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("web-1")
    _screenshot(page, "error")
    page.click("#banner-close")
    expect(banner).to_be_hidden()

    page.click('#detail button[data-action="stop"]')
    expect(row.locator("td.state")).to_have_text("stopped", timeout=BOOT_TIMEOUT_MS)
    expect(page.locator("#console-status")).to_contain_text("closed")
    assert kasoud.api.get("/v1/vms/web-1").json()["state"] == "stopped"

    page.click("#delete")
    page.click("#delete")  # the second click confirms
    expect(row).to_have_count(0)
    assert kasoud.api.get("/v1/vms").json() == []


def test_a_bad_spec_is_refused_in_the_banner(kasoud: Kasoud, page: Page) -> None:
    page.goto(f"{kasoud.url}/?token={kasoud.token}")
    page.fill("#create-form input[name=name]", "nokernel")
    page.fill("#create-form input[name=kernel]", "/tmp/kasou-no-such-kernel")
    page.click("#create-form button[type=submit]")
    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("kernel")
    expect(page.locator('#vm-rows tr[data-vm="nokernel"]')).to_have_count(0)
    assert kasoud.api.get("/v1/vms").json() == []


def test_without_the_token_the_page_says_how_to_get_in(kasoud: Kasoud, page: Page) -> None:
    page.goto(kasoud.url + "/")
    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("token")
    expect(page.locator("#vm-rows tr")).to_have_count(0)
    # Only the page and its files are public; ?token= stands in for the header only where a
    # browser cannot set one (the console WebSocket, the event stream).
    bare = httpx.Client(base_url=kasoud.url, timeout=30)
    with bare:
        assert bare.get("/static/app.js").status_code == 200
        assert bare.get("/v1/vms").status_code == 401
        assert bare.get("/v1/vms", params={"token": kasoud.token}).status_code == 401
        assert bare.get("/v1/events", params={"token": "wrong"}).status_code == 401
