"""The only place that creates and wires a VM's parts.

``build_vm`` turns a validated ``VmConfig`` into a ``Vm`` ready to start: KVM VM and
irqchip, guest RAM and its memory slots, the kernel and initrd loaded with boot_params, the
legacy devices on the buses with their interrupt lines, and the vCPUs in the state the
64-bit boot protocol asks for (Documentation/arch/x86/boot.rst), or, for a Multiboot kernel,
the 32-bit protected-mode state of Multiboot 0.6.96 §3.2. Anything that fails half way
releases what was already made.

``prepare`` does ahead, in a process that will build one VM but does not know which yet (the
warm template's spare, ``cli/template.py``), what no config decides: /dev/kvm opened and
checked, the KVM VM created with its TSS and identity-map pages (a KVM VM belongs to the
process that created it, so this is done in the process that runs it), the host's supported
CPUID read, and, for a guessed size, the guest RAM, irqchip, PIT and vCPUs made; and a
rehearsal build of a throw-away VM, so that the first build's one-time costs (copy-on-write
faults on a forked process's pages, first calls) are paid before its request comes. The
next ``build_vm`` in that process takes the VM made ready.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from kasou.arch.x86_64 import acpi, gdt, layout, mptable, msrs, paging
from kasou.arch.x86_64 import cpuid as arch_cpuid
from kasou.devices.bus import Bus, BusDevice, BusError
from kasou.devices.legacy.debug_exit import DebugExit, exit_status
from kasou.devices.legacy.i8042 import I8042
from kasou.devices.legacy.power import (
    GPE0_PORT,
    PM1A_CNT_PORT,
    PM1A_EVT_PORT,
    PM_BASE,
    PM_SIZE,
    PM_TMR_PORT,
    AcpiPm,
)
from kasou.devices.legacy.rtc import Rtc
from kasou.devices.legacy.serial import Serial
from kasou.errors import ConfigError, HostError, KasouError
from kasou.kvm import Kvm, VcpuFd, VmFd
from kasou.kvm import bindings as b
from kasou.kvm.host import Backend, backend
from kasou.kvm.stats import KvmStats, open_stats
from kasou.loader import LoadedKernel, load_initrd, load_kernel, multiboot, read_ahead
from kasou.loader.bootparams import build_boot_params, write_cmdline
from kasou.memory import GuestMemory
from kasou.vmm.config import DiskConfig, NetConfig, VirtioConsoleConfig, VmConfig, VsockConfig
from kasou.vmm.vcpu import ExitKind, GuestExit, Vcpu
from kasou.vmm.vm import Vm

if TYPE_CHECKING:
    from kasou.vmm.snapshot import MachineImage

__all__ = [
    "COM1",
    "COM2",
    "AgentLine",
    "EventfdTrigger",
    "ExtraDevice",
    "IrqLine",
    "VirtioSlot",
    "build_vm",
    "prepare",
    "rehearse",
    "virtio_plan",
]

COM1 = (0x3F8, 4)  # (port, ISA IRQ)
COM2 = (0x2F8, 3)
I8042_PORT = 0x60
RTC_PORT = 0x70
# KVM needs three pages below 4 GiB for the VMX real-mode TSS and identity page table;
# they sit just under the BIOS area, inside the MMIO hole where no RAM is.
TSS_ADDRESS = layout.KVM_TSS
IDENTITY_MAP_ADDRESS = layout.KVM_IDENTITY_MAP


class ExtraDevice(NamedTuple):
    """A device the caller made (tests, tools), to be put on a bus at ``base``."""

    device: BusDevice
    base: int
    length: int
    bus: str = "pio"  # "pio" or "mmio"


class EventfdTrigger:
    """An interrupt line backed by a KVM irqfd: each ``trigger`` writes the eventfd."""

    def __init__(self, vm_fd: VmFd, gsi: int) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.gsi = gsi
        vm_fd.irqfd(self.fd, gsi)

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: an interrupt is pending anyway

    def close(self) -> None:
        os.close(self.fd)


class IrqLine:
    """A level-triggered interrupt line: KVM_IRQ_LINE holds ``gsi`` at the level given until
    the next call (the SCI: the guest's IOAPIC pin is programmed level-triggered)."""

    def __init__(self, vm_fd: VmFd, gsi: int) -> None:
        self._vm_fd = vm_fd
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self._vm_fd.irq_line(self.gsi, 1 if high else 0)


class AgentLine(Protocol):
    """The host end of COM2, the guest agent's line (``vmm/agent.py``)."""

    def output(self, data: bytes) -> None: ...

    def input_ready(self) -> None: ...


def build_vm(
    config: VmConfig,
    *,
    console_output: Callable[[bytes], None],
    agent: AgentLine | None = None,
    extra_devices: Sequence[ExtraDevice] = (),
    kvm_path: str = "/dev/kvm",
    restore: MachineImage | None = None,
) -> Vm:
    """Build the VM ``config`` describes. COM1 writes go to ``console_output``; COM2 (the
    guest agent's line) is wired to ``agent`` when given. virtio devices sit in the MMIO
    slots of ``layout.virtio_mmio_address`` in the order of ``virtio_plan`` and are announced
    on the kernel command line (``virtio_mmio.device=``).

    With ``restore`` the VM is the one saved there (``vmm/snapshot.py``): its RAM is mapped
    from the snapshot's memory file (or left empty for a migration to fill), nothing is
    loaded, and every device and vCPU is put back in its saved state."""
    made = _take_ready(kvm_path, config, restore)
    return _build(config, console_output, agent, extra_devices, made, restore, _load_guest)


class _MadeVcpu(NamedTuple):
    """A vCPU made with what every VM of its size gives it (``_new_vcpu``)."""

    fd: VcpuFd
    stats: KvmStats | None

    def close(self) -> None:
        if self.stats is not None:
            self.stats.close()
        self.fd.close()


class _Made(NamedTuple):
    """/dev/kvm and a KVM VM; with ``memory``, its guest RAM in its slots and its irqchip
    and PIT made as well; with ``vcpus``, its vCPUs too (a VM of exactly that many)."""

    kvm: Kvm
    vm_fd: VmFd
    memory: GuestMemory | None = None
    vcpus: tuple[_MadeVcpu, ...] = ()

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        if self.memory is not None:
            self.memory.close()
        self.vm_fd.close()
        self.kvm.close()


_ready: tuple[str, _Made] | None = None  # prepare's VM, for a build_vm of that path
# KVM_GET_SUPPORTED_CPUID's answer: the host's, the same for every VM (read once a process;
# the template's forks inherit it).
_host_cpuid: list[arch_cpuid.CpuidEntry] | None = None
_REHEARSAL_MEMORY = 16 << 20  # the least VmConfig takes
# The machines whose ACPI tables ``rehearse`` makes ahead: up to this many vCPUs and virtio
# devices (the default guest has 3; about 0.3 ms a VM saves, 0.3 ms each made ahead).
_REHEARSAL_VCPUS = 2
_REHEARSAL_VIRTIO = 4


def prepare(
    kvm_path: str = "/dev/kvm",
    memory: int | None = None,
    kernel: str | None = None,
    vcpus: int | None = None,
) -> None:
    """Get the next ``build_vm`` of ``kvm_path`` in this process ready (see the module
    docstring): a KVM VM is made and kept for it, with ``memory`` bytes of guest RAM (a
    guess: a build for another size or a restore makes its own VM), its irqchip and PIT,
    with ``memory`` and ``vcpus`` that many vCPUs (their CPUID, boot MSRs and LINT pins
    set: a build for another number makes its own VM), and the file ``kernel`` read ahead
    (``kasou.loader.read_ahead``; another is read then). Raises ``KasouError`` (a
    ``HostError`` for a host without usable KVM) or ``OSError``: the caller may ignore it,
    and ``build_vm`` reports it."""
    global _ready
    if _ready is not None:
        return
    made = _new_vm(kvm_path)
    if memory is not None:
        try:
            made = made._replace(memory=_add_memory(made.vm_fd, memory, "anonymous", False))
            if vcpus is not None:
                for index in range(vcpus):  # kept in ``made`` one by one: closed on a failure
                    vcpu = _new_vcpu(made.kvm, made.vm_fd, index, vcpus)
                    made = made._replace(vcpus=(*made.vcpus, vcpu))
        except BaseException:
            made.close()
            raise
    _ready = (kvm_path, made)
    if kernel is not None:
        read_ahead(Path(kernel), extract=backend() is Backend.PVM)


def host_cpuid(kvm: Kvm) -> list[arch_cpuid.CpuidEntry]:
    """The CPUID leaves this host's KVM supports (read once a process)."""
    global _host_cpuid
    if _host_cpuid is None:
        _host_cpuid = [
            arch_cpuid.CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in kvm.get_supported_cpuid()
        ]
    return _host_cpuid


def _take_ready(kvm_path: str, config: VmConfig, restore: MachineImage | None) -> _Made:
    """The VM ``prepare`` made (once) if it fits this build, else a new one."""
    global _ready
    ready, _ready = _ready, None
    if ready is not None:
        path, made = ready
        fits = made.memory is None or (
            restore is None
            and made.memory.size == config.memory
            and len(made.vcpus) in (0, config.vcpus)
            and config.memory_backing == "anonymous"
            and not config.hugepages
        )
        if path == kvm_path and fits:
            return made
        made.close()
    return _new_vm(kvm_path)


def _new_vm(kvm_path: str) -> _Made:
    """/dev/kvm opened and checked, and a KVM VM with its TSS and identity-map pages."""
    with contextlib.ExitStack() as cleanup:
        kvm = Kvm(kvm_path)
        cleanup.callback(kvm.close)
        kvm.require_all()
        vm_fd = kvm.create_vm()
        cleanup.callback(vm_fd.close)
        vm_fd.set_tss_addr(TSS_ADDRESS)
        vm_fd.set_identity_map_addr(IDENTITY_MAP_ADDRESS)
        host_cpuid(kvm)
        cleanup.pop_all()
    return _Made(kvm, vm_fd)


def _add_memory(
    vm_fd: VmFd,
    size: int,
    backing: Literal["anonymous", "memfd"],
    hugepages: bool,
    restore: MachineImage | None = None,
) -> GuestMemory:
    """Guest RAM (new, or a restore's) in the VM's memory slots, then its irqchip and PIT."""
    ram = layout.ram_layout(size)
    if restore is not None and restore.memory is not None:
        memory = restore.memory
    elif restore is not None and restore.memory_file is not None:
        memory = GuestMemory.from_file(ram, restore.memory_file, hugepages=hugepages)
    else:
        memory = GuestMemory.create(ram, backing, hugepages)
    try:
        # The memory slots before the irqchip, which the KVM API allows in either order
        # (Documentation/virt/kvm/api.rst): measured on this host, the first
        # KVM_SET_USER_MEMORY_REGION took 4-11 ms after KVM_CREATE_IRQCHIP, 0.1 ms before it.
        for slot, region in enumerate(memory.regions):
            vm_fd.set_user_memory_region(slot, region.gpa, region.size, region.host_address)
        vm_fd.create_irqchip()
        vm_fd.create_pit2()
    except BaseException:
        memory.close()
        raise
    return memory


def rehearse(kvm_path: str = "/dev/kvm") -> None:
    """Build and close a VM with no kernel and no devices beyond the legacy ones: the code
    paths and data of a build touched once, and what every VM's build makes alike (the
    host's CPUID, each vCPU's, the page tables, the ACPI tables of the usual machines)
    made, in this process and for its forks.
    Raises ``KasouError`` or ``OSError`` as ``build_vm`` would."""
    config = VmConfig(
        kernel=Path(os.devnull), memory=_REHEARSAL_MEMORY, seccomp=False, restoring=True
    )
    _build(config, lambda data: None, None, (), _new_vm(kvm_path), None, _rehearsal_load).close()
    for vcpus in range(1, _REHEARSAL_VCPUS + 1):  # with COM2, as ``kasou run`` has it
        for devices in range(_REHEARSAL_VIRTIO + 1):
            _acpi_tables(_acpi_config(vcpus, devices, com2=True))


def _rehearsal_load(
    config: VmConfig,
    memory: GuestMemory,
    cmdline: str,
    extract: bool,
    tables: acpi.AcpiConfig | None = None,
) -> int:
    """``_load_guest`` without a kernel: the boot structures every Linux guest gets."""
    write_cmdline(memory, layout.CMDLINE, cmdline, layout.CMDLINE_SIZE - 1)
    mptable.write_mptable(memory, config.vcpus)
    _write_acpi(memory, tables)
    gdt.write_gdt(memory)
    paging.write_identity_map(memory)
    return layout.ZERO_PAGE  # never run


def _build(
    config: VmConfig,
    console_output: Callable[[bytes], None],
    agent: AgentLine | None,
    extra_devices: Sequence[ExtraDevice],
    made: _Made,
    restore: MachineImage | None,
    load: Callable[..., int | MultibootEntry],
) -> Vm:
    with contextlib.ExitStack() as cleanup:
        kvm, vm_fd, memory, ready = made
        cleanup.callback(kvm.close)
        cleanup.callback(vm_fd.close)
        config.check_host(kvm.max_vcpus())
        if memory is None:  # prepare made it otherwise, with the irqchip and PIT
            memory = _add_memory(
                vm_fd, config.memory, config.memory_backing, config.hugepages, restore
            )
        cleanup.callback(memory.close)
        for vcpu in ready:  # prepare made them, for exactly this many
            cleanup.callback(vcpu.close)

        # On PVM a bzImage's own decompressor loops on page faults (shared/ENVIRONMENT.md):
        # boot the vmlinux inside it instead, as the 64-bit protocol allows for any vmlinux.
        plan = virtio_plan(config)
        announced = len(plan) if config.virtio_cmdline or not config.acpi else 0
        cmdline = _with_virtio_devices(config.cmdline, announced)
        tables = _acpi_config(config.vcpus, len(plan), agent is not None) if config.acpi else None
        entry: int | MultibootEntry | None = None
        if restore is None:
            entry = load(config, memory, cmdline, extract=backend() is Backend.PVM, tables=tables)

        pio, mmio = Bus("pio"), Bus("mmio")
        vm = Vm(config, kvm, vm_fd, memory, pio, mmio, {}, cleanup.pop_all())

    # From here on the VM owns the cleanup stack: a failure closes the VM.
    try:
        _wire_devices(vm, console_output, agent, extra_devices, restore)
        _wire_virtio(vm, plan, console_output)
        _create_vcpus(vm, entry, ready)
        if restore is not None:
            from kasou.vmm.snapshot import restore_machine

            restore_machine(vm, restore)
    except BaseException:
        vm.close()
        raise
    return vm


def _load_guest(
    config: VmConfig,
    memory: GuestMemory,
    cmdline: str,
    extract: bool,
    tables: acpi.AcpiConfig | None = None,
) -> int | MultibootEntry:
    """Load kernel, initrd, command line and boot structures (the ACPI tables when ``tables``
    is given); return the 64-bit entry (a Multiboot kernel's entry and information address)."""
    kernel = load_kernel(memory, config.kernel, extract=extract)
    if kernel.kind == "multiboot":
        return _load_multiboot(config, memory, cmdline, kernel, tables)
    if config.extra_initrds:
        raise ConfigError(
            "initrd",
            f"a Linux kernel takes one initrd, {len(config.initrds)} were given: join them "
            "into one (concatenated cpio archives are one initramfs)",
        )
    ram_top = max(region.end for region in memory.regions if region.gpa < layout.MMIO_HOLE_START)
    initrd = None
    if config.initrd is not None:
        initrd = load_initrd(memory, config.initrd, kernel, ram_top)
    cmdline_size = write_cmdline(memory, layout.CMDLINE, cmdline, kernel.cmdline_max)
    mptable.write_mptable(memory, config.vcpus)
    params = build_boot_params(
        setup_header=kernel.setup_header,
        cmdline_addr=layout.CMDLINE,
        cmdline_size=cmdline_size,
        initrd=initrd,
        e820=layout.e820_map([(region.gpa, region.size) for region in memory.regions]),
        acpi_rsdp_addr=_write_acpi(memory, tables),
    )
    memory.write(layout.ZERO_PAGE, params)
    gdt.write_gdt(memory)
    paging.write_identity_map(memory)
    return kernel.entry


class MultibootEntry(NamedTuple):
    """Where a Multiboot kernel starts (32-bit, physical) and its information (EBX)."""

    entry: int
    info: int


def _load_multiboot(
    config: VmConfig,
    memory: GuestMemory,
    cmdline: str,
    kernel: LoadedKernel,
    tables: acpi.AcpiConfig | None,
) -> MultibootEntry:
    """Modules after the kernel, the command line, the Multiboot information below 1 MiB
    (Multiboot 0.6.96 §3.3), and the same MP and ACPI tables a Linux guest gets."""
    modules = multiboot.load_modules(memory, config.initrds, kernel.end)
    # GRUB and QEMU pass the kernel's path first, then its arguments.
    limit = min(kernel.cmdline_max, layout.CMDLINE_SIZE - 1)
    write_cmdline(memory, layout.CMDLINE, f"{config.kernel} {cmdline}", limit)
    e820 = layout.e820_map([(region.gpa, region.size) for region in memory.regions])
    info = multiboot.write_info(
        memory,
        layout.MULTIBOOT_INFO,
        layout.MULTIBOOT_INFO_SIZE,
        cmdline=layout.CMDLINE,
        modules=modules,
        e820=e820,
    )
    mptable.write_mptable(memory, config.vcpus)
    _write_acpi(memory, tables)  # found by the RSDP scan of 0xe0000-0xfffff
    gdt.write_gdt(memory)
    return MultibootEntry(kernel.entry, info)


def _acpi_config(vcpus: int, virtio_devices: int, com2: bool) -> acpi.AcpiConfig:
    """What the ACPI tables describe: the machine ``_wire_devices`` and ``_wire_virtio``
    build, with the PM registers of ``devices/legacy/power.py``."""
    return acpi.AcpiConfig(
        vcpus=vcpus,
        serial=(COM1, COM2) if com2 else (COM1,),
        virtio=tuple(
            (layout.virtio_mmio_address(slot), layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQS[slot])
            for slot in range(min(virtio_devices, len(layout.VIRTIO_IRQS)))
        ),
        pm1a_event=PM1A_EVT_PORT,
        pm1a_control=PM1A_CNT_PORT,
        pm_timer=PM_TMR_PORT,
        gpe0_block=GPE0_PORT,
        sci_irq=layout.IRQ_SCI,
    )


def _write_acpi(memory: GuestMemory, tables: acpi.AcpiConfig | None) -> int:
    """Write the ACPI tables (after the MP table: a kernel with ACPI prefers them) and a new
    random VM generation ID; return the RSDP's address, 0 for none (``--no-acpi``)."""
    if tables is None:
        return 0
    memory.write(layout.ACPI_START, _acpi_tables(tables))
    if tables.vmgenid:
        acpi.write_generation_id(memory, os.urandom(layout.VMGENID_SIZE))
    return layout.ACPI_START


# The ACPI tables by what they describe (``AcpiConfig``, all tuples): the same bytes for
# every VM alike. ``rehearse`` makes those of the usual machines once in the template.
_acpi_made: dict[acpi.AcpiConfig, bytes] = {}


def _acpi_tables(tables: acpi.AcpiConfig) -> bytes:
    made = _acpi_made.get(tables)
    if made is None:
        made = _acpi_made[tables] = acpi.build_acpi_tables(tables, layout.ACPI_START)
    return made


def _wire_devices(
    vm: Vm,
    console_output: Callable[[bytes], None],
    agent: AgentLine | None,
    extra_devices: Sequence[ExtraDevice],
    restore: MachineImage | None = None,
) -> None:
    """The legacy devices: made new, or from their saved states when restoring."""
    from kasou.devices.legacy.i8042 import I8042State
    from kasou.devices.legacy.power import AcpiPmState
    from kasou.devices.legacy.rtc import RtcState
    from kasou.devices.legacy.serial import SerialState

    def saved(key: str, kind: type[Any]) -> Any:
        if restore is None:
            return None
        from kasou.vmm.snapshot import device_state

        return device_state(restore, key, kind)

    triggers: list[EventfdTrigger] = []

    def close_triggers() -> None:
        for trigger in triggers:
            trigger.close()

    vm._cleanup.callback(close_triggers)

    def line(gsi: int) -> EventfdTrigger:
        trigger = EventfdTrigger(vm.vm_fd, gsi)
        triggers.append(trigger)
        return trigger

    state = saved("serial0", SerialState)
    serial = (
        Serial(line(COM1[1]), console_output)
        if state is None
        else Serial.restore(line(COM1[1]), console_output, state)
    )
    vm.pio.insert(serial, COM1[0], 8)
    vm.devices["serial0"] = serial
    if agent is not None:
        state = saved("serial1", SerialState)
        agent_serial = (
            Serial(line(COM2[1]), agent.output, on_input_ready=agent.input_ready)
            if state is None
            else Serial.restore(
                line(COM2[1]), agent.output, state, on_input_ready=agent.input_ready
            )
        )
        vm.pio.insert(agent_serial, COM2[0], 8)
        vm.devices["serial1"] = agent_serial

    def reset() -> None:
        vm.end(GuestExit(ExitKind.REBOOT, "the guest reset the machine"))

    def poweroff() -> None:
        vm.end(GuestExit(ExitKind.POWEROFF, "the guest powered off"))

    state = saved("i8042", I8042State)
    i8042 = I8042(reset) if state is None else I8042.restore(reset, state)
    vm.pio.insert(i8042, I8042_PORT, 5)
    vm.devices["i8042"] = i8042
    state = saved("rtc", RtcState)
    rtc = Rtc() if state is None else Rtc.restore(time.time, state)
    vm.pio.insert(rtc, RTC_PORT, 2)
    vm.devices["rtc"] = rtc
    # The ACPI PM registers, with the power-off register (PM1a_CNT) that guests without ACPI
    # use too; the power button's SCI is a level line.
    sci = IrqLine(vm.vm_fd, layout.IRQ_SCI)
    state = saved("pm", AcpiPmState)
    pm = AcpiPm(sci, poweroff) if state is None else AcpiPm.restore(sci, poweroff, state)
    vm.pio.insert(pm, PM_BASE, PM_SIZE)
    vm.devices["pm"] = pm
    if vm.config.debug_exit is not None:
        _wire_debug_exit(vm, vm.config.debug_exit.port, vm.config.debug_exit.size)
    for extra in extra_devices:
        (vm.pio if extra.bus == "pio" else vm.mmio).insert(extra.device, extra.base, extra.length)


def _wire_debug_exit(vm: Vm, port: int, size: int) -> None:
    """``--debug-exit``: a guest write there ends the VM with the status it chose."""

    def debug_exit(value: int) -> None:
        status = exit_status(value)
        reason = f"the guest wrote {value:#x} to the debug-exit port (exit status {status})"
        vm.end(GuestExit(ExitKind.DEBUG_EXIT, reason, code=status))

    try:
        vm.pio.insert(DebugExit(debug_exit, size), port, size)
    except BusError as error:
        raise ConfigError(
            "debug-exit", f"port {port:#x} is taken ({error}): choose another, like 0xf4"
        ) from None


class VirtioSlot(NamedTuple):
    """One virtio device to be made: its kind, its id in ``Vm.devices``, its config."""

    kind: str  # "block", "net", "vsock", "rng", "balloon"
    id: str
    config: object


def virtio_plan(config: VmConfig) -> list[VirtioSlot]:
    """The virtio devices ``config`` asks for, in slot order."""
    plan = [VirtioSlot("block", f"block{i}", disk) for i, disk in enumerate(config.disks)]
    plan += [VirtioSlot("net", f"net{i}", net) for i, net in enumerate(config.nets)]
    if config.vsock is not None:
        plan.append(VirtioSlot("vsock", "vsock", config.vsock))
    if config.rng:
        plan.append(VirtioSlot("rng", "rng", None))
    if config.balloon:
        plan.append(VirtioSlot("balloon", "balloon", None))
    if config.virtio_console is not None:
        plan.append(VirtioSlot("console", "console", config.virtio_console))
    return plan


def _with_virtio_devices(cmdline: str, count: int) -> str:
    """Announce ``count`` virtio-mmio devices to Linux on its command line
    (drivers/virtio/virtio_mmio.c: ``virtio_mmio.device=<size>@<base>:<irq>``)."""
    words = [
        f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE >> 10}K@{layout.virtio_mmio_address(slot):#x}"
        f":{layout.VIRTIO_IRQS[slot]}"
        for slot in range(count)
    ]
    return " ".join([cmdline, *words]) if words else cmdline


def _wire_virtio(
    vm: Vm, plan: Sequence[VirtioSlot], console_output: Callable[[bytes], None]
) -> None:
    """Make each planned device, put its transport on the MMIO bus with an irqfd for its
    interrupt and an ioeventfd per queue, and give it a reactor (docs/design.md: block
    devices get a thread each, every other device shares the VM's device loop)."""
    if not plan:
        return
    if len(plan) > min(layout.VIRTIO_MMIO_SLOTS, len(layout.VIRTIO_IRQS)):
        raise HostError(f"{len(plan)} virtio devices: kasou has {len(layout.VIRTIO_IRQS)} IRQs")
    from kasou.devices.virtio import MMIO_SIZE, NOTIFY_OFFSET, VirtioMmio
    from kasou.event import EventLoop

    shared = _start_loop(vm, EventLoop(f"kasou-{vm.config.name}-virtio"))
    for slot, planned in enumerate(plan):
        base = layout.virtio_mmio_address(slot)
        trigger = EventfdTrigger(vm.vm_fd, layout.VIRTIO_IRQS[slot])
        vm._cleanup.callback(trigger.close)
        reactor = shared
        if planned.kind == "block":
            reactor = _start_loop(vm, EventLoop(f"kasou-{planned.id}"))
        device = _make_virtio_device(vm, planned, reactor, console_output)
        vm._cleanup.callback(device.close)
        transport = VirtioMmio(device, vm.memory, trigger)
        vm._cleanup.callback(transport.close)
        for index, fd in enumerate(transport.notifiers):
            vm.vm_fd.ioeventfd(fd, base + NOTIFY_OFFSET, 4, datamatch=index)
        vm.mmio.insert(transport, base, MMIO_SIZE)
        vm.devices[planned.id] = transport
        # The loops stop before the devices close (the cleanup stack runs backwards).
        if reactor is not shared:
            vm._cleanup.callback(reactor.stop)
    vm._cleanup.callback(shared.stop)


def _start_loop(vm: Vm, loop: Any) -> Any:
    from kasou.jail.seccomp import Seccomp

    guard = Seccomp.active() if vm.config.seccomp else None
    if guard is None:
        loop.start()
    else:  # started from the supervisor, installing the device list first (jail/seccomp.py)
        loop.on_start = guard.hook("device")
        guard.spawn(loop.start)
    vm.loops.append(loop)
    vm._cleanup.callback(loop.stop)  # stopping twice is harmless; this one covers failures
    return loop


def _make_virtio_device(
    vm: Vm, planned: VirtioSlot, reactor: Any, console_output: Callable[[bytes], None]
) -> Any:
    """The only place that constructs virtio device models."""
    if planned.kind == "block":
        from kasou.devices.virtio.block import Block
        from kasou.disk import open_disk

        disk = planned.config
        assert isinstance(disk, DiskConfig)
        try:
            backend = open_disk(disk.path, format=disk.format, read_only=disk.read_only)
        except KasouError as error:
            raise ConfigError("disk", f"{disk.path}: {error}") from error
        except OSError as error:
            raise ConfigError("disk", f"{disk.path}: {error.strerror}") from error
        if backend.size % disk.sector_size:
            backend.close()
            raise ConfigError(
                "disk", f"{disk.path}: its size is not a multiple of sector={disk.sector_size}"
            )
        return Block(reactor, backend, disk, name=planned.id)
    if planned.kind == "net":
        from kasou.devices.virtio.net import Net
        from kasou.tap import open_tap

        net = planned.config
        assert isinstance(net, NetConfig)
        from kasou.vmm.jailed import adopted_tap  # a jail opened it before dropping root

        return Net(
            reactor,
            adopted_tap(planned.id) or open_tap(net.tap),
            mac=net.mac,
            name=planned.id,
            rx_rate=net.rx_rate,
            tx_rate=net.tx_rate,
        )
    if planned.kind == "vsock":
        from kasou.devices.virtio.vsock import Vsock

        vsock = planned.config
        assert isinstance(vsock, VsockConfig)
        return Vsock(reactor, vsock.cid, vsock.uds)
    if planned.kind == "rng":
        from kasou.devices.virtio.rng import Rng

        return Rng(reactor)
    if planned.kind == "balloon":
        from kasou.devices.virtio.balloon import Balloon

        return Balloon(reactor)
    if planned.kind == "console":
        from kasou.devices.virtio.console import Console

        console = planned.config
        assert isinstance(console, VirtioConsoleConfig)
        return Console(reactor, console_output, socket=console.socket)
    raise HostError(f"virtio device kind {planned.kind!r} is not built yet")


def _create_vcpus(
    vm: Vm, entry: int | MultibootEntry | None, ready: Sequence[_MadeVcpu] = ()
) -> None:
    """The vCPUs (``ready``: made already, and closed by the VM's cleanup) with their
    CPUID and boot MSRs; the boot vCPU in the state its boot protocol asks for (``entry``;
    ``None``: a restore sets every register afterwards)."""
    for index in range(vm.config.vcpus):
        if ready:
            fd, stats = ready[index]
        else:
            made = _new_vcpu(vm.kvm, vm.vm_fd, index, vm.config.vcpus)
            vm._cleanup.callback(made.close)
            fd, stats = made
        if isinstance(entry, MultibootEntry):
            if index == 0:
                _set_multiboot_registers(fd, entry)
        elif index == 0 and entry is not None:
            _set_boot_registers(fd, entry)
        vm.vcpus.append(Vcpu(fd, vm.pio, vm.mmio, vm.end, stats))


def _new_vcpu(kvm: Kvm, vm_fd: VmFd, index: int, vcpus: int) -> _MadeVcpu:
    """vCPU ``index`` of ``vcpus``, with its CPUID, boot MSRs and LINT pins."""
    fd = vm_fd.create_vcpu(index)
    stats = None
    try:
        # Opened now: a vCPU ioctl waits while the vCPU is in KVM_RUN. Parsed on first read.
        stats = open_stats(fd)
        fd.set_cpuid2(_guest_cpuid(host_cpuid(kvm), index, vcpus, _tsc_khz(fd)))
        fd.set_msrs(msrs.boot_msrs())
        _set_lint(fd)
    except BaseException:
        _MadeVcpu(fd, stats).close()
        raise
    return _MadeVcpu(fd, stats)


# Each vCPU's CPUID by (vCPU, vCPUs, TSC kHz): the same for every VM of this host.
_cpuid_made: dict[tuple[int, int, int | None], list[b.KvmCpuidEntry2]] = {}


def _guest_cpuid(
    supported: list[arch_cpuid.CpuidEntry], index: int, vcpus: int, tsc_khz: int | None
) -> list[b.KvmCpuidEntry2]:
    """vCPU ``index``'s CPUID for KVM_SET_CPUID2 (which copies the entries)."""
    key = (index, vcpus, tsc_khz)
    made = _cpuid_made.get(key)
    if made is None:
        entries = arch_cpuid.guest_cpuid(supported, vcpu_id=index, vcpus=vcpus, tsc_khz=tsc_khz)
        made = [
            b.KvmCpuidEntry2(
                function=e.function,
                index=e.index,
                flags=e.flags,
                eax=e.eax,
                ebx=e.ebx,
                ecx=e.ecx,
                edx=e.edx,
            )
            for e in entries
        ]
        _cpuid_made[key] = made
    return made


def _tsc_khz(fd: VcpuFd) -> int | None:
    try:
        return fd.get_tsc_khz() or None
    except HostError:
        return None


def _set_lint(fd: VcpuFd) -> None:
    """LINT0 as ExtINT (the 8259's output) and LINT1 as NMI, as a PC's BIOS leaves them
    (Intel MP spec 1.4 §3.6.2.2, virtual wire mode)."""
    lapic = fd.get_lapic()
    # The whole struct as bytes: reading the c_char array field would stop at its first
    # zero byte (ctypes treats it as a C string).
    raw = bytearray(bytes(lapic))
    for offset, mode in ((0x350, 0b111), (0x360, 0b100)):  # LVT LINT0, LVT LINT1
        value = int.from_bytes(raw[offset : offset + 4], "little")
        value = (value & ~0x700) | (mode << 8)
        raw[offset : offset + 4] = value.to_bytes(4, "little")
    ctypes.memmove(ctypes.addressof(lapic), bytes(raw), len(raw))
    fd.set_lapic(lapic)


def _segment(segment: gdt.Segment) -> b.KvmSegment:
    return b.KvmSegment(
        base=segment.base,
        limit=segment.limit,
        selector=segment.selector,
        type=segment.type,
        present=segment.present,
        dpl=segment.dpl,
        db=segment.db,
        s=segment.s,
        l=segment.l,
        g=segment.g,
        avl=segment.avl,
        unusable=0 if segment.present else 1,
    )


def _flat_segments(sregs: b.KvmSregs, segments: Sequence[gdt.Segment]) -> None:
    """Code, data and TSS from kasou's boot GDT (flat, as both boot protocols want), the
    GDT itself, and an empty IDT."""
    code, data, tss = (_segment(segment) for segment in segments)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.gdt.base, sregs.gdt.limit = gdt.GDT_ADDRESS, gdt.GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = layout.IDT, 0


def _set_boot_registers(fd: VcpuFd, entry: int) -> None:
    """The boot CPU as the 64-bit boot protocol wants it: long mode, identity-mapped,
    flat segments, interrupts off, RSI = boot_params (Documentation/arch/x86/boot.rst)."""
    sregs = fd.get_sregs()
    _flat_segments(sregs, gdt.boot_segments())
    sregs.cr3 = paging.PML4_ADDRESS
    sregs.cr4 |= paging.LONG_MODE_CR4
    sregs.cr0 |= paging.LONG_MODE_CR0
    sregs.efer |= paging.LONG_MODE_EFER
    fd.set_sregs(sregs)
    regs = b.KvmRegs(rip=entry, rsi=layout.ZERO_PAGE, rflags=0x2, rsp=layout.BOOT_STACK)
    fd.set_regs(regs)
    fpu = b.KvmFpu(fcw=0x37F, mxcsr=0x1F80)
    fd.set_fpu(fpu)


def _set_multiboot_registers(fd: VcpuFd, entry: MultibootEntry) -> None:
    """The boot CPU as Multiboot 0.6.96 §3.2 wants it: 32-bit protected mode, paging off, CS
    flat 32-bit code, the other segments flat data, EFLAGS.VM and IF clear, EAX the boot
    loader magic, EBX the information. A20 is always on under KVM. The spec leaves ESP to the
    kernel; kasou's boot stack is there anyway."""
    sregs = fd.get_sregs()
    _flat_segments(sregs, gdt.protected_mode_segments())
    sregs.cr0 = paging.CR0_PE | paging.CR0_ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0
    fd.set_sregs(sregs)
    regs = b.KvmRegs(
        rip=entry.entry,
        rax=multiboot.BOOTLOADER_MAGIC,
        rbx=entry.info,
        rflags=0x2,
        rsp=layout.BOOT_STACK,
    )
    fd.set_regs(regs)
    fd.set_fpu(b.KvmFpu(fcw=0x37F, mxcsr=0x1F80))
