#!/usr/bin/env bash
# Ceph RBD on one machine, for side-by-side reading with repbench
# (integration/src/bin/repbench.rs): the same write workloads through fio's
# rbd engine on a pool of size 1 and a pool of size 2.
#
# Builds a throwaway Ceph cluster in a fresh directory under --dir (a real
# filesystem, not tmpfs): one mon, one mgr and two bluestore OSDs whose block
# devices are plain (sparse) files, every daemon bound to 127.0.0.1 only, with
# its own fsid, config file and cephx keyring, no systemd, nothing read from
# /etc/ceph. CRUSH places replicas on distinct OSDs of the one host. Two pools,
# size 1 / min_size 1 and size 2 / min_size 1, each hold one 1 GiB image; fio
# drives 256 MiB of each image:
#   randwrite-4k-qd1   4 KiB random writes, 1 in flight     p50 and p99 completion latency (µs)
#   randwrite-4k-qd32  4 KiB random writes, 32 in flight    IOPS
#   seqwrite-1m-qd4    1 MiB sequential writes, 4 in flight MiB/s
# Each workload runs R times per pool for S seconds, alternating pools; the
# output is a markdown table of median (min–max) per cell, then every run's
# figures.
#
#   integration/bench/ceph-rbd.sh                                  3 runs x 5 s per pool and workload
#   integration/bench/ceph-rbd.sh --runs 3 --seconds 4 --dir /var/tmp
#   integration/bench/ceph-rbd.sh --json results.json              also write every figure as JSON
#   integration/bench/ceph-rbd.sh --rbd-cache off                  writes complete once every replica has them
#   integration/bench/ceph-rbd.sh --media ssd                      bluestore and OSD threads as on an SSD
#
# --rbd-cache default keeps librbd's cache settings: rbd_cache on, policy
# writearound, writethrough until the first flush. fio's rbd engine flushes
# the image right after opening it (unless direct=1), so write-around is on
# for the whole measurement: librbd completes a write as soon as it has sent
# it, with up to rbd_cache_max_dirty (24 MiB) in flight, and a flush waits
# for all of them. --rbd-cache off sets rbd_cache = false (and fio's
# direct=1): a write completes once every replica's OSD has committed it.
# --media auto leaves Ceph to pick its HDD or SSD settings from the backing
# device's rotational flag; ssd or hdd forces one set. Installs ceph-mon,
# ceph-mgr, ceph-osd, ceph-common and fio with apt-get when they are missing.
# Everything it starts is stopped, and its directory removed, on exit,
# failure or Ctrl-C.
set -euo pipefail

usage() {
    echo "usage: $0 [--runs 3] [--seconds 5] [--dir /var/tmp] [--json FILE] [--rbd-cache default|off] [--media auto|ssd|hdd]" >&2
    exit "${1:-2}"
}

runs=3
seconds=5
base=/var/tmp
json_out=
media=auto
rbd_cache=default
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
    --dir) base=${2:?--dir needs a value}; shift 2 ;;
    --json) json_out=$(realpath -m -- "${2:?--json needs a file}"); shift 2 ;;
    --media) media=${2:?--media needs a value}; shift 2 ;;
    --rbd-cache) rbd_cache=${2:?--rbd-cache needs a value}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "ceph-rbd: unknown argument $1" >&2; usage ;;
    esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "ceph-rbd: --runs must be a positive integer" >&2; exit 2; }
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "ceph-rbd: --seconds must be a positive integer" >&2; exit 2; }
case "$media" in auto | ssd | hdd) ;; *) echo "ceph-rbd: --media is auto, ssd or hdd" >&2; exit 2 ;; esac
case "$rbd_cache" in default | off) ;; *) echo "ceph-rbd: --rbd-cache is default or off" >&2; exit 2 ;; esac

log() { echo "ceph-rbd: $*" >&2; }

# --- software -----------------------------------------------------------------
missing=()
command -v ceph-mon >/dev/null 2>&1 || missing+=(ceph-mon)
command -v ceph-mgr >/dev/null 2>&1 || missing+=(ceph-mgr)
command -v ceph-osd >/dev/null 2>&1 || missing+=(ceph-osd)
for tool in ceph rbd ceph-authtool ceph-conf; do
    command -v "$tool" >/dev/null 2>&1 || { missing+=(ceph-common); break; }
done
command -v monmaptool >/dev/null 2>&1 || missing+=(ceph-base)
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
engines=$(fio --enghelp 2>&1 || true)
if ! grep -qw rbd <<<"$engines"; then
    log "this fio has no rbd engine (fio --enghelp); install a fio built with librbd"
    exit 1
fi

if [ ! -d "$base" ]; then
    log "no directory $base"
    exit 1
fi
fstype=$(df --output=fstype "$base" | tail -n 1)
if [ "$fstype" = tmpfs ] || [ "$fstype" = ramfs ]; then
    log "$base is $fstype; give --dir a directory on a real filesystem"
    exit 1
fi

# --- teardown -----------------------------------------------------------------
work=
pids=()
names=()
fio_pid=
cleanup() {
    local rc=$?
    # Teardown runs to the end: neither a second Ctrl-C nor a closed stderr
    # (the reader of a pipe gone with the first Ctrl-C) cuts it short.
    set +e
    trap '' INT TERM PIPE
    trap - EXIT
    if [ -n "$fio_pid" ]; then
        # fio_pid is timeout's; fio is its child.
        pkill -KILL -P "$fio_pid" 2>/dev/null
        kill -KILL "$fio_pid" 2>/dev/null
    fi
    if [ $rc -ne 0 ] && [ $rc -ne 130 ] && [ $rc -ne 143 ] && [ -n "$work" ] && [ -d "$work/log" ]; then
        for file in "$work"/log/*; do
            [ -s "$file" ] || continue
            echo "---- tail of ${file#"$work"/}" >&2
            tail -n 20 "$file" >&2
        done
    fi
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    local deadline=$((SECONDS + 15))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ -n "$work" ]; then
        rm -rf -- "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

work=$(mktemp -d "$base/ceph-rbd.XXXXXX")
conf=$work/ceph.conf
mkdir -p "$work/log" "$work/run" "$work/crash" "$work/results"
started=$SECONDS

# Starts a daemon in the foreground of a background job, so its pid is ours to stop.
start() {
    local name=$1
    shift
    "$@" >"$work/log/$name.out" 2>&1 &
    pids+=($!)
    names+=("$name")
}

# Fails if a daemon this script started has exited.
check_alive() {
    local i
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            log "${names[$i]} exited"
            return 1
        fi
    done
}

# wait_until WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_until() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        check_alive
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${limit} s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

cephc() { timeout 60 ceph -c "$conf" --connect-timeout 30 "$@"; }
rbdc() { timeout 60 rbd -c "$conf" "$@"; }
# Runs a command with its output in log/cli.out (shown if the script fails).
quiet() { "$@" >>"$work/log/cli.out" 2>&1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- cluster ------------------------------------------------------------------
fsid=$(uuidgen)
mon_port=$(free_port)
case "$media" in
auto) media_conf="" ;;
ssd) media_conf=$'bluestore_debug_enforce_settings = ssd\nosd_op_num_shards = 8\nosd_op_num_threads_per_shard = 2' ;;
hdd) media_conf=$'bluestore_debug_enforce_settings = hdd\nosd_op_num_shards = 5\nosd_op_num_threads_per_shard = 1' ;;
esac
client_section=""
fio_direct=()
if [ "$rbd_cache" = off ]; then
    client_section="rbd_cache = false"
    fio_direct=(--direct=1)
fi

# $name, $id and $cluster are Ceph's own metavariables, expanded per daemon.
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$mon_port]
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
public_network = 127.0.0.0/8
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_msgr1 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $work/keyring
run_dir = $work/run
crash_dir = $work/crash
mon_data = $work/\$name
osd_data = $work/\$name
mgr_data = $work/\$name
osd_objectstore = bluestore
# Each OSD's block device: a sparse file of 8 GiB in its data directory.
bluestore_block_create = true
bluestore_block_size = 8589934592
# Replicas go to distinct OSDs, not distinct hosts: there is one host.
osd_crush_chooseleaf_type = 0
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 32
osd_pool_default_pgp_num = 32
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_cluster_log_to_file = false
auth_allow_insecure_global_id_reclaim = false
mgr_initial_modules = iostat
osd_memory_target = 1073741824
$media_conf

[mon]
log_file = $work/log/\$name.log
[mgr]
log_file = $work/log/\$name.log
[osd]
log_file = $work/log/\$name.log
[client]
$client_section
EOF

log "cluster in $work (fsid $fsid, mon on 127.0.0.1:$mon_port, media $media, rbd cache $rbd_cache)"

ceph-authtool --create-keyring "$work/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$work/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
for id in 0 1; do
    ceph-authtool "$work/keyring" --gen-key -n "osd.$id" \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
done
ceph-authtool "$work/keyring" --gen-key -n mgr.x \
    --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null

monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$work/monmap" >/dev/null
# The mon's store imports every key (and its caps) of the keyring at mkfs.
ceph-mon -c "$conf" --mkfs -i a --monmap "$work/monmap" --keyring "$work/keyring" \
    >"$work/log/mon.a.mkfs" 2>&1
start mon.a ceph-mon -f -c "$conf" -i a
wait_until "the mon" 60 cephc mon stat

mkdir -p "$work/mgr.x"
start mgr.x ceph-mgr -f -c "$conf" -i x

for id in 0 1; do
    uuid=$(uuidgen)
    got=$(cephc osd new "$uuid" "$id")
    [ "$got" = "$id" ] || { log "ceph osd new gave id '$got', wanted $id"; exit 1; }
    mkdir -p "$work/osd.$id"
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" >"$work/log/osd.$id.mkfs" 2>&1
    start "osd.$id" ceph-osd -f -c "$conf" -i "$id"
done

osds_up() {
    cephc osd stat -f json | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["num_up_osds"] == 2 and s["num_in_osds"] == 2 else 1)'
}
wait_until "two OSDs up and in" 120 osds_up
# No scrubbing while measuring.
quiet cephc osd set noscrub
quiet cephc osd set nodeep-scrub
for size in 1 2; do
    pool=size$size
    quiet cephc osd pool create "$pool" 32 32 replicated
    quiet cephc osd pool set "$pool" size "$size" --yes-i-really-mean-it
    quiet cephc osd pool set "$pool" min_size 1
    quiet cephc osd pool application enable "$pool" rbd
    quiet rbdc pool init "$pool"
done

pgs_clean() {
    cephc status -f json | python3 -c '
import json, sys
pgmap = json.load(sys.stdin)["pgmap"]
states = {s["state_name"]: s["count"] for s in pgmap.get("pgs_by_state", [])}
sys.exit(0 if pgmap["num_pgs"] >= 64 and states.get("active+clean", 0) == pgmap["num_pgs"] else 1)'
}
wait_until "every placement group active+clean" 180 pgs_clean

for size in 1 2; do
    quiet rbdc create --size 1G "size$size/img"
done

# Every listening socket of every daemon is on 127.0.0.1.
sockets=$(ss -Hltunp)
for i in "${!pids[@]}"; do
    while read -r line; do
        [ -n "$line" ] || continue
        local_addr=$(awk '{print $5}' <<<"$line")
        case "$local_addr" in
        127.0.0.1:*) ;;
        *) log "${names[$i]} listens on $local_addr"; exit 1 ;;
        esac
    done < <(grep -F "pid=${pids[$i]}," <<<"$sockets" || true)
done

log "cluster up after $((SECONDS - started)) s"

# --- workloads ----------------------------------------------------------------
# fio_rbd POOL OUTPUT LIMIT FIO-ARGS...: one fio job on POOL's image, JSON to OUTPUT.
fio_rbd() {
    local pool=$1 out=$2 limit=$3
    shift 3
    CEPH_CONF=$conf timeout "$limit" fio --output-format=json --output="$out" \
        --name=bench --ioengine=rbd --clientname=admin --pool="$pool" --rbdname=img \
        --size=256m --numjobs=1 --norandommap --randrepeat=1 --lat_percentiles=1 \
        ${fio_direct[@]+"${fio_direct[@]}"} "$@" \
        >>"$work/log/fio.out" 2>&1 &
    fio_pid=$!
    wait "$fio_pid"
    fio_pid=
}

# cpu_ticks PID...: user + system CPU time of the processes, in clock ticks.
cpu_ticks() {
    local pid total=0 ticks
    for pid in "$@"; do
        # The fields after the command name's closing parenthesis start
        # with field 3; utime and stime are fields 14 and 15.
        ticks=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')
        total=$((total + ticks))
    done
    echo "$total"
}

# Waits (up to 30 s) until the daemons together use less than a quarter of
# a CPU over half a second: background work the last workload left (a
# bluestore or RocksDB flush) is done before the next is measured. repbench
# waits the same way for fabricd.
clock_ticks=$(getconf CLK_TCK)
wait_idle() {
    local deadline=$((SECONDS + 30)) before after
    while :; do
        # A daemon that exited has no /proc entry left to read.
        check_alive || exit 1
        before=$(cpu_ticks "${pids[@]}")
        sleep 0.5
        after=$(cpu_ticks "${pids[@]}")
        # (after - before) / clock_ticks < 0.25 * 0.5
        if [ $(((after - before) * 8)) -lt "$clock_ticks" ]; then
            return 0
        fi
        if [ $SECONDS -ge $deadline ]; then
            log "the daemons were still busy after 30 s; measuring anyway"
            return 0
        fi
    done
}

workloads=(randwrite-4k-qd1 randwrite-4k-qd32 seqwrite-1m-qd4)
workload_args() {
    case "$1" in
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    seqwrite-1m-qd4) echo "--rw=write --bs=1m --iodepth=4" ;;
    esac
}

# Prefill: the timed runs measure overwrites of allocated data, not first
# writes to a thin-provisioned image (object creation, object-map updates):
# the 256 MiB span of each image is written once, sequentially, 1 MiB at a
# time with 4 in flight, and flushed.
for size in 1 2; do
    log "prefilling 256 MiB of size$size/img"
    fio_rbd "size$size" "$work/results/prefill.size$size.json" 600 \
        --rw=write --bs=1m --iodepth=4 --end_fsync=1
done

for run in $(seq 1 "$runs"); do
    for size in 1 2; do
        for workload in "${workloads[@]}"; do
            wait_idle
            # shellcheck disable=SC2046 # word splitting of the workload's fio arguments
            fio_rbd "size$size" "$work/results/size$size.$workload.$run.json" $((seconds + 120)) \
                $(workload_args "$workload") --time_based --runtime="$seconds"
        done
        log "run $run of $runs on pool size $size done"
    done
done

# --- report -------------------------------------------------------------------
rotational=$(cephc osd metadata 0 -f json | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(m.get("bluestore_bdev_rotational", m.get("rotational", "?")))')
client_conf() { ceph-conf -c "$conf" --name client.admin --show-config-value "$1"; }

META_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
META_KERNEL=$(uname -sr) \
META_CPU="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1) x $(nproc)" \
META_FS="$fstype ($(df --output=source "$work" | tail -n 1))" \
META_CEPH=$(ceph --version) \
META_FIO=$(fio --version) \
META_MEDIA="$media (OSD rotational: $rotational)" \
META_RBD_CACHE="$rbd_cache: rbd_cache=$(client_conf rbd_cache), rbd_cache_policy=$(client_conf rbd_cache_policy), rbd_cache_writethrough_until_flush=$(client_conf rbd_cache_writethrough_until_flush)" \
META_RUNS=$runs META_SECONDS=$seconds \
    python3 - "$work/results" "$json_out" <<'EOF'
import json, os, sys

results, json_out = sys.argv[1], sys.argv[2]
runs, seconds = int(os.environ["META_RUNS"]), int(os.environ["META_SECONDS"])
pools = ["size1", "size2"]
# workload -> [(measure key, label)]
measures = {
    "randwrite-4k-qd1": [("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("iops", "IOPS")],
    "randwrite-4k-qd32": [("iops", "IOPS")],
    "seqwrite-1m-qd4": [("mib_s", "MiB/s")],
}


def load(path):
    with open(path) as f:
        text = f.read()
    return json.loads(text[text.index("{"):])


def figures(report):
    job = report["jobs"][0]
    write = job["write"]
    if job.get("error"):
        raise SystemExit(f"fio job error {job['error']}")
    clat = write["clat_ns"]["percentile"]
    lat = write["lat_ns"]["percentile"]
    return {
        "p50_us": clat["50.000000"] / 1000,
        "p99_us": clat["99.000000"] / 1000,
        "lat_p50_us": lat["50.000000"] / 1000,
        "lat_p99_us": lat["99.000000"] / 1000,
        "iops": write["iops"],
        "mib_s": write["bw_bytes"] / (1 << 20),
    }


raw = {pool: {w: {} for w in measures} for pool in pools}
for pool in pools:
    for w, ms in measures.items():
        keys = [k for k, _ in ms]
        if w == "randwrite-4k-qd1":
            keys += ["lat_p50_us", "lat_p99_us"]
        for run in range(1, runs + 1):
            got = figures(load(os.path.join(results, f"{pool}.{w}.{run}.json")))
            for k in keys:
                raw[pool][w].setdefault(k, []).append(got[k])


def spread(values):
    v = sorted(values)
    return v[len(v) // 2], v[0], v[-1]


def fmt(x):
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


meta = {
    "date": os.environ["META_DATE"],
    "kernel": os.environ["META_KERNEL"],
    "cpu": os.environ["META_CPU"],
    "filesystem": os.environ["META_FS"],
    "ceph": os.environ["META_CEPH"],
    "fio": os.environ["META_FIO"],
    "osd_media": os.environ["META_MEDIA"],
    "librbd_cache": os.environ["META_RBD_CACHE"],
    "write_completes": (
        "once every replica's OSD has committed it"
        if os.environ["META_RBD_CACHE"].startswith("off")
        else "once librbd has sent it (write-around; fio flushes at open)"
    ),
    "runs": runs,
    "seconds": seconds,
    "span_mib": 256,
    "image_gib": 1,
}

out = []
out.append("## ceph-rbd: RBD on pools of size 1 and 2, one mon, two bluestore OSDs on files, loopback\n")
out.append(f"- {meta['date']}; {meta['kernel']}; {meta['cpu']}; {meta['filesystem']}")
out.append(f"- {meta['ceph']}; {meta['fio']} (ioengine=rbd)")
out.append(f"- OSD media settings: {meta['osd_media']}; librbd: {meta['librbd_cache']}")
out.append(f"- a write completes {meta['write_completes']}")
out.append(f"- {runs} runs of {seconds} s per pool and workload, alternating pools; 1 GiB images, 256 MiB span, prefilled\n")
out.append("| workload | measure | pool size 1 | pool size 2 | 2/1 |")
out.append("|---|---|---|---|---|")
for w, ms in measures.items():
    for k, label in ms:
        cells = [spread(raw[pool][w][k]) for pool in pools]
        text = [f"{fmt(m)} ({fmt(lo)}–{fmt(hi)})" for m, lo, hi in cells]
        ratio = cells[1][0] / cells[0][0] if cells[0][0] else float("nan")
        out.append(f"| {w} | {label} | {text[0]} | {text[1]} | {ratio:.2f} |")
out.append("\nCells: median (min–max) over the runs; latencies are fio's completion latency (clat).\n")
out.append("### Every run\n")
out.append("| pool | workload | measure | runs |")
out.append("|---|---|---|---|")
for pool in pools:
    for w in measures:
        for k, values in raw[pool][w].items():
            out.append(f"| {pool} | {w} | {k} | {', '.join(fmt(v) for v in values)} |")
out.append("\nlat_p50_us / lat_p99_us: fio's total latency (submission + completion).")
print("\n".join(out))

if json_out:
    doc = {"meta": meta}
    doc.update(raw)
    doc["medians"] = {
        pool: {w: {k: spread(v)[0] for k, v in raw[pool][w].items()} for w in measures}
        for pool in pools
    }
    with open(json_out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
EOF

log "done in $((SECONDS - started)) s"
