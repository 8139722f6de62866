#!/usr/bin/env bash
# VMM costs that do not depend on guest speed, vmrun beside QEMU's microvm
# machine (-accel kvm), same guest ELF, same run: the time from starting
# the runner to the guest's first instruction (its first serial byte,
# timed through a pipe), and the runner's resident memory for a 1-vCPU
# 128 MiB VM (VmRSS and its anon/file/shmem parts, read while the guest
# spins; the guest itself touches under 100 KiB).
#
#   integration/bench/vmm-vs-qemu.sh [--runs 10]
#
# The guest is vmrun/guest/boot.c (with the PVH entry QEMU's -kernel
# needs): it prints '!' at once, spins, and powers off.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

runs=10
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs="$2"; shift 2 ;;
	*) echo "usage: $0 [--runs 10]" >&2; exit 2 ;;
	esac
done

cargo build --release -p vmrun
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
vmrun/guest/build.sh boot "$work/boot.elf"

python3 - "$runs" "${CARGO_TARGET_DIR:-target}/release/vmrun" "$work/boot.elf" <<'PY'
import os, statistics, subprocess, sys, time

runs, vmrun, kernel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
commands = {
    "vmrun": [vmrun, "--kernel", kernel, "--memory", "128M", "--cpus", "1"],
    "qemu microvm": [
        "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm",
        "-m", "128M", "-smp", "1", "-kernel", kernel, "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    ],
}

def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0])  # KiB
    return fields

def one(command):
    start = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)
    first = child.stdout.read(1)
    if first != b"!":
        child.kill()
        raise SystemExit(f"{command[0]}: no '!' from the guest (got {first!r})")
    first_ms = (time.monotonic() - start) * 1000
    time.sleep(0.3)
    memory = status(child.pid)
    child.stdout.read()
    child.wait()
    return first_ms, memory

results = {name: [] for name in commands}
for run in range(runs):
    for name, command in commands.items():
        first_ms, memory = one(command)
        results[name].append((first_ms, memory))
        print(f"run {run + 1} {name}: first guest instruction after {first_ms:.1f} ms, "
              f"VmRSS {memory['VmRSS'] / 1024:.1f} MiB", flush=True)

def cell(values, digits=1):
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

print()
print(f"{runs} runs each, alternating; median (min–max)")
print()
print("| runner | start to first guest instruction (ms) | VmRSS (MiB) | anon | file | shmem |")
print("|---|---|---|---|---|---|")
for name, rs in results.items():
    mib = lambda key: [m[key] / 1024 for (_, m) in rs]
    print(f"| {name} | {cell([f for (f, _) in rs])} | {cell(mib('VmRSS'))} | "
          f"{cell(mib('RssAnon'))} | {cell(mib('RssFile'))} | {cell(mib('RssShmem'))} |")
v, q = results["vmrun"], results["qemu microvm"]
print()
print(f"vmrun / QEMU: start {statistics.median(f for f, _ in v) / statistics.median(f for f, _ in q):.2f}x, "
      f"VmRSS {statistics.median(m['VmRSS'] for _, m in v) / statistics.median(m['VmRSS'] for _, m in q):.2f}x")
PY
