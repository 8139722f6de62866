#!/usr/bin/env bash
# Port-to-port forwarding through Fabric's switch beside Open vSwitch with
# DPDK, in one run, with the same packet source: one DPDK testpmd with two
# net_virtio_user ports in flowgen mode (it sends on both and counts what
# arrives on both), its lcores on CPU 0; the switch under test on CPU 1.
#
#   integration/bench/switch-vs-ovs.sh [--runs 3] [--seconds 8] [--sizes 64,1500]
#       [--json FILE] [--skip-bridge] [--targets fabric,fabric-2-nodes,ovs-normal,ovs-flows]
#
# For each frame size and run, alternating:
# - fabric:      fabricd, two ports on one segment (MAC learning, no port
#                security: flowgen sends from a fixed address);
# - ovs-normal:  ovs-vswitchd-dpdk, a netdev bridge with two
#                dpdkvhostuserclient ports and the NORMAL action (MAC learning);
# - ovs-flows:   the same bridge with two port-to-port flow rules (no learning).
# Each reports testpmd's received packets per second (both ports, median of
# the 1 s samples after a warm-up) and the switch's CPU time in that window,
# from /proc: cycles per forwarded packet = CPU seconds x clock / packets. That
# last figure is the fair one here: it does not depend on how much CPU the
# shared machine happened to give the switch (OVS's PMD thread spins, so it
# always takes the whole core; fabricd's port threads sleep when idle).
# Before each run, `linebounce` measures how long a cache line takes to go
# from CPU 0 to CPU 1 and back: on a virtual machine it depends on where the
# host placed the two virtual CPUs and can change from one run to the next,
# and every switch here pays it for each line testpmd hands over.
# Then (unless --skip-bridge) a Linux bridge between two veth pairs in two
# network namespaces made for the run, TCP throughput with iperf3.
# Needs root (hugepages, namespaces); installs dpdk-dev, openvswitch-switch-dpdk
# and iperf3 if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

runs=3
seconds=8
sizes=64,1500
json=""
bridge=true
targets=fabric,fabric-2-nodes,ovs-normal,ovs-flows
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs="$2"; shift 2 ;;
	--seconds) seconds="$2"; shift 2 ;;
	--sizes) sizes="$2"; shift 2 ;;
	--json) json="$2"; shift 2 ;;
	--skip-bridge) bridge=false; shift ;;
	--targets) targets="$2"; shift 2 ;;
	*) echo "usage: $0 [--runs 3] [--seconds 8] [--sizes 64,1500] [--json FILE] [--skip-bridge] [--targets LIST]" >&2; exit 2 ;;
	esac
done
if [ "$(id -u)" -ne 0 ]; then
	echo "switch-vs-ovs.sh: needs root (hugepages, network namespaces)" >&2
	exit 1
fi

missing=()
for p in dpdk-dev openvswitch-switch-dpdk iperf3; do
	[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# One build for all three, so the crates they share are built once.
cargo build --release -p fabric -p fabctl -p integration \
	--bin fabricd --bin fabctl --bin linebounce
exec python3 integration/bench/switch_vs_ovs.py --runs "$runs" --seconds "$seconds" \
	--sizes "$sizes" --json "$json" --bridge "$bridge" --targets "$targets" \
	--bin "${CARGO_TARGET_DIR:-target}/release"
