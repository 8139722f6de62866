#!/usr/bin/env bash
# Installs the Debian packages that building and testing Fabric need.
# Idempotent: installs only what is missing, and runs `apt-get update` at most
# once, only when something has to be installed. Run as root (Debian 12).
#
# Note: installing qemu-system-x86 removes qemu-utils (version conflict);
# the tests use qemu-storage-daemon instead of qemu-img/qemu-nbd.
set -euo pipefail

packages=(
	# Rust build: RocksDB from the system, bindgen, C/C++ toolchain for -sys crates.
	build-essential pkg-config clang libclang-dev
	librocksdb-dev libsnappy-dev liblz4-dev libzstd-dev
	# Test guest (integration/guest/build.sh) and tests that boot it.
	qemu-system-x86 busybox-static cpio gzip xz-utils kmod e2fsprogs util-linux
	# ip (network namespaces the switch tests make for host ports).
	iproute2
	# Tools run on the host and inside the guest.
	fio
	# iasl: the VM runner's ACPI tests disassemble its tables with it.
	acpica-tools
	# DPDK testpmd (net_virtio_user): a vhost-user-net frontend without a VM.
	dpdk-dev
)

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps.sh: must run as root" >&2
	exit 1
fi

missing=()
for p in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	if [ "$status" != "install ok installed" ]; then
		missing+=("$p")
	fi
done

if [ "${#missing[@]}" -eq 0 ]; then
	echo "install-deps.sh: all ${#packages[@]} packages are installed"
	exit 0
fi

echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
