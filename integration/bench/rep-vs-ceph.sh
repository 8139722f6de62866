#!/usr/bin/env bash
# Synchronous replication beside Ceph RBD on this machine, in one run:
# repbench (volumes with 1, 2 and 3 replicas on a 3-node loopback cluster),
# then ceph-rbd.sh twice (librbd's cache off: a write completes once every
# replica's OSD has committed it; and librbd's default cache), the same job
# shapes, then a table of Fabric against each.
#   integration/bench/rep-vs-ceph.sh [--runs 3] [--seconds 4] [--dir /var/tmp]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

runs=3
seconds=4
dir=/var/tmp
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs="$2"; shift 2 ;;
	--seconds) seconds="$2"; shift 2 ;;
	--dir) dir="$2"; shift 2 ;;
	*) echo "usage: $0 [--runs 3] [--seconds 4] [--dir /var/tmp]" >&2; exit 2 ;;
	esac
done

cargo build --release --bins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"${CARGO_TARGET_DIR:-target}/release/repbench" --runs "$runs" --seconds "$seconds" --dir "$dir" \
	--json "$out/fabric.json"
integration/bench/ceph-rbd.sh --runs "$runs" --seconds "$seconds" --dir "$dir" --rbd-cache off \
	--json "$out/ceph-off.json"
integration/bench/ceph-rbd.sh --runs "$runs" --seconds "$seconds" --dir "$dir" \
	--json "$out/ceph-default.json"

python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
fabric = json.load(open(f"{out}/fabric.json"))
off = json.load(open(f"{out}/ceph-off.json"))
default = json.load(open(f"{out}/ceph-default.json"))

def cell(values):
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"

rows = [
    ("randwrite-4k-qd1", "p50_us", "p50 µs", False),
    ("randwrite-4k-qd1", "p99_us", "p99 µs", False),
    ("randwrite-4k-qd1", "iops", "IOPS", True),
    ("randwrite-4k-qd32", "iops", "IOPS", True),
    ("seqwrite-1m-qd4", "mib_s", "MiB/s", True),
]
print("## Fabric against Ceph RBD, same run\n")
print("Fabric: advantage = Ceph latency ÷ Fabric latency, or Fabric rate ÷ Ceph rate.\n")
for replicas in (1, 2):
    f = fabric[f"r{replicas}"]
    c_off = off[f"size{replicas}"]
    c_def = default[f"size{replicas}"]
    print(f"### {replicas} replica{'s' if replicas > 1 else ''} (Ceph pool size {replicas})\n")
    print("| workload | measure | Fabric | Ceph, cache off | advantage | Ceph, default cache | advantage |")
    print("|---|---|---|---|---|---|---|")
    for workload, key, label, higher in rows:
        fv, ov, dv = f[workload][key], c_off[workload][key], c_def[workload][key]
        fm, om, dm = (statistics.median(v) for v in (fv, ov, dv))
        adv = (lambda ours, theirs: ours / theirs) if higher else (lambda ours, theirs: theirs / ours)
        print(f"| {workload} | {label} | {cell(fv)} | {cell(ov)} | {adv(fm, om):.2f}× | {cell(dv)} | {adv(fm, dm):.2f}× |")
    print()
print("Cells: median (min–max) over the runs.")
PY
