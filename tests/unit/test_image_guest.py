"""The default guest's cache and user-space tree (kasou.image), without building a kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.errors import KasouError
from kasou.image import ImageBuildError, _cache, _userland, cache_dir, default_guest
from kasou.image._cpio import Entry
from kasou.image._host import TAIL_LINES, run_logged


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KASOU_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_prefers_kasou_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_CACHE_DIR", "/srv/kasou-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    monkeypatch.setenv("HOME", "/home/me")
    assert cache_dir() == Path("/srv/kasou-cache")
    monkeypatch.delenv("KASOU_CACHE_DIR")
    assert cache_dir() == Path("/xdg/kasou")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert cache_dir() == Path("/home/me/.cache/kasou")


def test_without_a_build_an_empty_cache_says_what_to_run(cache: Path) -> None:
    with pytest.raises(ImageBuildError, match=r"not built: run `kasou image build`"):
        default_guest(build=False)
    assert issubclass(ImageBuildError, KasouError)


def test_a_guest_built_from_other_inputs_is_out_of_date(cache: Path) -> None:
    old = cache / "guest" / "userland" / "0123456789abcdef"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"recipe": "userland-0"}))
    assert _userland.find_userland() == (None, "out of date")
    with pytest.raises(ImageBuildError, match="out of date"):
        default_guest(build=False)


def _install(key: str, files: dict[str, str]) -> Path:
    with _cache.staging_dir("test") as stage:
        built = stage / "out"
        built.mkdir()
        for name, text in files.items():
            (built / name).write_text(text)
        return _cache.install(built, "thing", key, {"key": key})


def test_install_replaces_an_entry_whole_and_drops_stale_ones(cache: Path) -> None:
    with _cache.build_lock():
        _install("old", {"a": "1"})
        entry = _install("new", {"a": "1", "b": "2"})
        assert _install("new", {"b": "3"}) == entry
    assert sorted(p.name for p in entry.iterdir()) == ["b", "manifest.json"]
    assert (entry / "b").read_text() == "3"
    assert [p.name for p in (cache / "guest" / "thing").iterdir()] == ["new"]
    assert list((cache / "guest" / "tmp").iterdir()) == []


def test_a_build_killed_midway_leaves_nothing_behind(cache: Path) -> None:
    with _cache.build_lock(), _cache.staging_dir("killed") as stage:
        (stage / "half-built").write_text("x")
    # Even one left behind by a killed process goes with the next build.
    leftover = cache / "guest" / "tmp" / "kernel-dead"
    leftover.mkdir()
    with _cache.build_lock():
        assert not leftover.exists()
    assert _userland.find_userland() == (None, "not built")


def test_a_failed_step_quotes_its_log_tail_and_path(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    script = "for i in $(seq 1 50); do echo line $i; done; exit 3"
    with pytest.raises(ImageBuildError) as caught:
        run_logged(["sh", "-c", script], log, "the test step")
    message = str(caught.value)
    assert message.startswith("the test step failed")
    assert "line 50" in message and f"line {50 - TAIL_LINES + 2}" in message
    assert "line 20\n" not in message
    assert message.endswith(f"full log: {log}")
    assert "line 1\n" in log.read_text()


def test_a_missing_program_is_a_build_error_too(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="cannot run"):
        run_logged(["/no/such/tool"], tmp_path / "log", "a step")


def _paths(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


APPLETS = ["bin/sh", "sbin/init", "sbin/poweroff", "sbin/reboot", "usr/bin/free"]


def test_initramfs_tree_has_init_devices_agent_and_applets() -> None:
    entries = _userland.tree(b"BUSYBOX", APPLETS, b"AGENT", initramfs=True)
    paths = _paths(entries)
    assert paths["init"].kind == "file" and paths["init"].mode == 0o755
    assert paths["dev/console"].rdev == (5, 1) and paths["dev/null"].rdev == (1, 3)
    assert paths["sbin/kasou-agent"].data == b"AGENT"
    assert paths["bin/busybox"].data == b"BUSYBOX"
    assert paths["sbin/init"] == Entry("sbin/init", "symlink", 0o777, b"/bin/busybox")
    assert paths["usr/bin/free"].kind == "symlink"
    # kasou's own poweroff and reboot scripts take the place of the applet links.
    assert paths["sbin/reboot"].kind == "file" and paths["sbin/reboot"].data.startswith(b"#!")
    assert paths["etc/inittab"].mode == 0o644
    assert paths["etc/kasou-guest"].kind == "file"
    assert paths["tmp"].mode == 0o1777


def test_root_disk_tree_has_no_init_script_nor_device_nodes() -> None:
    paths = _paths(_userland.tree(b"B", APPLETS, b"A", initramfs=False))
    assert "init" not in paths
    assert not [p for p, e in paths.items() if e.kind == "chardev"]
    assert paths["sbin/init"].data == b"/bin/busybox"


def test_iobench_is_on_the_root_disk_only() -> None:
    disk = _paths(_userland.tree(b"B", APPLETS, b"A", initramfs=False, iobench=b"IOBENCH"))
    assert disk["sbin/kasou-iobench"] == Entry("sbin/kasou-iobench", "file", 0o755, b"IOBENCH")
    initramfs = _paths(_userland.tree(b"B", APPLETS, b"A", initramfs=True, iobench=b"IOBENCH"))
    assert "sbin/kasou-iobench" not in initramfs


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_iobench_reads_a_file_tells_the_time_and_refuses_bad_arguments(tmp_path: Path) -> None:
    tool = tmp_path / "kasou-iobench"
    _userland.compile_iobench(tool, tmp_path / "log")
    data = tmp_path / "disk.raw"
    data.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    try:
        os.close(os.open(data, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} does not take O_DIRECT (tmpfs?)")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool, *args], capture_output=True, text=True, check=False)

    done = run("-n", "300", "-t", "3", str(data))
    assert done.returncode == 0, done.stderr
    words = dict(word.split("=") for word in done.stdout.split()[1:])
    assert (words["reads"], words["bytes"], words["threads"]) == ("300", "4096", "3")
    assert float(words["iops"]) > 0 and float(words["seconds"]) > 0
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(4096))
    too_big = run("-b", "8192", "-n", "1", str(small))
    assert too_big.returncode == 1 and "smaller than one read" in too_big.stderr
    assert run("-b", "1000", str(data)).returncode == 2  # not whole sectors
    assert run("-n", "0", str(data)).returncode == 2
    assert run(str(data), "extra").returncode == 2
    first, second = (int(run("-c").stdout.split()[1]) for _ in range(2))
    assert 0 < first <= second  # the guest's monotonic clock, for timing busybox commands
    missing = run(str(tmp_path / "none"))
    assert missing.returncode == 1 and "cannot open" in missing.stderr


def test_tree_lists_every_parent_before_its_children() -> None:
    entries = _userland.tree(b"B", [*APPLETS, "usr/lib/deep/applet"], b"A", initramfs=True)
    seen: set[str] = set()
    for entry in entries:
        parent = entry.path.rpartition("/")[0]
        assert not parent or parent in seen, entry.path
        seen.add(entry.path)


def test_inittab_runs_the_agent_a_shell_and_the_shutdown_script() -> None:
    inittab = (_userland.OVERLAY / "etc" / "inittab").read_text()
    actions = [line for line in inittab.splitlines() if line and not line.startswith("#")]
    assert "::sysinit:/etc/init.d/rcS" in actions
    assert "::respawn:/sbin/kasou-agent" in actions
    assert "ttyS0::respawn:-/bin/sh" in actions
    assert "::shutdown:/etc/init.d/rcK" in actions
    assert (
        (_userland.OVERLAY / "etc/init.d/rcK")
        .read_text()
        .rstrip()
        .endswith("exec /sbin/kasou-agent poweroff")
    )


@pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
    reason="needs e2fsprogs",
)
def test_root_disk_is_ext4_with_the_tree_and_its_owners(tmp_path: Path) -> None:
    entries = [
        Entry("bin", "dir", 0o755),
        Entry("bin/tool", "file", 0o750, b"tool", uid=1234, gid=56),
        Entry("bin/link", "symlink", 0o777, b"/bin/tool"),
        Entry("sbin", "dir", 0o755),
    ]
    image = tmp_path / "root.ext4"
    stage = tmp_path / "stage"
    stage.mkdir()
    _userland.make_ext4(entries, image, stage, tmp_path / "log")
    assert image.stat().st_size == 64 << 20

    def debugfs(request: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
        ).stdout

    assert debugfs("cat /bin/tool") == "tool"
    tool = debugfs("stat /bin/tool")
    assert "User:  1234   Group:    56" in tool and "Mode:  0750" in tool
    assert 'Fast link dest: "/bin/tool"' in debugfs("stat /bin/link")
    # Entries say root owns them (uid 0, the default), whoever built the image.
    assert "User:     0   Group:     0" in debugfs("stat /sbin")
