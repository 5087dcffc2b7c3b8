"""kasou.resources without touching the host's cgroups: parsing and checking limits, and how
v1 and v2 hierarchies are found and mapped to files (folders laid out like each one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasou.errors import ConfigError, HostError
from kasou.resources import (
    MEMORY_OVERHEAD,
    Cgroup,
    ResourceLimits,
    check_host_cpus,
    check_limits,
    parse_cpu_pin,
    parse_cpu_weight,
    parse_cpus_quota,
    parse_hierarchy,
    parse_pids_limit,
)
from kasou.vmm.requests import RequestKind, parse_request

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "8:pids:/\n4:memory:/box/7\n2:cpuacct:/\n1:cpu:/\n0::/\n"


def test_quota_weight_pids_and_pins_parse() -> None:
    assert parse_cpus_quota("0.5") == 0.5
    assert parse_cpu_weight("250") == 250
    assert parse_pids_limit(64) == 64
    assert parse_cpu_pin("0=1,1=0") == ((0, 1), (1, 0))
    assert parse_cpu_pin({"1": 0}) == ((1, 0),)
    assert parse_cpu_pin("") == ()


@pytest.mark.parametrize(
    ("parse", "value", "words"),
    [
        (parse_cpus_quota, "-1", "too little"),
        (parse_cpus_quota, "0", "too little"),
        (parse_cpus_quota, "nan", "not a number"),
        (parse_cpus_quota, "half", "not a number"),
        (parse_cpu_weight, "0", "1 to 10000"),
        (parse_cpu_weight, "20000", "1 to 10000"),
        (parse_pids_limit, "2", "16 to"),
        (parse_pids_limit, "1e12", "16 to"),
        (parse_cpu_pin, "0:1", "VCPU=CPU"),
        (parse_cpu_pin, "0=1,0=2", "pinned twice"),
        (parse_cpu_pin, "0=-1", "not a host CPU number"),
    ],
)
def test_bad_values_are_refused_naming_the_option(parse: object, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as raised:
        parse(value)  # type: ignore[operator]
    assert raised.value.field in ("cpus-quota", "cpu-weight", "pids-limit", "cpu-pin")


def test_a_memory_limit_below_guest_ram_and_kasou_is_refused() -> None:
    memory = 256 << 20
    check_limits(ResourceLimits(memory_limit=memory + MEMORY_OVERHEAD), vcpus=1, memory=memory)
    with pytest.raises(ConfigError, match="below guest RAM"):
        check_limits(ResourceLimits(memory_limit=memory), vcpus=1, memory=memory)


def test_pins_name_existing_vcpus_and_allowed_cpus() -> None:
    with pytest.raises(ConfigError, match="vCPU 2 does not exist"):
        check_limits(ResourceLimits(cpu_pin=((2, 0),)), vcpus=2, memory=64 << 20)
    with pytest.raises(ConfigError, match="host CPU 7: kasou may run on CPUs 0,1 only"):
        check_host_cpus(ResourceLimits(cpu_pin=((0, 7),)), frozenset({0, 1}))
    with pytest.raises(ConfigError, match="more than the 2"):
        check_host_cpus(ResourceLimits(cpus_quota=3.0), frozenset({0, 1}))


def test_only_limits_need_a_cgroup() -> None:
    assert ResourceLimits(cpu_pin=((0, 1),)).controllers == ()
    assert ResourceLimits(cpus_quota=0.5, pids_limit=64).controllers == ("cpu", "pids")


def test_the_limits_request_validates_untrusted_values() -> None:
    request = parse_request({"request": "limits", "cpus_quota": 0.2, "memory_limit": "1G"})
    assert request.kind is RequestKind.LIMITS
    assert request.limits == {"cpus_quota": 0.2, "memory_limit": 1 << 30}
    assert parse_request({"request": "limits", "cpu_pin": None}).limits == {"cpu_pin": ()}
    with pytest.raises(ConfigError, match="too little"):
        parse_request({"request": "limits", "cpus_quota": -3})
    with pytest.raises(ConfigError, match="not a number"):
        parse_request({"request": "limits", "cpu_weight": True})


def _v1_tree(root: Path) -> None:
    for folder in ("cpu", "cpuacct", "pids", "memory/box/7"):
        (root / folder).mkdir(parents=True)
        (root / folder / "cgroup.procs").write_text("")


def test_v1_controllers_map_to_their_own_mounts(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    hierarchy = parse_hierarchy(
        V1_MOUNTINFO.format(root=tmp_path), V1_CGROUP, {tmp_path / "unified": "hugetlb"}
    )
    assert hierarchy.version == 1
    assert hierarchy.own_folder("memory") == tmp_path / "memory/box/7"
    group = Cgroup(hierarchy, "vm", pid=4242)
    group.ensure(["cpu", "cpuacct", "memory", "pids"])
    assert group.folders["memory"] == tmp_path / "memory/box/7/kasou/vm-4242"
    assert (group.folders["cpu"] / "cgroup.procs").read_text() == "4242"
    group.set_cpu_quota(0.5)
    group.set_cpu_weight(200)
    group.set_memory_limit(1 << 30)
    group.set_pids_limit(64)
    assert (group.folders["cpu"] / "cpu.cfs_quota_us").read_text() == "50000"
    assert (group.folders["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert (group.folders["cpu"] / "cpu.shares").read_text() == "2048"
    assert (group.folders["memory"] / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (group.folders["pids"] / "pids.max").read_text() == "64"
    group.set_cpu_quota(None)
    assert (group.folders["cpu"] / "cpu.cfs_quota_us").read_text() == "-1"
    (group.folders["cpuacct"] / "cpuacct.usage").write_text("1500000000\n")
    assert group.cpu_seconds() == 1.5


def test_a_missing_controller_is_named_and_nothing_is_made(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    mounts = "\n".join(
        line for line in V1_MOUNTINFO.format(root=tmp_path).splitlines() if "memory" not in line
    )
    hierarchy = parse_hierarchy(mounts, V1_CGROUP, {})
    group = Cgroup(hierarchy, "vm", pid=4242)
    with pytest.raises(HostError, match="no cgroup memory controller"):
        group.ensure(["cpu", "memory"])
    assert not (tmp_path / "cpu" / "kasou").exists()


def test_v2_uses_one_folder_and_its_own_files(tmp_path: Path) -> None:
    mountinfo = f"30 1 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    own = tmp_path / "user" / "session"
    own.mkdir(parents=True)
    for folder in (own, own / "kasou"):
        folder.mkdir(exist_ok=True)
        (folder / "cgroup.subtree_control").write_text("")
    hierarchy = parse_hierarchy(mountinfo, "0::/user/session\n", {own: "cpu memory pids"})
    assert hierarchy.version == 2
    group = Cgroup(hierarchy, "vm", pid=99)
    group.ensure(["cpu", "memory"])
    folder = own / "kasou" / "vm-99"
    assert group.folders == {"cpu": folder, "memory": folder}
    assert (own / "kasou" / "cgroup.subtree_control").read_text() == "+memory"
    group.set_cpu_quota(0.25)
    group.set_cpu_weight(50)
    group.set_memory_limit(None)
    assert (folder / "cpu.max").read_text() == "25000 100000"
    assert (folder / "cpu.weight").read_text() == "50"
    assert (folder / "memory.max").read_text() == "max"
    (folder / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    assert group.cpu_seconds() == 2.5


def test_a_pure_v2_host_is_v2_even_without_controllers(tmp_path: Path) -> None:
    hierarchy = parse_hierarchy(
        "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/\n", {}
    )
    assert hierarchy.version == 2
    with pytest.raises(HostError, match="no cgroup pids controller"):
        hierarchy.own_folder("pids")
