"""A small ACPI Machine Language encoder: the terms a static DSDT needs, as bytes.

This module owns the byte encoding of the AML objects kasou's DSDT uses (ACPI 6.5 chapter
20): name strings, integers, strings, buffers, packages, ``Name``, ``Scope``, ``Device`` and
``Method`` with their package lengths, the one executable term its methods need
(``Notify``), the ``EISAID`` compression of PNP ids, and the resource descriptors (ACPI 6.5
§6.4) that go into a ``ResourceTemplate``. Every function returns the encoded term; callers
nest them by passing the bytes of inner terms.

It does not encode operation regions, fields, locals, arguments or any other executable
opcode, does not check that names resolve, and does not build table headers (``acpi.py``
does).
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_PKG_LENGTH",
    "buffer",
    "device",
    "eisa_id",
    "end_tag",
    "extended_interrupt",
    "integer",
    "io_port",
    "irq_no_flags",
    "memory32_fixed",
    "method",
    "name",
    "name_string",
    "notify",
    "package",
    "pkg_length",
    "resource_template",
    "scope",
    "string",
    "with_pkg_length",
]

# Opcodes and prefixes (ACPI 6.5 §20.2.2, §20.2.3, §20.2.5).
_ZERO_OP = 0x00
_ONE_OP = 0x01
_NAME_OP = 0x08
_BYTE_PREFIX = 0x0A
_WORD_PREFIX = 0x0B
_DWORD_PREFIX = 0x0C
_STRING_PREFIX = 0x0D
_QWORD_PREFIX = 0x0E
_SCOPE_OP = 0x10
_BUFFER_OP = 0x11
_PACKAGE_OP = 0x12
_METHOD_OP = 0x14
_DUAL_NAME_PREFIX = 0x2E
_MULTI_NAME_PREFIX = 0x2F
_EXT_OP_PREFIX = 0x5B
_DEVICE_OP = 0x82  # after ExtOpPrefix
_NOTIFY_OP = 0x86
_ROOT_CHAR = 0x5C  # '\'
_PARENT_PREFIX_CHAR = 0x5E  # '^'
_NULL_NAME = 0x00

# PkgLength (§20.2.4) counts itself: one byte holds 0..63; with 1..3 following bytes the lead
# byte keeps 4 bits and each following byte 8, so 12, 20 and 28 bits.
MAX_PKG_LENGTH = (1 << 28) - 1
_PKG_LENGTH_LIMITS = (1 << 6, 1 << 12, 1 << 20, 1 << 28)

# NameSeg := LeadNameChar NameChar NameChar NameChar; LeadNameChar is 'A'-'Z' or '_', NameChar
# adds '0'-'9' (§20.2.2). Shorter segments are padded with '_', as ASL compilers do.
_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


def pkg_length(value: int) -> bytes:
    """The PkgLength encoding of ``value`` (§20.2.4): the length of a package counted from the
    first byte of its PkgLength. Uses the fewest bytes that hold it."""
    if not 0 <= value <= MAX_PKG_LENGTH:
        raise ValueError(f"package length {value} out of range 0..{MAX_PKG_LENGTH}")
    if value < _PKG_LENGTH_LIMITS[0]:
        return bytes([value])
    following = next(n for n in (1, 2, 3) if value < _PKG_LENGTH_LIMITS[n])
    # Lead byte: bits 7-6 count the following bytes, bits 3-0 hold the low nibble, bits 5-4
    # stay zero; the following bytes hold the rest, least significant first.
    rest = value >> 4
    return bytes([following << 6 | value & 0x0F]) + rest.to_bytes(following, "little")


def with_pkg_length(body: bytes) -> bytes:
    """``body`` preceded by the PkgLength that covers it and itself."""
    for size in (1, 2, 3, 4):
        total = len(body) + size
        if total < _PKG_LENGTH_LIMITS[size - 1]:
            return pkg_length(total) + body
    raise ValueError(f"a package of {len(body)} bytes does not fit a PkgLength")


def name_string(path: str) -> bytes:
    """Encode an ASL name path: ``\\_SB.COM1``, ``_S5``, ``^PCI0.ISA``, ``\\``.

    A leading ``\\`` anchors the path at the root, each leading ``^`` climbs one scope;
    segments of fewer than four characters are padded with ``_`` (``_S5`` is ``_S5_``).
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([_ROOT_CHAR]), rest[1:]
    else:
        climbs = len(rest) - len(rest.lstrip("^"))
        prefix, rest = bytes([_PARENT_PREFIX_CHAR]) * climbs, rest[climbs:]
    segments = rest.split(".") if rest else []
    encoded = [_name_seg(segment, path) for segment in segments]
    if not encoded:
        if not prefix:
            raise ValueError("an empty name path names nothing")
        return prefix + bytes([_NULL_NAME])
    if len(encoded) == 1:
        return prefix + encoded[0]
    if len(encoded) == 2:
        return prefix + bytes([_DUAL_NAME_PREFIX]) + b"".join(encoded)
    if len(encoded) > 0xFF:
        raise ValueError(f"name path {path!r} has more than 255 segments")
    return prefix + bytes([_MULTI_NAME_PREFIX, len(encoded)]) + b"".join(encoded)


def _name_seg(segment: str, path: str) -> bytes:
    if not _NAME_SEG.fullmatch(segment):
        raise ValueError(
            f"{segment!r} in {path!r} is not an ACPI name segment "
            "(1-4 characters of A-Z, 0-9 and _, not starting with a digit)"
        )
    return segment.ljust(4, "_").encode("ascii")


def integer(value: int) -> bytes:
    """The shortest integer encoding of ``value`` (§20.2.3): ZeroOp, OneOp or a prefixed
    little-endian byte, word, dword or qword."""
    if value < 0 or value >> 64:
        raise ValueError(f"integer {value} does not fit 64 unsigned bits")
    if value == 0:
        return bytes([_ZERO_OP])
    if value == 1:
        return bytes([_ONE_OP])
    for prefix, size in (
        (_BYTE_PREFIX, 1),
        (_WORD_PREFIX, 2),
        (_DWORD_PREFIX, 4),
        (_QWORD_PREFIX, 8),
    ):
        if value >> (8 * size) == 0:
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable: value fits 64 bits")


def string(value: str) -> bytes:
    """A String object (§20.2.3): StringPrefix, ASCII characters 0x01-0x7F, NUL."""
    data = value.encode("ascii")
    if b"\x00" in data:
        raise ValueError("an AML string cannot contain NUL")
    return bytes([_STRING_PREFIX]) + data + b"\x00"


def eisa_id(pnp_id: str) -> int:
    """The 32-bit compressed EISA id of ``pnp_id`` (``"PNP0501"``), as ASL's ``EISAID()``
    makes it (ACPI 6.5 §19.6, the ASL operator reference): three letters of 5 bits each
    (A = 1), then four hex digits, the whole stored big-endian in a DWORD.
    ``integer(eisa_id("PNP0501"))`` is a ``_HID`` value."""
    if not _EISA_ID.fullmatch(pnp_id):
        raise ValueError(f"{pnp_id!r} is not an EISA id (three letters A-Z, four hex digits)")
    letters = [ord(char) - 0x40 for char in pnp_id[:3]]
    packed = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(pnp_id[3:], 16)
    return int.from_bytes(packed.to_bytes(4, "big"), "little")


def buffer(data: bytes) -> bytes:
    """DefBuffer (§20.2.5.4): BufferOp PkgLength BufferSize ByteList, sized to ``data``."""
    return bytes([_BUFFER_OP]) + with_pkg_length(integer(len(data)) + data)


def package(*elements: bytes) -> bytes:
    """DefPackage (§20.2.5.4) of already encoded data objects, at most 255 of them."""
    if len(elements) > 0xFF:
        raise ValueError(f"a Package holds at most 255 elements, not {len(elements)}")
    return bytes([_PACKAGE_OP]) + with_pkg_length(bytes([len(elements)]) + b"".join(elements))


def name(path: str, value: bytes) -> bytes:
    """DefName (§20.2.5.1): bind ``path`` to the encoded data object ``value``."""
    return bytes([_NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope (§20.2.5.1): ``terms`` placed in the existing namespace scope ``path``."""
    return bytes([_SCOPE_OP]) + with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice (§20.2.5.2): a Device object ``path`` holding ``terms``."""
    body = with_pkg_length(name_string(path) + b"".join(terms))
    return bytes([_EXT_OP_PREFIX, _DEVICE_OP]) + body


# MethodFlags (§20.2.5.2): bits 2-0 ArgCount (0-7), bit 3 SerializeFlag, bits 7-4 SyncLevel.
_MAX_METHOD_ARGS = 7
_SERIALIZED = 1 << 3
_MAX_SYNC_LEVEL = 15


def method(
    path: str, *terms: bytes, args: int = 0, serialized: bool = False, sync_level: int = 0
) -> bytes:
    """DefMethod (§20.2.5.2): a control method ``path`` taking ``args`` arguments whose body
    is ``terms``: ASL ``Method (path, args, NotSerialized) {...}`` (``Serialized`` and its
    SyncLevel with ``serialized``)."""
    if not 0 <= args <= _MAX_METHOD_ARGS:
        raise ValueError(f"a method takes 0 to {_MAX_METHOD_ARGS} arguments, not {args}")
    if not 0 <= sync_level <= _MAX_SYNC_LEVEL:
        raise ValueError(f"sync level {sync_level} out of range 0..{_MAX_SYNC_LEVEL}")
    if sync_level and not serialized:
        raise ValueError("only a serialized method has a sync level")
    flags = args | (_SERIALIZED if serialized else 0) | sync_level << 4
    return bytes([_METHOD_OP]) + with_pkg_length(
        name_string(path) + bytes([flags]) + b"".join(terms)
    )


def notify(path: str, value: int) -> bytes:
    """DefNotify (§20.2.5.3): NotifyOp, the object named ``path`` (a SuperName) and the
    notification value as an integer TermArg: ASL ``Notify (path, value)``. Values 0x80 and
    up are device-specific (§5.6.6)."""
    if not 0 <= value <= 0xFF:
        raise ValueError(f"notification value {value:#x} does not fit a byte")
    return bytes([_NOTIFY_OP]) + name_string(path) + integer(value)


# Resource data (ACPI 6.5 §6.4). Small items: a tag byte (bit 7 clear, item name in bits 6-3,
# length in bits 2-0); large items: a tag byte (bit 7 set, item name in bits 6-0) and a 16-bit
# length, then the data.
_IRQ_TAG = 0x22  # IRQ descriptor without the information byte (§6.4.2.1)
_IO_TAG = 0x47  # I/O port descriptor, 7 data bytes (§6.4.2.5)
_END_TAG = 0x79  # End Tag, 1 data byte (§6.4.2.9)
_MEMORY32_FIXED_TAG = 0x86  # 32-bit fixed memory range (§6.4.3.4)
_EXTENDED_INTERRUPT_TAG = 0x89  # extended interrupt descriptor (§6.4.3.6)


def io_port(base: int, length: int, *, alignment: int = 1) -> bytes:
    """An I/O port descriptor (§6.4.2.5) for ``length`` ports fixed at ``base`` (minimum and
    maximum base equal), decoding 16 address bits: ASL ``IO (Decode16, base, base, ...)``."""
    if not 0 <= base <= 0xFFFF or not 1 <= length <= 0xFF or base + length > 0x10000:
        raise ValueError(f"I/O range {base:#x}+{length} does not fit an I/O port descriptor")
    if not 0 <= alignment <= 0xFF:
        raise ValueError(f"I/O alignment {alignment} does not fit a byte")
    decode16 = 0x01  # information byte bit 0: the device decodes 16 address bits
    return bytes([_IO_TAG, decode16]) + base.to_bytes(2, "little") * 2 + bytes([alignment, length])


def irq_no_flags(*irqs: int) -> bytes:
    """An IRQ descriptor without flags (§6.4.2.1): ISA ``irqs`` (0-15), edge-triggered and
    active high, not shared: ASL ``IRQNoFlags () {...}``."""
    if not irqs or not all(0 <= irq <= 15 for irq in irqs):
        raise ValueError(f"IRQ descriptor needs ISA IRQs 0-15, not {list(irqs)}")
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    return bytes([_IRQ_TAG]) + mask.to_bytes(2, "little")


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """A 32-bit fixed memory range descriptor (§6.4.3.4): ASL ``Memory32Fixed``."""
    if not 0 <= base <= 0xFFFF_FFFF or not 0 <= length <= 0xFFFF_FFFF:
        raise ValueError(f"memory range {base:#x}+{length:#x} does not fit 32 bits")
    if base + length > 1 << 32:
        raise ValueError(f"memory range {base:#x}+{length:#x} runs past 4 GiB")
    information = 0x01 if writable else 0x00  # bit 0: read/write
    return (
        bytes([_MEMORY32_FIXED_TAG])
        + (9).to_bytes(2, "little")
        + bytes([information])
        + base.to_bytes(4, "little")
        + length.to_bytes(4, "little")
    )


def extended_interrupt(
    gsi: int,
    *,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    consumer: bool = True,
) -> bytes:
    """An extended interrupt descriptor (§6.4.3.6) for one global system interrupt, without a
    resource source: ASL ``Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}``.
    """
    if not 0 <= gsi <= 0xFFFF_FFFF:
        raise ValueError(f"interrupt {gsi} does not fit 32 bits")
    # Interrupt vector flags: bit 0 consumer, bit 1 edge, bit 2 active low, bit 3 shared.
    flags = consumer | edge << 1 | active_low << 2 | shared << 3
    count = 1
    data = bytes([flags, count]) + gsi.to_bytes(4, "little")
    return bytes([_EXTENDED_INTERRUPT_TAG]) + len(data).to_bytes(2, "little") + data


def end_tag() -> bytes:
    """The End Tag (§6.4.2.9) with checksum 0, which says: treat the checksum as correct."""
    return bytes([_END_TAG, 0])


def resource_template(*descriptors: bytes) -> bytes:
    """A Buffer holding ``descriptors`` and the End Tag: ASL ``ResourceTemplate () {...}``."""
    return buffer(b"".join(descriptors) + end_tag())
