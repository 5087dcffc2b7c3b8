"""What to boot from a disk image, read without mounting it and without root.

A disk image shaped like a distribution's cloud image (a GPT or MBR partition table, an ext4
root with /boot inside, or a separate /boot partition) holds everything a firmware-less boot
needs: this package finds the root file system, its newest kernel and matching initrd, and
the root's UUID for the kernel command line::

    from kasou.bootdisk import find_boot_files

    boot = find_boot_files(Path("debian-12.qcow2"))
    boot.kernel_path      # "/boot/vmlinuz-6.1.0-28-cloud-amd64"
    boot.cmdline          # "root=UUID=... ro"

It reads through ``kasou.disk`` (raw and qcow2 images, with backing chains) and owns the
partition tables (GPT with its CRCs and backup, MBR with logical partitions) and a read-only
ext2/3/4 reader. It knows nothing of VMs: it hands back bytes and a command line. Everything
read from the image is untrusted: every offset, length, depth and loop is bounded, and a
malformed image raises ``BootDiskError`` (one line naming the image, the problem and what to
do), never another exception, and never hangs.

Not handled: file systems other than ext2/3/4 (named in the error: xfs, btrfs, vfat, swap,
LUKS, ...), LVM, encrypted or compressed files, sectors other than 512 bytes, boot loader
configuration (grub.cfg's command line is not read: the kernel gets ``root=... ro``).
"""

from kasou.bootdisk._errors import BootDiskError
from kasou.bootdisk._find import MAX_INITRD, MAX_KERNEL, BootFiles, find_boot_files

__all__ = ["MAX_INITRD", "MAX_KERNEL", "BootDiskError", "BootFiles", "find_boot_files"]
