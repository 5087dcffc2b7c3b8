"""cloud-init NoCloud seeds: the small disk that tells a cloud image who it is.

A cloud image (Debian's, Ubuntu's) runs cloud-init at boot; with no cloud around, its NoCloud
datasource reads a file system labelled ``cidata`` holding ``user-data`` (what to do: users,
keys, packages, commands), ``meta-data`` (the instance-id and host name) and optionally
``network-config``. This package builds that file system as an ISO 9660 image, without root::

    from kasou.cloudinit import build_seed, parse_cloud_init

    files = parse_cloud_init("user-data=./user-data.yaml,network-config=./net.yaml")
    build_seed(Path("seed.iso"), files, hostname="web1")   # then attach it read-only

It checks the files as cloud-init will read them, so that data cloud-init would silently
ignore (plain YAML without ``#cloud-config``, a mapping it cannot parse) is refused with a
one-line ``ConfigError`` naming the file and the fix, before anything is written. Without
meta-data it writes an ``instance-id`` derived from the inputs and the host name.

It does not attach the seed (``kasou run --cloud-init`` does, as the last virtio-blk disk),
fetch ``#include`` URLs, or know cloud-config's keys.
"""

from kasou.cloudinit._seed import SEED_LABEL, SeedFiles, build_seed, parse_cloud_init
from kasou.cloudinit._userdata import HEADERS, MAX_FILE_SIZE

__all__ = [
    "HEADERS",
    "MAX_FILE_SIZE",
    "SEED_LABEL",
    "SeedFiles",
    "build_seed",
    "parse_cloud_init",
]
