"""kasou's test guest kit: one small purpose-built guest that kasou's tests and benchmarks boot.

This package owns the guest's sources (``src/``: C, GNU assembler, a linker script), their
build with the machine's gcc into a cached ELF (``build_guest()``), and the checks on the
result. It does not boot anything: kasou's kvm-tier tests do, and
``tests/guestkit_qemu`` boots the same ELF under QEMU as a peer.

Booting
-------
The one ELF boots two ways:

- kasou: Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst). Load the PT_LOAD
  segment at its ``p_paddr`` (1 MiB), enter ``e_entry`` in long mode with an identity map,
  interrupts off and RSI = the ``boot_params`` address; the command line comes from
  ``cmd_line_ptr`` (offset 0x228, with ``ext_cmd_line_ptr`` at 0x0c8).
- QEMU: a Multiboot v1 kernel with the header's address fields (``qemu-system-x86_64 -kernel
  guest.elf -append "..."``). Its 32-bit entry switches to long mode itself.

Both continue in the same 64-bit C code, which loads its own GDT (ring-3 segments), TSS,
IDT and page tables (the first 4 GiB identity-mapped, user-accessible, the top GiB
uncached), masks the 8259s and runs the workload the command line names, mostly in ring 3.

Ring 3 reaches ring 0 with ``ud2``: the #UD handler checks for the ud2 bytes and a ring-3
CS, does the service in RAX (args RDI, RSI; result RAX: putc 0, write 1, getc 2, outb 3,
inb 4, outw 5, inw 6, outl 7, inl 8, reset 9, halt 10, exit 11) and returns past it. On PVM
(shared/ENVIRONMENT.md) `int N` and `syscall` from ring 3 are broken; exceptions work.

Workloads
---------
Chosen with ``kasou.test=NAME`` plus ``key=value`` words (decimal or ``0x`` hex). Every run
prints ``kasou-guest: boot=linux|multiboot test=NAME`` to COM1 first, and the finishing ones
end with ``kasou-guest: done`` or ``kasou-guest: fail <reason>`` and a reset through the
i8042 (0xfe to port 0x64): run kasou with exit-on-reboot and QEMU with ``-no-reboot``.
Any unexpected exception or interrupt also ends in ``fail`` with the vector and RIP.

========== ===================================================================================
hello      ring 3 prints ``hello from ring 3``.
echo n=N   prints ``echo: ready n=N``, reads N bytes from COM1 (polling), writes each back,
           then a newline unless the last byte was one.
dispatch   from ring 3, in this order: MMIO write32 0x11223344 at base+0x00, read32 at
           +0x04 (printed ``mmio32=0x...``), write8 0xa5 at +0x08, read8 +0x0c (``mmio8=``),
           write16 0xbeef at +0x10, read16 +0x14 (``mmio16=``), write64 0x0102030405060708
           at +0x18, read64 +0x20 (``mmio64=``), with base ``TEST_MMIO_BASE``; then through
           services outb 0x5a to port 0x500, inb 0x500 (``pio8=``), outw 0xbeef to 0x502,
           inw 0x502 (``pio16=``), outl 0xcafef00d to 0x504, inl 0x504 (``pio32=``).
pio        ``count=N port=P`` (1000, 0x80): N ``outb`` from ring 0, then ``count=N``.
mmio       ``count=N addr=A ring=0|3`` (1000, 0xd0000000, 0): N 32-bit writes, then
           ``count=N``.
irq        routes COM1's IRQ 4 through the IOAPIC (pin from the MP table, else 4; edge, high)
           and prints ``uart_irq_pin=P``; runs the LAPIC timer periodic at 1 ms (vector
           0x40); ring 3 turns on the UART's THR-empty interrupt and spins with interrupts on
           until 10 ticks and the UART interrupt came, then prints ``ticks=K``,
           ``ticks_ring3=K`` and ``uart_irq=1``.
smp        finds the MP table, prints ``mp_cpus=N``, starts each AP with INIT-SIPI-SIPI
           (trampoline at 0x8000); each prints ``cpu ID up`` (LAPIC ID) and adds 1 to a
           shared counter with a locked add; the BSP prints ``cpus=N``.
counter    ring 3 zeroes the 64-bit counter at ``COUNTER_GPA``, prints
           ``counter_addr=0x200000`` and increments it forever.
triple     prints ``triple fault next``, loads an empty IDT and faults: a triple fault.
reset      prints ``resetting`` and resets through the i8042.
wait       prints ``ready`` and halts with interrupts off, forever.
========== ===================================================================================

Usage::

    from kasou.guestkit import build_guest, cmdline
    elf = build_guest()                       # compiled once, then from the cache
    args = cmdline("pio", count=1_000_000)    # 'kasou.test=pio count=1000000'
"""

from __future__ import annotations

from kasou.errors import ConfigError
from kasou.guestkit.build import (
    COUNTER_GPA,
    LOAD_ADDR,
    TEST_MMIO_BASE,
    TEST_PIO_BASE,
    GuestImage,
    GuestKitError,
    build_guest,
    cache_key,
    default_cache_dir,
    inspect_guest,
    refused_instructions,
)

__all__ = [
    "BOOT_PREFIX",
    "COUNTER_GPA",
    "DONE_LINE",
    "FAIL_PREFIX",
    "LOAD_ADDR",
    "TEST_MMIO_BASE",
    "TEST_PIO_BASE",
    "WORKLOADS",
    "GuestImage",
    "GuestKitError",
    "build_guest",
    "cache_key",
    "cmdline",
    "default_cache_dir",
    "inspect_guest",
    "refused_instructions",
]

WORKLOADS = (
    "hello",
    "echo",
    "dispatch",
    "pio",
    "mmio",
    "irq",
    "smp",
    "counter",
    "triple",
    "reset",
    "wait",
)
BOOT_PREFIX = "kasou-guest: boot="
DONE_LINE = "kasou-guest: done"
FAIL_PREFIX = "kasou-guest: fail "


def cmdline(test: str, **args: int) -> str:
    """The command line that runs workload ``test`` with ``key=value`` arguments."""
    if test not in WORKLOADS:
        raise ConfigError("kasou.test", f"unknown workload {test!r}: one of {', '.join(WORKLOADS)}")
    words = [f"kasou.test={test}"]
    for key, value in args.items():
        if value < 0:
            raise ConfigError(key, f"{value} is negative: the guest reads unsigned numbers")
        words.append(f"{key}={value:#x}" if key in ("addr", "port") else f"{key}={value}")
    return " ".join(words)
