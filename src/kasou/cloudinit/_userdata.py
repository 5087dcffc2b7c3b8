"""What cloud-init will make of a seed's files, decided before the seed is written.

cloud-init does not refuse data it cannot use: user-data of an unknown kind is logged as
"Unhandled non-multipart userdata" and the guest boots unconfigured, which a user sees only
by reading the guest's logs. So kasou applies cloud-init's own rules here and refuses up
front, in one line naming the file and the fix:

- user-data (cloud-init's ``user_data.convert_string`` and ``handlers.type_from_starts_with``):
  gzip data is decompressed once; data with ``MIME-Version:`` in its first 4096 bytes
  (any case) is a MIME multi-part archive, which cloud-init decodes as UTF-8; anything else
  must be UTF-8 and, lower-cased and stripped of leading white space, start with one of the
  headers of ``HEADERS`` (the longest one that matches wins). ``#cloud-config`` data (alone
  or as a ``text/cloud-config`` part of an archive) must be a YAML mapping, as the
  cloud-config handler merges it into a dict.
- meta-data: a YAML mapping (cloud-init's NoCloud datasource reads it with ``load_yaml``).
- network-config: a YAML mapping of network config version 1 or 2, at the top or under
  ``network:`` (cloud-init docs, "Network configuration"), or ``config: disabled``.

Not checked: what the keys mean (cloud-init's schema is larger than kasou should carry),
what ``#include`` URLs point at, and templates (``## template: jinja`` is rendered in the
guest, from data only the guest has).
"""

from __future__ import annotations

import email
import zlib
from pathlib import Path
from typing import Any

from kasou.errors import ConfigError

__all__ = [
    "HEADERS",
    "MAX_FILE_SIZE",
    "check_network_config",
    "check_user_data",
    "describe",
    "load_mapping",
    "seed_error",
]

MAX_FILE_SIZE = 1 << 20
"""The most bytes kasou puts in a seed per file (and a gzip user-data's size once
decompressed). cloud-init itself sets no limit on NoCloud data; the ~16 KiB its docs mention
is EC2's limit on user-data. A seed is read whole into the guest's memory by cloud-init, so
kasou refuses what is surely a mistake (a disk image given as user-data) rather than pass it."""

HEADERS = {
    "#cloud-config": "cloud-config",
    "#cloud-config-archive": "cloud-config archive",
    "#cloud-boothook": "boothook",
    "#include": "include list",
    "#include-once": "include list",
    "#part-handler": "part handler",
    "## template: jinja": "jinja template",
    "#!": "script",
}
"""The first words of user-data that cloud-init acts on, and what each makes it (cloud-init
docs, "User data formats"; ``handlers.INCLUSION_TYPES_MAP`` plus the jinja handler)."""

_LONGEST_FIRST = sorted(HEADERS, key=len, reverse=True)
_GZIP_MAGIC = b"\x1f\x8b"
_MIME_PROBE = 4096  # cloud-init looks for "mime-version:" in this many leading bytes
_FIRST_WORDS = "#cloud-config (YAML), #! (a script), #include, #cloud-boothook or a MIME archive"


def describe(path: object) -> str:
    """A path as one printable line, for error messages."""
    return _one_line(str(path))


def check_user_data(path: Path, data: bytes) -> str:
    """What cloud-init will take ``data`` for (a value of ``HEADERS``, or "MIME archive");
    ``ConfigError`` if it would ignore it or cannot read it."""
    where = f"user-data {describe(path)}"
    if not data.strip():
        raise seed_error(where, f"is empty: start it with {_FIRST_WORDS}")
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(where, data)
        where = f"{where} (gzip)"
    if b"mime-version:" in data[:_MIME_PROBE].lower():
        _check_mime(where, data)
        return "MIME archive"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise seed_error(
            where,
            f"is not UTF-8 (byte {error.start}): cloud-init would ignore it; save it as UTF-8",
        ) from None
    header = _header(text)
    if header is None:
        raise seed_error(where, _why_unknown(where, text))
    if header == "#cloud-config":
        load_mapping(where, text, empty_ok=True)
    elif header == "#cloud-config-archive":
        _check_archive(where, text)
    return HEADERS[header]


def load_mapping(where: str, text: str, *, empty_ok: bool) -> dict[Any, Any]:
    """``text`` as a YAML mapping ({} for an empty document where ``empty_ok``); a
    ``ConfigError`` naming ``where`` and the line otherwise."""
    value = _load_yaml(where, text)
    if value is None and empty_ok:
        return {}
    if not isinstance(value, dict):
        kind = "empty" if value is None else f"a YAML {_yaml_kind(value)}"
        raise seed_error(where, f"is {kind}, not a mapping: write it as 'key: value' lines")
    return value


def check_network_config(where: str, text: str) -> None:
    """A network config cloud-init reads: version 1 or 2, or ``config: disabled``."""
    config = load_mapping(where, text, empty_ok=False)
    inner = config.get("network", config)
    if not isinstance(inner, dict):
        raise seed_error(where, "has a 'network:' that is not a mapping")
    if inner.get("config") == "disabled" or inner.get("version") in (1, 2):
        return
    raise seed_error(
        where,
        "has no 'version: 1' or 'version: 2': cloud-init would ignore it "
        "(see cloud-init's 'Network configuration' docs)",
    )


def _header(text: str) -> str | None:
    start = text.lstrip().lower()
    for header in _LONGEST_FIRST:
        if start.startswith(header):
            return header
    return None


def _why_unknown(where: str, text: str) -> str:
    """The fix for user-data with no header cloud-init knows."""
    if text.startswith("\ufeff"):
        return "starts with a byte-order mark, which cloud-init does not skip: save it without"
    if text.lstrip().lower().startswith("content-type:"):
        return "looks like MIME but has no 'MIME-Version: 1.0' header: add one"
    try:
        value = _load_yaml(where, text)
    except ConfigError:
        value = None
    if isinstance(value, dict):
        return (
            "is YAML without the '#cloud-config' header, which cloud-init would silently "
            "ignore: add '#cloud-config' as its first line"
        )
    return f"cloud-init would ignore it: start it with {_FIRST_WORDS}"


def _gunzip(where: str, data: bytes) -> bytes:
    """Decompress gzip data, at most ``MAX_FILE_SIZE`` bytes of it (a small file can hold a
    huge stream: decompression stops there)."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # 16+: a gzip header (zlib docs)
    try:
        plain = inflate.decompress(data, MAX_FILE_SIZE + 1)
    except zlib.error as error:
        raise seed_error(where, f"is not valid gzip data ({error}): compress it again") from None
    if len(plain) > MAX_FILE_SIZE:
        raise seed_error(
            where, f"decompresses to more than {MAX_FILE_SIZE >> 20} MiB: make it smaller"
        )
    if not inflate.eof:
        raise seed_error(where, "is truncated gzip data: compress it again")
    return plain


def _check_mime(where: str, data: bytes) -> None:
    """A MIME archive: UTF-8 (cloud-init decodes it so), and each ``text/cloud-config``
    part a YAML mapping."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise seed_error(
            where, f"is a MIME archive that is not UTF-8 (byte {error.start}): use base64 parts"
        ) from None
    message = email.message_from_string(text)
    for number, part in enumerate(message.walk()):
        if part.get_content_type() != "text/cloud-config":
            continue
        payload = part.get_payload(decode=True)
        body = payload if isinstance(payload, bytes) else b""
        part_where = f"{where} part {number}"
        try:
            part_text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise seed_error(
                part_where, "is cloud-config that is not UTF-8: save it as UTF-8"
            ) from None
        load_mapping(part_where, part_text, empty_ok=True)


def _check_archive(where: str, text: str) -> None:
    """A cloud-config archive is a YAML list (cloud-init's ``_explode_archive``)."""
    value = _load_yaml(where, text)
    if value is not None and not isinstance(value, list):  # empty: nothing to do, as cloud-init
        raise seed_error(
            where, f"is a #cloud-config-archive but a YAML {_yaml_kind(value)}: make it a list"
        )


def _load_yaml(where: str, text: str) -> Any:
    """``yaml.safe_load``, every failure a ``ConfigError`` with the line where there is one.

    libyaml's loader when present: ten times faster, and it limits nesting itself; the pure
    Python one recurses, so a deep document ends in ``RecursionError``, caught here.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # a safe loader: no tags that build objects
    except yaml.MarkedYAMLError as error:
        # The problem's line, or from where the construct it is in began (an unclosed "[" is
        # found only at the end of the file) to there.
        marks = (error.context_mark, error.problem_mark)
        lines = sorted({mark.line + 1 for mark in marks if mark is not None})
        if len(lines) > 1:
            line = f"lines {lines[0]}-{lines[-1]}: "
        else:
            line = f"line {lines[0]}: " if lines else ""
        what = ", ".join(part for part in (error.context, error.problem) if part)
        raise seed_error(where, f"{line}{what or 'not YAML'}: fix the YAML there") from None
    except yaml.YAMLError as error:  # a ReaderError: a character YAML does not allow
        position = getattr(error, "position", None)
        line = f"line {text.count(chr(10), 0, position) + 1}: " if position is not None else ""
        reason = str(error).splitlines()[0]
        raise seed_error(where, f"{line}{reason}: remove it") from None
    except RecursionError:
        raise seed_error(where, "is nested too deeply to read: flatten it") from None
    except (ValueError, TypeError, OverflowError) as error:
        # Values YAML's resolver matched but Python cannot build: 2001-13-45 as a date, an
        # integer of more than 4300 digits.
        raise seed_error(where, f"has a value that cannot be read ({error}): quote it") from None


def _yaml_kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "scalar" if value is not None else "empty document"


def seed_error(where: str, message: str) -> ConfigError:
    """The one error of a seed's input: ``where`` (the file) and what to do, on one line."""
    return ConfigError("cloud-init", _one_line(f"{where} {message}"))


def _one_line(text: str) -> str:
    """Unprintable characters (line breaks among them) escaped: error messages stay one line
    whatever a file name or a YAML problem holds."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
