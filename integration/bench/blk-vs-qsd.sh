#!/usr/bin/env bash
# Fabric against qemu-storage-daemon over vhost-user-blk, side by side, no VM.
#
# Builds the release binaries, then runs `blkbench compare`: it starts fabricd (data directory)
# and qemu-storage-daemon (raw file, O_DIRECT, io_uring) in one fresh directory, so both sit on
# the same filesystem; prefills 1 GiB on each; runs every workload R times, alternating targets;
# and prints a markdown table of median (min–max) IOPS and p50/p99 latency with the
# fabric/qsd ratios, headed by the date, kernel, CPU and filesystem.
#
#   integration/bench/blk-vs-qsd.sh                          5 runs x 10 s per workload
#   integration/bench/blk-vs-qsd.sh --runs 3 --seconds 5 --dir /var/tmp
#   integration/bench/blk-vs-qsd.sh --peer-only              qemu-storage-daemon half only
#   integration/bench/blk-vs-qsd.sh --json > results.json
#
# Every argument goes to `blkbench compare` (see `blkbench compare --help`). Set
# BLKBENCH_NO_BUILD=1 to use the binaries already in ${CARGO_TARGET_DIR:-target}/release.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

peer_only=false
for arg in "$@"; do
    [ "$arg" = "--peer-only" ] && peer_only=true
done

if [ "${BLKBENCH_NO_BUILD:-0}" != 1 ]; then
    if $peer_only; then
        cargo build --release -p integration --bin blkbench
    else
        cargo build --release --bins -p integration -p fabric -p fabctl
    fi
fi

exec "${CARGO_TARGET_DIR:-target}/release/blkbench" compare "$@"
