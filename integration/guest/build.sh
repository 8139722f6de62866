#!/usr/bin/env bash
# Builds the Linux guest that the integration tests boot under QEMU (TCG):
#
#   OUT_DIR/vmlinuz            Debian's kernel (bzImage)
#   OUT_DIR/vmlinux            the same kernel uncompressed (ELF with a PVH entry
#                              point): QEMU boots it directly, which skips the
#                              in-guest decompression (about 3 s under TCG)
#   OUT_DIR/initramfs.cpio.gz  busybox-static, virtio (PCI, MMIO, blk, net) + ext4 modules, /init
#   OUT_DIR/tools.ext2         read-only disk with fio and the exact shared
#                              libraries it loads (mounted on /tools in the guest)
#   OUT_DIR/stamp              what the outputs were built from
#
# Usage: build.sh [OUT_DIR]   (default ${FABRIC_CACHE:-$HOME/.cache/fabric}/guest)
#
# Idempotent: when the outputs exist and the stamp matches (this script, init,
# the fio and busybox versions), nothing is done. The kernel is the package
# that linux-image-amd64 depends on (apt-cache depends), fetched with
# apt-get download. A test script is added per run without
# rebuilding: the kernel unpacks concatenated cpio archives, so a small archive
# holding /test.sh is appended to initramfs.cpio.gz (integration/src/guest.rs).
#
# Needs: apt-get, dpkg, busybox-static, cpio, gzip, xz-utils, kmod (modinfo),
# e2fsprogs (mke2fs -d), fio, util-linux (flock). scripts/install-deps.sh installs them.
# Environment: FABRIC_GUEST_KERNEL_PKG overrides the kernel package;
# FABRIC_GUEST_TOOLS (default "fio") lists host programs for the tools disk.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out_dir=${1:-${FABRIC_CACHE:-$HOME/.cache/fabric}/guest}
tools=${FABRIC_GUEST_TOOLS:-fio}
busybox=/bin/busybox

# Load order matters: each module's dependencies (modinfo -F depends) come first.
modules=(
	virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	virtio_blk failover net_failover virtio_net
	llc stp garp mrp 8021q
	crc16 mbcache jbd2 crc32c_generic ext4
)

log() { echo "guest/build.sh: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

for cmd in apt-cache apt-get dpkg dpkg-query cpio gzip xz grep od modinfo mke2fs ldd flock sha256sum; do
	command -v "$cmd" >/dev/null || die "missing command '$cmd' (run scripts/install-deps.sh as root)"
done
[ -x "$busybox" ] || die "missing $busybox (install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
	die "$busybox is dynamically linked; install busybox-static"
fi

mkdir -p "$out_dir"
exec 9>"$out_dir/.lock"
flock 9

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }
stamp="format=1 tools=$tools"
stamp+=" fio=$(pkg_version fio) busybox=$(pkg_version busybox-static)"
stamp+=" scripts=$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-16)"

# The stamp's first line is checked; its second line records the kernel
# package. A cached kernel stays in use when the archive moves on (resolving
# linux-image-amd64 costs about a second); FABRIC_GUEST_KERNEL_PKG or removing
# OUT_DIR/stamp forces a choice.
outputs=(vmlinuz vmlinux initramfs.cpio.gz tools.ext2)
up_to_date=1
for f in "${outputs[@]}" stamp; do
	[ -s "$out_dir/$f" ] || up_to_date=0
done
if [ "$up_to_date" = 1 ] && [ "$(head -n1 "$out_dir/stamp")" = "$stamp" ]; then
	if [ -z "${FABRIC_GUEST_KERNEL_PKG:-}" ] ||
		[ "$(sed -n 2p "$out_dir/stamp")" = "kernel=$FABRIC_GUEST_KERNEL_PKG" ]; then
		log "up to date: $out_dir ($(sed -n 2p "$out_dir/stamp"))"
		exit 0
	fi
fi

kernel_pkg=${FABRIC_GUEST_KERNEL_PKG:-}
if [ -z "$kernel_pkg" ]; then
	kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
	[ -n "$kernel_pkg" ] || die "apt-cache does not know linux-image-amd64 (run apt-get update)"
fi

log "building into $out_dir ($kernel_pkg)"
work=$(mktemp -d "${TMPDIR:-/tmp}/fabric-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel ---------------------------------------------------------------
# apt-get download writes into the current directory; as root apt warns that
# the _apt user cannot write there, which is harmless.
if ! (cd "$work" && apt-get download -q "$kernel_pkg") >"$work/apt.log" 2>&1; then
	cat "$work/apt.log" >&2
	die "apt-get download $kernel_pkg failed"
fi
debs=("$work"/*.deb)
[ -f "${debs[0]}" ] || die "apt-get download $kernel_pkg wrote no .deb"
dpkg -x "${debs[0]}" "$work/kernel"
vmlinuz=$(find "$work/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $kernel_pkg"
kver=${vmlinuz##*/vmlinuz-}
moddir=$work/kernel/lib/modules/$kver
[ -d "$moddir" ] || die "no lib/modules/$kver in $kernel_pkg"

# Find the compressed payload in the bzImage (as the kernel's
# scripts/extract-vmlinux does) and keep the first candidate that is an ELF.
extract_vmlinux() {
	local img=$1 dst=$2 pair tool magic off
	for pair in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
		tool=${pair%%:*}
		magic=${pair#*:}
		command -v "$tool" >/dev/null || continue
		for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1 || true); do
			tail -c +$((off + 1)) "$img" | "$tool" -dc >"$dst" 2>/dev/null || true
			if [ "$(head -c 4 "$dst" | od -An -c | tr -d ' ')" = '177ELF' ]; then
				return 0
			fi
		done
	done
	return 1
}
extract_vmlinux "$vmlinuz" "$work/vmlinux" || die "cannot extract vmlinux from $vmlinuz"

# --- initramfs ------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,tools,mnt,modules}
cp "$busybox" "$root/bin/busybox"
install -m 0755 "$here/init" "$root/init"
# fio's ELF interpreter is /lib64/ld-linux-x86-64.so.2: point it at the tools disk.
ln -s /tools/lib64 "$root/lib64"

declare -A loaded=()
i=10
for m in "${modules[@]}"; do
	src=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
	[ -n "$src" ] || die "module $m not found in $kernel_pkg"
	deps=$(modinfo -F depends "$src")
	for d in ${deps//,/ }; do
		[ -n "${loaded[$d]:-}" ] || die "module $m needs $d, which is not loaded before it"
	done
	dst=$root/modules/$i-$m.ko
	case "$src" in
	*.ko.xz) xz -dc "$src" >"$dst" ;;
	*.ko.zst) zstd -qdc "$src" >"$dst" ;;
	*) cp "$src" "$dst" ;;
	esac
	loaded[$m]=1
	i=$((i + 1))
done

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
	gzip -6 >"$work/initramfs.cpio.gz"

# --- tools disk -----------------------------------------------------------
# Each program with exactly the libraries ldd lists, flat in /lib, and the
# dynamic loader at its usual path under /lib64. The guest sets
# LD_LIBRARY_PATH=/tools/lib and links /lib64 to /tools/lib64.
tdir=$work/tools
mkdir -p "$tdir/bin" "$tdir/lib" "$tdir/lib64"
for t in $tools; do
	path=$(command -v "$t") || die "tool $t not found on this host"
	cp -L "$path" "$tdir/bin/$t"
	while read -r line; do
		case "$line" in
		*"=> not found"*) die "$t: $line" ;;
		*"=> /"*)
			lib=${line#*=> }
			lib=${lib%% (*}
			cp -L "$lib" "$tdir/lib/"
			;;
		/*)
			interp=${line%% (*}
			case "$interp" in
			/lib64/*) cp -L "$interp" "$tdir/lib64/" ;;
			*) die "$t: unexpected ELF interpreter $interp" ;;
			esac
			;;
		esac
	done < <(ldd "$path")
done
size_kib=$(du -sk "$tdir" | cut -f1)
size_kib=$((size_kib + size_kib / 5 + 4096))
mke2fs -q -F -t ext2 -b 4096 -m 0 -L fabric-tools -d "$tdir" "$work/tools.ext2" "${size_kib}k" >/dev/null

# --- install --------------------------------------------------------------
rm -f "$out_dir/stamp"
cp "$vmlinuz" "$out_dir/.vmlinuz.new"
cp "$work/vmlinux" "$out_dir/.vmlinux.new"
cp "$work/initramfs.cpio.gz" "$out_dir/.initramfs.cpio.gz.new"
cp "$work/tools.ext2" "$out_dir/.tools.ext2.new"
for f in "${outputs[@]}"; do
	mv -f "$out_dir/.$f.new" "$out_dir/$f"
done
printf '%s\nkernel=%s\n' "$stamp" "$kernel_pkg" >"$out_dir/stamp"
log "done: vmlinuz $(du -h "$out_dir/vmlinuz" | cut -f1), vmlinux $(du -h "$out_dir/vmlinux" | cut -f1), initramfs $(du -h "$out_dir/initramfs.cpio.gz" | cut -f1), tools $(du -h "$out_dir/tools.ext2" | cut -f1)"
