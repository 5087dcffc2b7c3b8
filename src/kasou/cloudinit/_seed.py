"""A NoCloud seed: ``--cloud-init`` parsed, its files checked, the ISO 9660 image written.

The image is what cloud-init's NoCloud datasource looks for (cloud-init docs, "NoCloud"): a
file system labelled ``cidata`` holding ``user-data``, ``meta-data`` and, optionally,
``network-config``. It is shaped like the one ``cloud-localds`` makes (genisoimage
``-volid cidata -joliet -rock``): ISO 9660 level 1 names (``USER_DAT.;1``), and the real
names, case and hyphens kept, in both the Joliet and the Rock Ridge trees, so a guest
finds them whichever extension its kernel reads. pycdlib writes it in memory: no root, no
loop device, no mkisofs.

Everything is read and checked first (``_userdata``); the image is then written to a
temporary name in the destination's folder, synced and renamed, so ``out`` is either absent
or complete. Its mode is 0600: user-data often holds passwords and keys.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import pycdlib
import yaml

from kasou.cloudinit._userdata import (
    MAX_FILE_SIZE,
    check_network_config,
    check_user_data,
    describe,
    load_mapping,
    seed_error,
)
from kasou.errors import ConfigError, HostError

__all__ = ["SEED_LABEL", "SeedFiles", "build_seed", "parse_cloud_init"]

SEED_LABEL = "cidata"
"""The volume label NoCloud looks for (cloud-init accepts ``cidata`` or ``CIDATA``; the
lower-case one is what cloud-localds writes)."""

_ISO9660_NAMES = {  # level 1 names (ISO 9660 §7.5: 8.3, d-characters), as genisoimage maps them
    "user-data": "USER_DAT.;1",
    "meta-data": "META_DAT.;1",
    "network-config": "NETWORK_.;1",
}
_FILE_MODE = 0o100644  # Rock Ridge PX: a regular file, rw-r--r-- (as cloud-localds's)
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123 §2.1


class SeedFiles(NamedTuple):
    """The host files a seed is built from: ``--cloud-init PATH`` or
    ``--cloud-init user-data=P[,meta-data=P][,network-config=P]``."""

    user_data: Path
    meta_data: Path | None = None  # None: kasou writes instance-id and local-hostname
    network_config: Path | None = None


def parse_cloud_init(text: str) -> SeedFiles:
    """Parse ``PATH`` (the user-data alone) or ``user-data=P[,meta-data=P][,network-config=P]``.

    Text without ``=`` is one path, commas and all; with ``=`` it is key=path pairs.
    """
    if not text:
        raise ConfigError("cloud-init", "give a user-data file, like --cloud-init user-data.yaml")
    if "=" not in text:
        return SeedFiles(Path(text))
    paths: dict[str, Path] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in _ISO9660_NAMES:
            raise seed_error(
                repr(item),
                "is not a seed file: use user-data=PATH, meta-data=PATH, network-config=PATH "
                "(a path with '=' in it: write user-data=PATH)",
            )
        if not value:
            raise seed_error(f"{key}=", "needs a path, like user-data=./user-data.yaml")
        if key in paths:
            raise seed_error(key, "is given twice: give each seed file once")
        paths[key] = Path(value)
    if "user-data" not in paths:
        raise ConfigError(
            "cloud-init", f"{describe(Path(text))}: add user-data=PATH (the others are optional)"
        )
    return SeedFiles(paths["user-data"], paths.get("meta-data"), paths.get("network-config"))


def build_seed(out: Path, files: SeedFiles, *, hostname: str) -> None:
    """Write the NoCloud seed image for ``files`` to ``out``.

    ``hostname`` (the VM's name) becomes ``local-hostname`` when kasou writes the meta-data.
    Every file is read and checked before anything is written: bad input raises
    ``ConfigError`` and leaves ``out`` as it was; a host that cannot write ``out`` raises
    ``HostError``.
    """
    if files.meta_data is None:
        _check_hostname(hostname)  # it goes into the meta-data kasou writes
    user_data = _read("user-data", files.user_data)
    check_user_data(files.user_data, user_data)
    network = None
    if files.network_config is not None:
        network = _read("network-config", files.network_config)
        where = f"network-config {describe(files.network_config)}"
        check_network_config(where, _utf8(where, network))
    meta = None if files.meta_data is None else _read("meta-data", files.meta_data)
    instance_id = _instance_id(hostname, user_data, meta, network)
    contents = {"user-data": user_data, "meta-data": _meta_data(files, meta, instance_id, hostname)}
    if network is not None:
        contents["network-config"] = network
    _write_iso(out, contents)


def _check_hostname(hostname: str) -> None:
    labels = hostname.split(".")
    if len(hostname) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            "cloud-init",
            f"the VM name {hostname!r} is not a host name: use letters, digits "
            "and inner hyphens (RFC 1123), or give meta-data with its own local-hostname",
        )


def _read(name: str, path: Path) -> bytes:
    """A seed file's bytes, at most ``MAX_FILE_SIZE`` of them."""
    where = f"{name} {describe(path)}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise seed_error(where, "does not exist: give the path of a file") from None
    except IsADirectoryError:
        raise seed_error(where, "is a folder: give the path of a file") from None
    except PermissionError:
        raise seed_error(where, "is not readable: check its permissions") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        reason = getattr(error, "strerror", None) or str(error)
        raise seed_error(where, f"cannot be read ({reason}): give a readable file") from None
    if len(data) > MAX_FILE_SIZE:
        raise seed_error(where, f"is larger than {MAX_FILE_SIZE >> 20} MiB: make it smaller")
    return data


def _utf8(where: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise seed_error(where, f"is not UTF-8 (byte {error.start}): save it as UTF-8") from None


def _instance_id(hostname: str, user: bytes, meta: bytes | None, network: bytes | None) -> str:
    """``kasou-`` and a hash of every input: the same seed inputs give the same instance-id,
    so a guest on a writable disk runs cloud-init's per-instance modules once, not at every
    boot, and runs them again when the inputs change."""
    digest = hashlib.sha256(b"kasou NoCloud seed\0")
    for part in (hostname.encode(), user, meta, network):
        # A length before each part (-1: absent), so no two input sets hash the same bytes.
        digest.update(struct.pack("<q", -1 if part is None else len(part)))
        digest.update(part or b"")
    return f"kasou-{digest.hexdigest()[:16]}"


def _meta_data(files: SeedFiles, meta: bytes | None, instance_id: str, hostname: str) -> bytes:
    """The meta-data to write: the user's bytes as they are when they name an instance-id;
    else their mapping again with ``instance-id`` first (YAML re-written: comments go);
    without a file, ``instance-id`` and ``local-hostname``."""
    if meta is None or files.meta_data is None:
        return _dump({"instance-id": instance_id, "local-hostname": hostname})
    where = f"meta-data {describe(files.meta_data)}"
    mapping = load_mapping(where, _utf8(where, meta), empty_ok=True)
    if mapping.get("instance-id") not in (None, ""):
        return meta
    others = {key: value for key, value in mapping.items() if key != "instance-id"}
    try:
        return _dump({"instance-id": instance_id, **others})
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as error:
        raise seed_error(
            where, f"cannot be written again with an instance-id ({error}): add one yourself"
        ) from None


def _dump(mapping: dict[object, object]) -> bytes:
    # safe_dump quotes what YAML would read as another type (a host named "true" or "123").
    text = yaml.safe_dump(mapping, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return text.encode("utf-8")


def _write_iso(out: Path, contents: dict[str, bytes]) -> None:
    """The image, written to a temporary file beside ``out`` and renamed over it."""
    iso = pycdlib.PyCdlib()
    # Joliet level 3 (UCS-2, the escape sequence genisoimage writes); Rock Ridge 1.09.
    iso.new(interchange_level=1, vol_ident=SEED_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name, data in contents.items():
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                f"/{_ISO9660_NAMES[name]}",
                rr_name=name,
                joliet_path=f"/{name}",
                file_mode=_FILE_MODE,
            )
        _replace(out, iso)
    finally:
        iso.close()


def _replace(out: Path, iso: pycdlib.PyCdlib) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=folder)
    except OSError as error:
        raise HostError(
            f"cannot write the cloud-init seed in {folder}: {error.strerror}: "
            "check that the folder exists and is writable"
        ) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            iso.write_fp(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, out)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass  # already renamed, or never there
        if isinstance(error, OSError):
            raise HostError(
                f"cannot write the cloud-init seed {out}: {error.strerror}: free some space "
                "or write it elsewhere"
            ) from error
        raise
