#!/usr/bin/env bash
# Builds a guest program for vmrun: freestanding C, a static 64-bit ELF
# linked at 1 MiB, entered in 64-bit mode with the vCPU index in rdi. It
# also carries a PVH entry (pvh.S), so QEMU's -kernel boots the same file.
#   vmrun/guest/build.sh hello OUT.elf
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=$1
out=$2
exec gcc -O2 -ffreestanding -nostdlib -static -fno-pic -no-pie -mno-red-zone \
	-mgeneral-regs-only -fno-stack-protector -fcf-protection=none \
	-Wl,-Ttext-segment=0x100000 -Wl,-e,_start -Wl,--build-id=none -Wl,-z,noexecstack \
	-o "$out" "$here/$name.c" "$here/pvh.S"
