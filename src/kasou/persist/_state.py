"""State dataclasses to and from msgpack, decoded against their type.

A state encodes as a msgpack map of its field names (msgspec's encoding of a dataclass):
field names are the format contract, so renaming a field is a format change. Decoding is
typed: every value must have its field's type exactly (msgspec's strict mode: no int for a
bool, no str for bytes), a field without a default must be present, and a field the type does
not declare is refused rather than dropped, because state this kasou does not understand
cannot be restored faithfully. What a value means (a register's range, a queue's size) is for
the component's restore to check; this module checks only shape and types.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
import msgspec.inspect as mi

from kasou.persist._format import SnapshotFormatError

__all__ = ["decode_state", "encode_state"]

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode_state(state: object) -> bytes:
    """Encode a ``State`` dataclass (plain data and nested states) as msgpack."""
    return _encoder.encode(state)


def decode_state(data: bytes, kind: type[T], *, what: str) -> T:
    """Decode ``data`` as a ``kind``; ``what`` names the component in errors ("vcpu1").

    Raises ``SnapshotFormatError`` for data that is not msgpack, does not have ``kind``'s
    shape and types, nests too deeply, or carries fields ``kind`` does not declare.
    """
    try:
        state = msgspec.msgpack.decode(data, type=kind)
        unknown = _unknown_field(msgspec.msgpack.decode(data), _type_info(kind), "$")
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        # ValidationError (a DecodeError) already says which value is wrong: "Expected
        # `int`, got `str` - at `$.regs`". A msgpack str that is not UTF-8 escapes msgspec
        # as a bare UnicodeDecodeError (found by tests/fuzz/fuzz_persist.py).
        raise SnapshotFormatError(
            f"{what}: the saved state does not decode ({error}): the snapshot is damaged or "
            f"was written by another kasou release"
        ) from error
    except RecursionError as error:
        # msgspec recurses into nested arrays and maps, even ones it skips; a hostile file
        # can nest them far deeper than any state does.
        raise SnapshotFormatError(
            f"{what}: the saved state nests too deeply: the snapshot is damaged"
        ) from error
    if unknown is not None:
        raise SnapshotFormatError(
            f"{what}: the saved state has a field this kasou does not know (`{unknown}`): "
            f"restore it with the kasou that wrote it"
        )
    return state


_type_infos: dict[type, mi.Type] = {}


def _type_info(kind: type) -> mi.Type:
    """msgspec's description of ``kind``, built once per type (a dict write is atomic under
    the GIL; two threads at worst both build it)."""
    info = _type_infos.get(kind)
    if info is None:
        info = _type_infos[kind] = mi.type_info(kind)
    return info


def _unknown_field(value: object, info: mi.Type, path: str) -> str | None:
    """The path of the first map key in ``value`` that ``info`` does not declare, if any.

    ``value`` is the untyped decoding of data that already decoded as ``info``'s type, so
    its shape matches; only the keys a typed decode skips need looking at.
    """
    if isinstance(info, mi.DataclassType) and isinstance(value, dict):
        fields = {field.encode_name: field.type for field in info.fields}
        for key, item in value.items():
            where = f"{path}.{key}"
            if key not in fields:
                return where
            found = _unknown_field(item, fields[key], where)
            if found is not None:
                return found
    elif isinstance(info, mi.CollectionType) and isinstance(value, list):
        for index, item in enumerate(value):
            found = _unknown_field(item, info.item_type, f"{path}[{index}]")
            if found is not None:
                return found
    elif isinstance(info, mi.TupleType) and isinstance(value, list):
        for index, (item, item_type) in enumerate(zip(value, info.item_types, strict=False)):
            found = _unknown_field(item, item_type, f"{path}[{index}]")
            if found is not None:
                return found
    elif isinstance(info, mi.DictType) and isinstance(value, dict):
        for key, item in value.items():
            found = _unknown_field(item, info.value_type, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(info, mi.UnionType):
        # msgspec allows at most one map-like and one array-like type in a union, so only
        # the member matching the value's shape can find anything.
        for member in info.types:
            found = _unknown_field(value, member, path)
            if found is not None:
                return found
    return None
