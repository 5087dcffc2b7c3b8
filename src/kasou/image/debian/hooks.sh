#!/bin/sh
# kasou's Debian 12 image (kasou.image._debian): the hooks mmdebstrap runs on the new root.
#
#   sh hooks.sh essential OVERLAY ROOT   after the essential packages, before the rest
#   sh hooks.sh customize OVERLAY ROOT   after every package, before mmdebstrap cleans up
#
# OVERLAY is a copy of rootfs/ next to this script plus the files the builder makes (fstab, the
# agent). The script runs as root on the host; commands that must see the image's own
# configuration run in it with chroot.
set -eu

phase=$1
overlay=$2
root=$3

case $phase in
essential)
	# Before linux-image-cloud-amd64 is installed, so that its first initramfs is already the
	# small one (MODULES=list) rather than one with every storage and network driver.
	mkdir -p "$root/etc/initramfs-tools/conf.d"
	cp "$overlay/etc/initramfs-tools/conf.d/kasou.conf" "$root/etc/initramfs-tools/conf.d/"
	;;
customize)
	# Owned by root whoever owns the checkout; modes as in the overlay; times left to
	# mmdebstrap (SOURCE_DATE_EPOCH).
	cp -R --no-preserve=ownership --preserve=mode "$overlay/." "$root/"

	# /etc/initramfs-tools/modules is a conffile of initramfs-tools, so it is edited here rather
	# than shipped. The stock cloud kernel has these as modules (ext4 is built in; naming it
	# costs nothing and keeps the list right for a kernel that has it as a module).
	cat >>"$root/etc/initramfs-tools/modules" <<-'MODULES'
		# kasou's Debian 12 image: the root disk on virtio-blk behind virtio-mmio (found
		# through ACPI) or virtio-pci.
		virtio_mmio
		virtio_pci
		virtio_blk
		ext4
	MODULES
	chroot "$root" update-initramfs -u -k all

	# systemd-networkd configures the network (no ifupdown in this image); the generator
	# turns ip= on the kernel command line into a .network file; resolved takes DNS servers
	# from networkd.
	chroot "$root" systemctl enable systemd-networkd.service systemd-network-generator.service \
		systemd-resolved.service kasou-agent.service kasou-ssh-keygen.service
	# COM2 belongs to the agent.
	chroot "$root" systemctl mask serial-getty@ttyS1.service
	# Interfaces keep the kernel's names (eth0): udev's predictable names for a virtio-mmio
	# NIC found through ACPI are built from its ACPI id, and ip=...:eth0:... must find eth0
	# (systemd.net-naming-scheme(7): masking 99-default.link turns the naming off).
	ln -sfn /dev/null "$root/etc/systemd/network/99-default.link"

	# Nobody logs in as root: cloud-init creates the users (its default user "debian" gets
	# sudo).
	chroot "$root" passwd --lock root >/dev/null
	# Every copy of the image would share these: each machine makes its own at first boot
	# (cloud-init, or kasou-ssh-keygen.service without it).
	rm -f "$root"/etc/ssh/ssh_host_*_key "$root"/etc/ssh/ssh_host_*_key.pub
	# Empty: systemd makes a machine id at each boot until the root is writable, then keeps it
	# (machine-id(5)); an id built into the image would be shared by every copy.
	: >"$root/etc/machine-id"
	rm -f "$root/var/lib/dbus/machine-id"
	;;
*)
	echo "hooks.sh: unknown phase $phase" >&2
	exit 2
	;;
esac
