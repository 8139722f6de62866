#!/usr/bin/env bash
# Fabric's main job on one machine, from nothing: install what is missing,
# build, start fabricd on a data directory under .fabric-demo/, create and
# attach a volume, and boot a Linux guest (QEMU, software emulation) on it
# that writes and verifies data. Then restart fabricd and boot the guest
# again to show the data survived.
#
#   ./scripts/demo.sh              run the demo, stop fabricd at the end
#   ./scripts/demo.sh --keep       leave fabricd running for your own fabctl commands
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

keep=false
[ "${1:-}" = "--keep" ] && keep=true

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what is missing"
./scripts/install-deps.sh

say "building fabricd and fabctl (release)"
cargo build --release -p fabric -p fabctl
target=${CARGO_TARGET_DIR:-$root/target}/release

say "preparing the test guest (Debian kernel, busybox, fio; cached in ~/.cache/fabric)"
./integration/guest/build.sh
guest=${FABRIC_CACHE:-$HOME/.cache/fabric}/guest

demo=$root/.fabric-demo
mkdir -p "$demo"
export FABRIC_API=$demo/api.sock
fabctl() { echo "\$ fabctl $*" >&2; "$target/fabctl" "$@"; }

start_fabricd() {
	"$target/fabricd" --data-dir "$demo/data" --api-socket "$FABRIC_API" \
		--socket-dir "$demo/vhost" >>"$demo/fabricd.log" 2>&1 &
	fabricd_pid=$!
	for _ in $(seq 100); do
		"$target/fabctl" status >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "fabricd did not start; see $demo/fabricd.log" >&2
	tail -20 "$demo/fabricd.log" >&2
	exit 1
}
stop_fabricd() {
	kill -TERM "$fabricd_pid" 2>/dev/null || true
	wait "$fabricd_pid" 2>/dev/null || true
}

# A fabricd from an earlier demo run may still hold the data directory.
if "$target/fabctl" status >/dev/null 2>&1; then
	pkill -TERM -f "fabricd --data-dir $demo/data" || true
	sleep 1
fi

say "starting fabricd (log: $demo/fabricd.log)"
start_fabricd
trap 'stop_fabricd' EXIT

say "creating and attaching a volume"
"$target/fabctl" volume show demo >/dev/null 2>&1 || fabctl volume create demo --size 1G
fabctl volume attach demo
socket=$("$target/fabctl" -o json volume attach demo | sed -n 's/.*"socket": "\(.*\)".*/\1/p')

boot_guest() { # $1: script to run in the guest
	local work
	work=$(mktemp -d)
	mkdir "$work/root"
	printf '%s\n' "$1" >"$work/root/test.sh"
	chmod +x "$work/root/test.sh"
	(cd "$work/root" && echo test.sh | cpio -o -H newc 2>/dev/null | gzip) >"$work/test.cpio.gz"
	cat "$guest/initramfs.cpio.gz" "$work/test.cpio.gz" >"$work/initramfs.gz"
	local qemu=(qemu-system-x86_64 -accel tcg -nographic -no-reboot -m 256M
		-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem
		-kernel "$guest/vmlinux" -initrd "$work/initramfs.gz"
		-append "console=ttyS0 quiet panic=-1 fabric.disks=1 fabric.tools=0000:00:1f.0"
		-chardev "socket,id=fabric-demo,path=$socket"
		-device vhost-user-blk-pci,chardev=fabric-demo,num-queues=1,addr=0x08
		-drive "file=$guest/tools.ext2,if=none,id=tools,format=raw,readonly=on"
		-device virtio-blk-pci,drive=tools,serial=fabric-tools,addr=0x1f)
	echo "\$ ${qemu[*]}" >&2
	timeout 300 "${qemu[@]}" | tr -d '\r' | tee "$demo/guest.log" |
		grep --line-buffered -E '^(guest|FABRIC-GUEST|fio)' || true
	rm -rf "$work"
}

say "booting a guest on the volume: write 8 MiB, flush, read back, fio with verification"
boot_guest '
echo "guest: disk $DISK, serial $(cat /sys/block/${DISK#/dev/}/serial), $(($(cat /sys/block/${DISK#/dev/}/size) / 2048)) MiB"
dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null
dd if=/tmp/p of=$DISK bs=1M count=8 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=$DISK of=/tmp/b bs=1M count=8 2>/dev/null
cmp /tmp/p /tmp/b && echo "guest: read back 8 MiB intact, md5 $(md5sum < /tmp/p | cut -d" " -f1)"
fio --name=demo --filename=$DISK --offset=64M --size=16M --rw=randwrite --bs=4k --ioengine=libaio \
    --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 2>&1 | grep -E "^ *(write|read):|err=" | sed "s/^ */fio: /"
'

grep -q "read back 8 MiB intact" "$demo/guest.log" || { echo "demo: the guest could not verify its data" >&2; exit 1; }
written=$(sed -n 's/.*intact, md5 //p' "$demo/guest.log")
fabctl volume show demo

say "restarting fabricd"
stop_fabricd
start_fabricd

say "booting the guest again: the data written before the restart is still there"
boot_guest '
dd if=$DISK of=/tmp/b bs=1M count=8 2>/dev/null
echo "guest: after the restart the first 8 MiB have md5 $(md5sum < /tmp/b | cut -d" " -f1)"
'
grep -q "md5 $written" "$demo/guest.log" || { echo "demo: data changed across the restart" >&2; exit 1; }
fabctl volume list

if $keep; then
	trap - EXIT
	say "fabricd keeps running (pid $fabricd_pid); try: FABRIC_API=$FABRIC_API $target/fabctl volume list"
else
	say "done; run with --keep to leave fabricd running"
fi
