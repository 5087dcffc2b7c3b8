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
CS, does the service in RAX (args RDI, RSI, RDX; result RAX: putc 0, write 1, getc 2, outb 3,
inb 4, outw 5, inw 6, outl 7, inl 8, reset 9, halt 10, exit 11, route a virtio interrupt 12,
wait for one 13) and returns past it. On PVM (shared/ENVIRONMENT.md) `int N` and `syscall`
from ring 3 are broken; exceptions work. A machine without an i8042 (QEMU's microvm) is
ended with a triple fault instead of the i8042 reset.

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
memcheck   ``mib=M rate=R report=N`` (16, 0, 16): ring 3 cycles over M MiB of RAM from 16 MiB
           (the VM needs 16 + M MiB), each pass checking every word for what the pass
           before wrote and writing its own (``kasou.guestkit.memcheck`` mirrors both and
           reads the status block at 0x201000). Prints ``memcheck: ready base=0x1000000
           mib=M``, then ``memcheck: pass P`` as every Nth pass starts, forever; a word
           that differs ends it: ``fail memcheck: page I word W pass P: got .. want ..``.
           ``rate=R``: at most R pages per tick of a 1 ms LAPIC timer.
triple     prints ``triple fault next``, loads an empty IDT and faults: a triple fault.
reset      prints ``resetting`` and resets through the i8042.
wait       prints ``ready`` and halts with interrupts off, forever.
vlist      one line per virtio-mmio device found, ``virtio id=D base=0x... vendor=0x...
           ioapic=0x... pin=P``, then ``virtio devices=N``.
vblk       ``sector=S count=N`` (1, 8), on the first block device: ``vblk capacity=<sectors>
           blk_size=<n> ro=<0|1>``, ``vblk serial=<id>`` (GET_ID), ``vblk sector0
           crc=0x<crc32>`` (zlib's CRC-32 of sector 0 as read). Writable disk: writes
           ``vblk_pattern(S, N)`` there, ``vblk write sector=S count=N status=0``, flushes
           (``vblk flush status=0``), reads back and compares (``vblk verify sector=S
           count=N ok``). Read-only disk: one write, which must fail with
           VIRTIO_BLK_S_IOERR: ``vblk ro-write status=1``. Then ``vblk ok``.
vblk-bench ``mode=read|write|randread size=BYTES count=N depth=D`` (read, 65536, 1000, 1;
           also ``sector=S span=SECTORS``): N requests of BYTES, D in flight, sequential
           from S wrapping within SPAN (the disk) or random BYTES-aligned blocks in it.
           ``vblk-bench start mode=... bytes=B``, then ``vblk-bench end bytes=B
           notifies=K irqs=I`` (QueueNotify writes, interrupts taken): time between the two.
vblk-watch ``sector=S every=N`` (0, 64): reads sector S of the first block device forever,
           printing ``vblk-watch read=K crc=0x<crc32>`` every Nth read (zlib's CRC-32): a VM
           restored from a snapshot shows which disk content it was restored with.
vrng       two reads of 64 bytes from virtio-rng: ``vrng 1 <hex>``, ``vrng 2 <hex>``, then
           ``vrng ok``; fails if both are all zero or they are equal.
vnet       ``payload=TEXT`` (kasou): ``vnet mac=<config MAC>``, posts receive buffers, sends
           one broadcast frame of ethertype ``VNET_ETHERTYPE`` carrying TEXT (zero-padded to
           60 bytes) with a zeroed 12-byte virtio_net_hdr_v1, prints ``vnet tx len=L``, then
           waits for a frame of that ethertype (others are skipped):
           ``vnet rx len=L src=<MAC> payload=<text>``, ``vnet skipped=K``, ``vnet ok``.
           ``count=N`` (1) sends the frame N times, one in flight, between ``vnet tx start
           count=N`` and ``vnet tx len=L count=N``.
vsock      ``port=P lport=L payload=TEXT`` (1234, 49152, kasou-vsock): ``vsock
           guest_cid=C``; connects to the host (CID 2) port P: ``vsock connected port=P
           lport=L peer_buf_alloc=B``; sends TEXT (``vsock tx len=N``), reads N bytes back
           (``vsock rx len=N data=<text>``), sends SHUTDOWN and waits for the host's RST
           (``vsock closed by=host``; ``by=guest`` when it sent RST after a timeout),
           ``vsock skipped=K``, ``vsock ok``.
vbad       ``sector=S`` (1): malformed chains on the first block device, one line each:
           ``vbad CASE used len=L status=S`` (returned; refused when L is 0 or S an error),
           ``vbad CASE needs-reset`` (the device set NEEDS_RESET; the guest resets it),
           ``vbad CASE accepted ...`` or ``vbad CASE no-answer ...`` (neither: a failure).
           Cases: ``outside-ram`` (a buffer at 256 GiB), ``loop``, ``readonly-status`` (every
           descriptor device-readable), ``longer-than-queue`` (every descriptor in one
           endless chain), ``indirect-length`` (an indirect table of 52 bytes). Then the
           first device must serve a read (``vbad first-device ok``) and the second block
           device a write and read of sector S (``vbad second-device ok``): ``vbad ok``.
hostile    ``count=N seed=S`` (100000, 1): a guest attacking its VMM: N random port writes
           and reads (1, 2 or 4 bytes), writes and reads of random registers in the virtio-mmio
           windows, and of random addresses in the MMIO hole below 4 GiB, from a xorshift64
           seeded with S. It spares COM1, the reset and power-off registers, debug-exit and
           the in-kernel PIC/PIT/IOAPIC/LAPIC. ``hostile start count=N``, ``hostile ops=K``
           every 65536, ``hostile done ops=N``.
========== ===================================================================================

The virtio workloads (virtio 1.2, virtio-mmio version 2 only, split virtqueues) run in ring 3
and need 16 MiB of guest RAM. They find devices in kasou's windows (``0xd0000000 + n *
0x1000``) and QEMU microvm's (``0xfeb00000 + n * 0x200``; QEMU's virtio-mmio is modern only
with ``-global virtio-mmio.force-legacy=false``), in the order they were configured.
``irq=1`` makes them wait for the device's interrupt (routed through the IOAPIC, halting in
ring 0) instead of polling the used ring.

Usage::

    from kasou.guestkit import build_guest, cmdline
    elf = build_guest()                       # compiled once, then from the cache
    args = cmdline("pio", count=1_000_000)    # 'kasou.test=pio count=1000000'
"""

from __future__ import annotations

import struct

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
    "VNET_ETHERTYPE",
    "WORKLOADS",
    "GuestImage",
    "GuestKitError",
    "build_guest",
    "cache_key",
    "cmdline",
    "default_cache_dir",
    "inspect_guest",
    "refused_instructions",
    "vblk_pattern",
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
    "memcheck",
    "triple",
    "reset",
    "wait",
    "vlist",
    "vblk",
    "vblk-bench",
    "vblk-watch",
    "vrng",
    "vnet",
    "vsock",
    "vbad",
    "hostile",
)
BOOT_PREFIX = "kasou-guest: boot="
VNET_ETHERTYPE = 0x88B5  # IEEE 802 local experimental ethertype 1: the vnet workload's frames
SECTOR = 512
DONE_LINE = "kasou-guest: done"
FAIL_PREFIX = "kasou-guest: fail "


def cmdline(test: str, **args: int | str) -> str:
    """The command line that runs workload ``test`` with ``key=value`` arguments.

    Numbers go as decimal (``addr`` and ``port`` as hex, which the guest reads too); text
    (``mode``, ``payload``) as itself, one word of printable ASCII.
    """
    if test not in WORKLOADS:
        raise ConfigError("kasou.test", f"unknown workload {test!r}: one of {', '.join(WORKLOADS)}")
    words = [f"kasou.test={test}"]
    for key, value in args.items():
        if isinstance(value, str):
            if not value or not all("!" <= ch <= "~" for ch in value) or len(value) > 127:
                raise ConfigError(
                    key, f"{value!r} is not one word of printable ASCII (1 to 127 characters)"
                )
            words.append(f"{key}={value}")
            continue
        if value < 0:
            raise ConfigError(key, f"{value} is negative: the guest reads unsigned numbers")
        words.append(f"{key}={value:#x}" if key in ("addr", "port") else f"{key}={value}")
    return " ".join(words)


def vblk_pattern(sector: int, count: int) -> bytes:
    """What the ``vblk`` workload writes to ``count`` sectors from ``sector``: little-endian
    32-bit word ``j`` of sector ``s`` is ``s * 0x9e3779b1 + j`` modulo 2**32."""
    words = (
        (s * 0x9E3779B1 + j) & 0xFFFFFFFF
        for s in range(sector, sector + count)
        for j in range(SECTOR // 4)
    )
    return struct.pack(f"<{count * SECTOR // 4}I", *words)
