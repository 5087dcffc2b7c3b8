"""The web console's actions and live views in a real browser, beyond test_web.py's create,
console, snapshot, stop and delete: restore from a snapshot folder and from a backup (into a
new VM and into the same one), a bad restore refused in the page, every lifecycle button, and
the list, event log and graphs following the daemon without a reload.

Same set-up as test_web.py (its fixtures: Debian's Chromium under Playwright, a kasoud on
127.0.0.1 with a token). The guest is the guest kit's echo workload: it prints ``echo: ready
n=N`` once at boot, then writes back each byte it reads from COM1. A VM restored from a
snapshot or a backup goes on from the saved guest: it echoes what is typed without printing
``echo: ready`` again in its own console log, which shows it did not boot.

Every wait is one of Playwright's expectations, with a deadline; nothing sleeps.
"""

# The fixtures (browser, kasoud, page) are test_web.py's, imported: each test's parameter of
# that name is the fixture, not a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Locator, Page, expect

from kasou.guestkit import cmdline

from .test_web import (  # noqa: F401 (browser, kasoud and page are fixtures)
    BOOT_TIMEOUT_MS,
    METRICS_MS,
    Kasoud,
    browser,
    kasoud,
    page,
)

ECHO_BYTES = 4096  # more than the tests type: the guest keeps running until stopped


def _echo_spec(name: str, kernel: Path, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kernel": str(kernel),
        "memory": "64M",
        "cmdline": "console=ttyS0 " + cmdline("echo", n=ECHO_BYTES),
        **fields,
    }


def _create(kasoud: Kasoud, spec: dict[str, Any]) -> None:
    """Declare and start a VM through the API, behind the page's back."""
    answer = kasoud.api.post("/v1/vms", params={"start": "true"}, json=spec)
    assert answer.status_code == 201, answer.text


def _open(page: Page, kasoud: Kasoud) -> None:
    page.goto(f"{kasoud.url}/?token={kasoud.token}")
    expect(page.locator("#events-status")).to_have_text("live")


def _state(page: Page, name: str) -> Locator:
    return page.locator(f'#vm-rows tr[data-vm="{name}"] td.state')


def _select(page: Page, name: str) -> None:
    page.click(f'#vm-rows tr[data-vm="{name}"] td.name')
    expect(page.locator("#detail-name")).to_have_text(name)


def _type_and_see(page: Page, kasoud: Kasoud, name: str, word: str) -> None:
    """Type ``word`` into the selected VM's console: the guest writes it back."""
    terminal = page.locator("#terminal .xterm-rows")
    expect(page.locator("#console-status")).to_have_text("connected", timeout=BOOT_TIMEOUT_MS)
    page.locator("#terminal").click()
    page.keyboard.type(word)
    expect(terminal).to_contain_text(word, timeout=BOOT_TIMEOUT_MS)
    assert word in kasoud.api.get(f"/v1/vms/{name}/logs").text


def _event(page: Page, vm: str, kind: str, *words: str) -> Locator:
    """The event log's entries of ``kind`` about ``vm`` that hold every word."""
    events = page.locator(f'#event-log li[data-kind="{kind}"]').filter(has_text=f"{vm} · ")
    for word in words:
        events = events.filter(has_text=word)
    return events


def _names_and_states(kasoud: Kasoud) -> dict[str, str]:
    return {vm["name"]: vm["state"] for vm in kasoud.api.get("/v1/vms").json()}


def test_snapshot_then_restore_into_a_new_vm(
    kasoud: Kasoud, page: Page, guest_elf: Path, tmp_path: Path
) -> None:
    _create(kasoud, _echo_spec("src", guest_elf))
    _open(page, kasoud)
    expect(_state(page, "src")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    _select(page, "src")
    expect(page.locator("#terminal .xterm-rows")).to_contain_text(
        f"echo: ready n={ECHO_BYTES}", timeout=BOOT_TIMEOUT_MS
    )
    _type_and_see(page, kasoud, "src", "before")

    folder = tmp_path / "snap"
    page.fill("#snapshot-form input[name=path]", str(folder))
    page.click("#snapshot-form button[type=submit]")
    expect(page.locator("#snapshot-status")).to_contain_text("written", timeout=BOOT_TIMEOUT_MS)
    expect(_event(page, "src", "snapshot", str(folder))).to_have_count(1)

    page.select_option("#restore-source", "snapshot")
    page.fill("#restore-form input[name=name]", "copy")
    page.click("#restore-form button[type=submit]")
    expect(_state(page, "copy")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    expect(page.locator("#detail-name")).to_have_text("copy")  # the page shows the copy
    expect(page.locator("#banner")).to_be_hidden()
    _type_and_see(page, kasoud, "copy", "restored")
    copy_log = kasoud.api.get("/v1/vms/copy/logs").text
    assert "echo: ready" not in copy_log, copy_log  # it went on from the snapshot
    expect(_event(page, "copy", "created", f"from snapshot {folder}")).to_have_count(1)
    expect(_event(page, "copy", "started")).not_to_have_count(0)

    # The original runs on beside its copy, and still answers.
    expect(_state(page, "src")).to_have_text("running")
    _select(page, "src")
    _type_and_see(page, kasoud, "src", "after")
    assert "restored" not in kasoud.api.get("/v1/vms/src/logs").text
    assert _names_and_states(kasoud) == {"src": "running", "copy": "running"}


def test_backup_restores_into_a_new_vm_and_into_itself(
    kasoud: Kasoud, page: Page, guest_elf: Path
) -> None:
    _create(kasoud, _echo_spec("src", guest_elf))
    _open(page, kasoud)
    expect(_state(page, "src")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    _select(page, "src")
    expect(page.locator("#restore-source option")).to_have_count(1)  # the snapshot folder only

    page.click("#backup-now")
    status = page.locator("#restore-status")
    expect(status).to_contain_text("made", timeout=BOOT_TIMEOUT_MS)
    (backup,) = kasoud.api.get("/v1/vms/src/backups").json()
    assert backup["id"] in (status.text_content() or "")
    options = page.locator("#restore-source option")
    expect(options).to_have_count(2)
    expect(options.first).to_have_attribute("value", f"backup:{backup['id']}")
    expect(options.first).to_contain_text("iB)")
    expect(_event(page, "src", "backup")).not_to_have_count(0)

    # Into a new VM: the backup is the list's first choice.
    page.fill("#restore-form input[name=name]", "from-backup")
    page.click("#restore-form button[type=submit]")
    expect(_state(page, "from-backup")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    expect(page.locator("#detail-name")).to_have_text("from-backup")
    _type_and_see(page, kasoud, "from-backup", "cloned")
    assert "echo: ready" not in kasoud.api.get("/v1/vms/from-backup/logs").text
    expect(_event(page, "from-backup", "backup-restored", f"src/{backup['id']}")).to_have_count(1)

    # Into itself (the name left empty): stopped, brought back from the backup, started.
    _select(page, "src")
    before = kasoud.api.get("/v1/vms/src").json()
    page.click("#restore-form button[type=submit]")
    expect(status).to_have_text("src running", timeout=BOOT_TIMEOUT_MS)
    expect(_event(page, "src", "backup-restored")).to_have_count(1)
    after = kasoud.api.get("/v1/vms/src").json()
    assert after["state"] == "running" and after["pid"] != before["pid"]
    expect(_state(page, "src")).to_have_text("running")
    _type_and_see(page, kasoud, "src", "itself")
    assert _names_and_states(kasoud) == {"src": "running", "from-backup": "running"}


def test_a_bad_restore_shows_the_problem_and_changes_nothing(
    kasoud: Kasoud, page: Page, guest_elf: Path, tmp_path: Path
) -> None:
    for name in ("src", "taken"):
        _create(kasoud, _echo_spec(name, guest_elf))
    _open(page, kasoud)
    for name in ("src", "taken"):
        expect(_state(page, name)).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    _select(page, "src")
    folder = tmp_path / "snap"
    page.fill("#snapshot-form input[name=path]", str(folder))
    page.click("#snapshot-form button[type=submit]")
    expect(page.locator("#snapshot-status")).to_contain_text("written", timeout=BOOT_TIMEOUT_MS)
    before = kasoud.api.get("/v1/vms").json()
    events_before = kasoud.api.get("/v1/events/log").json()

    banner = page.locator("#banner")
    status = page.locator("#restore-status")
    # A name that exists: the daemon's 409 problem, in the banner.
    page.select_option("#restore-source", "snapshot")
    page.fill("#restore-form input[name=name]", "taken")
    page.click("#restore-form button[type=submit]")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("taken")
    expect(banner).to_contain_text("exists")
    expect(status).to_have_text("restore failed")
    expect(page.locator("#restore-form input[name=name]")).to_have_value("taken")  # kept to fix
    page.click("#banner-close")
    expect(banner).to_be_hidden()

    # A snapshot folder restored without a new name: the page says what it needs.
    page.fill("#restore-form input[name=name]", "")
    page.click("#restore-form button[type=submit]")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("new name")

    # A folder that holds no snapshot: refused by the daemon, no VM left behind.
    page.click("#banner-close")
    page.fill("#snapshot-form input[name=path]", str(tmp_path / "nothing-here"))
    page.fill("#restore-form input[name=name]", "ghost")
    page.click("#restore-form button[type=submit]")
    expect(banner).to_be_visible()
    expect(status).to_have_text("restore failed")
    expect(page.locator('#vm-rows tr[data-vm="ghost"]')).to_have_count(0)

    # Nothing changed: the same VMs, the same processes, no event about either of them.
    after = kasoud.api.get("/v1/vms").json()
    assert [(vm["name"], vm["state"], vm["pid"]) for vm in after] == [
        (vm["name"], vm["state"], vm["pid"]) for vm in before
    ]
    new_events = kasoud.api.get("/v1/events/log").json()[len(events_before) :]
    assert [e for e in new_events if e["vm"] in ("src", "taken")] == [], new_events
    expect(page.locator("#vm-rows tr")).to_have_count(2)
    expect(_state(page, "src")).to_have_text("running")
    expect(_state(page, "taken")).to_have_text("running")


def test_every_lifecycle_button(kasoud: Kasoud, page: Page, guest_elf: Path) -> None:
    _open(page, kasoud)
    # Created without starting: the form's "start now" unchecked.
    page.fill("#create-form input[name=name]", "life")
    page.fill("#create-form input[name=kernel]", str(guest_elf))
    page.fill("#create-form input[name=memory]", "64M")
    page.fill("#create-form input[name=cmdline]", "console=ttyS0 " + cmdline("echo", n=64))
    page.uncheck("#create-form input[name=start]")
    page.click("#create-form button[type=submit]")
    state = _state(page, "life")
    expect(state).to_have_text("created")
    expect(page.locator("#detail-state")).to_have_text("created")
    assert kasoud.api.get("/v1/vms/life").json()["pid"] is None

    def press(action: str, wanted: str, event: str, count: int = 1) -> dict[str, Any]:
        """Click ``action``; the VM ends up ``wanted`` once the log has ``count`` events of
        kind ``event`` (a restart is running before and after)."""
        page.click(f'#detail button[data-action="{action}"]')
        expect(_event(page, "life", event)).to_have_count(count, timeout=BOOT_TIMEOUT_MS)
        expect(state).to_have_text(wanted, timeout=BOOT_TIMEOUT_MS)
        expect(page.locator("#detail-state")).to_have_text(wanted)
        vm: dict[str, Any] = kasoud.api.get("/v1/vms/life").json()
        assert vm["state"] == wanted
        return vm

    first = press("start", "running", "running")
    expect(page.locator("#terminal .xterm-rows")).to_contain_text(
        "echo: ready", timeout=BOOT_TIMEOUT_MS
    )
    press("pause", "paused", "paused")
    press("resume", "running", "resumed")
    _type_and_see(page, kasoud, "life", "resumed")  # it runs again, not just says so
    restarted = press("restart", "running", "running", count=2)
    assert restarted["pid"] != first["pid"]
    expect(_event(page, "life", "stopped")).to_have_count(1)
    press("stop", "stopped", "stopped", count=2)
    expect(page.locator("#console-status")).to_contain_text("closed")
    press("start", "running", "running", count=3)
    expect(page.locator("#console-status")).to_have_text("connected", timeout=BOOT_TIMEOUT_MS)
    # The guest kit does not answer ACPI's power button, so "life" would take the full
    # 30 s before kasoud stopped it: shut down is shown on a VM declared without ACPI,
    # which kasoud stops at once.
    spec = _echo_spec("noacpi", guest_elf, acpi=False)
    _create(kasoud, spec)
    expect(_state(page, "noacpi")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    _select(page, "noacpi")
    page.click('#detail button[data-action="shutdown"]')
    expect(_event(page, "noacpi", "stopped")).to_have_count(1, timeout=BOOT_TIMEOUT_MS)
    expect(_state(page, "noacpi")).to_have_text("stopped")
    assert kasoud.api.get("/v1/vms/noacpi").json()["state"] == "stopped"
    kasoud.api.delete("/v1/vms/noacpi")
    _select(page, "life")

    # A running VM is deleted (with force) on the second click.
    page.click("#delete")
    expect(page.locator("#delete")).to_have_text("Really delete life?")
    assert _names_and_states(kasoud) == {"life": "running"}
    page.click("#delete")
    expect(page.locator('#vm-rows tr[data-vm="life"]')).to_have_count(0)
    expect(page.locator("#detail")).to_be_hidden()
    expect(page.locator("#vm-empty")).to_be_visible()
    expect(_event(page, "life", "deleted")).to_have_count(1)
    assert _names_and_states(kasoud) == {}


def _painted(page: Page, selector: str) -> int:
    """How many pixels of the canvas at ``selector`` are drawn (not transparent)."""
    count: int = page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const { data } = canvas.getContext("2d")
                .getImageData(0, 0, canvas.width, canvas.height);
            let painted = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) painted += 1;
            return painted;
        }""",
        selector,
    )
    return count


def test_list_events_and_graphs_follow_the_daemon_live(
    kasoud: Kasoud, page: Page, guest_elf: Path, tmp_path: Path
) -> None:
    _open(page, kasoud)
    expect(page.locator("#host")).to_contain_text("0 of 0 running")

    # A VM made behind the page's back (through the API) shows up without a reload: a row,
    # its events, the host line.
    disk = tmp_path / "disk.img"
    with disk.open("wb") as out:
        out.truncate(16 << 20)
    # vblk-bench reads the disk for as long as the test looks: its 2 MiB/s limit keeps it
    # busy (a 64 KiB request every ~31 ms) without taking a host CPU.
    bench = cmdline("vblk-bench", mode="read", size=65536, count=1 << 24, depth=1)
    spec = {
        **_echo_spec("busy", guest_elf),
        "cmdline": "console=ttyS0 " + bench,
        "disks": [f"{disk},bw=2M"],
    }
    _create(kasoud, spec)
    expect(_state(page, "busy")).to_have_text("running", timeout=BOOT_TIMEOUT_MS)
    expect(_event(page, "busy", "created")).to_have_count(1)
    expect(_event(page, "busy", "started")).to_have_count(1)
    expect(page.locator("#host")).to_contain_text("1 of 1 running")

    _select(page, "busy")
    terminal = page.locator("#terminal .xterm-rows")
    expect(terminal).to_contain_text("vblk-bench start", timeout=BOOT_TIMEOUT_MS)

    # The figures from /metrics: a memory size, a disk rate (two scrapes, 2 s apart), a CPU
    # share in the list; the network graph has no figures for a VM without a network.
    expect(page.locator('[data-value="memory"]')).to_contain_text("iB", timeout=METRICS_MS)
    expect(page.locator('[data-value="disk"]')).to_have_text(
        re.compile(r"^[0-9.]+ (KiB|MiB)/s$"), timeout=METRICS_MS
    )
    expect(page.locator('[data-value="net"]')).to_have_text("no data")
    row = page.locator('#vm-rows tr[data-vm="busy"]')
    expect(row.locator("td.num").first).to_contain_text("%", timeout=METRICS_MS)

    # The graphs are drawn, and drawn anew as samples come in (each refresh adds one).
    for kind in ("memory", "disk", "cpu"):
        assert _painted(page, f'canvas[data-graph="{kind}"]') > 0, f"the {kind} graph is blank"
    assert _painted(page, '#vm-rows tr[data-vm="busy"] canvas.spark') > 0
    drawn = page.evaluate("document.querySelector('canvas[data-graph=\"disk\"]').toDataURL()")
    page.wait_for_function(
        """(before) =>
            document.querySelector('canvas[data-graph="disk"]').toDataURL() !== before""",
        arg=drawn,
        timeout=METRICS_MS,
    )

    # A change made elsewhere reaches the row, the detail and the log.
    kasoud.api.post("/v1/vms/busy/pause")
    expect(_state(page, "busy")).to_have_text("paused")
    expect(page.locator("#detail-state")).to_have_text("paused")
    expect(_event(page, "busy", "paused")).to_have_count(1)
    kasoud.api.delete("/v1/vms/busy", params={"force": "true"})
    expect(page.locator('#vm-rows tr[data-vm="busy"]')).to_have_count(0)
    expect(_event(page, "busy", "deleted")).to_have_count(1)
    expect(page.locator("#host")).to_contain_text("0 of 0 running")
