"""The ctypes mirrors in kasou.kvm.bindings match the kernel headers this machine ships.

A small C program is compiled against <linux/kvm.h> and prints each struct's size and each
ioctl's number; the Python side must agree on every one.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.kvm import bindings

STRUCTS = {
    "KvmUserspaceMemoryRegion": "struct kvm_userspace_memory_region",
    "KvmRegs": "struct kvm_regs",
    "KvmSegment": "struct kvm_segment",
    "KvmDtable": "struct kvm_dtable",
    "KvmSregs": "struct kvm_sregs",
    "KvmFpu": "struct kvm_fpu",
    "KvmMsrEntry": "struct kvm_msr_entry",
    "KvmMsrsHeader": "struct kvm_msrs",
    "KvmMsrListHeader": "struct kvm_msr_list",
    "KvmCpuidEntry2": "struct kvm_cpuid_entry2",
    "KvmCpuid2Header": "struct kvm_cpuid2",
    "KvmIrqfd": "struct kvm_irqfd",
    "KvmIoeventfd": "struct kvm_ioeventfd",
    "KvmPitConfig": "struct kvm_pit_config",
    "KvmIrqLevel": "struct kvm_irq_level",
    "KvmMpState": "struct kvm_mp_state",
    "KvmLapicState": "struct kvm_lapic_state",
    "KvmIrqchip": "struct kvm_irqchip",
    "KvmPicState": "struct kvm_pic_state",
    "KvmIoapicState": "struct kvm_ioapic_state",
    "KvmPitState2": "struct kvm_pit_state2",
    "KvmClockData": "struct kvm_clock_data",
    "KvmVcpuEvents": "struct kvm_vcpu_events",
    "KvmDebugregs": "struct kvm_debugregs",
    "KvmXsave": "struct kvm_xsave",
    "KvmXcrs": "struct kvm_xcrs",
    "KvmDirtyLog": "struct kvm_dirty_log",
    "KvmEnableCap": "struct kvm_enable_cap",
    "KvmStatsHeader": "struct kvm_stats_header",
    "KvmStatsDesc": "struct kvm_stats_desc",
}

OFFSETS = {
    "RUN_IMMEDIATE_EXIT": "offsetof(struct kvm_run, immediate_exit)",
    "RUN_EXIT_REASON": "offsetof(struct kvm_run, exit_reason)",
    "RUN_IF_FLAG": "offsetof(struct kvm_run, if_flag)",
    "RUN_IO_DIRECTION": "offsetof(struct kvm_run, io.direction)",
    "RUN_MMIO": "offsetof(struct kvm_run, mmio.phys_addr)",
    "RUN_MMIO_DATA": "offsetof(struct kvm_run, mmio.data)",
    "VCPU_EVENTS_FLAGS": "offsetof(struct kvm_vcpu_events, flags)",
}


def _ioctl_names() -> list[str]:
    return [name for name in bindings.__all__ if name.startswith("KVM_")]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and the kernel headers (linux-libc-dev)")
    source = tmp_path_factory.mktemp("kvmh") / "sizes.c"
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void){",
    ]
    for name, c_type in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof({c_type}));')
    for name, expr in OFFSETS.items():
        lines.append(f'printf("{name} %zu\\n", (size_t){expr});')
    for name in _ioctl_names():
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines.append("return 0;}")
    source.write_text("\n".join(lines))
    binary = source.with_suffix("")
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in output.splitlines())}


def test_struct_sizes_match_the_kernel_headers(kernel_values: dict[str, int]) -> None:
    for name in STRUCTS:
        assert ctypes.sizeof(getattr(bindings, name)) == kernel_values[name], name


def test_kvm_run_offsets_match_the_kernel_headers(kernel_values: dict[str, int]) -> None:
    for name in OFFSETS:
        assert getattr(bindings, name) == kernel_values[name], name


def test_ioctl_numbers_and_constants_match_the_kernel_headers(
    kernel_values: dict[str, int],
) -> None:
    names = _ioctl_names()
    assert "KVM_SET_USER_MEMORY_REGION" in names and "KVM_RUN" in names
    for name in names:
        assert getattr(bindings, name) == kernel_values[name], name
