#!/usr/bin/env bash
# Starts a 3-node Fabric cluster on loopback, for trying it out.
#   ./scripts/local-cluster.sh         build, start three fabricd, form the cluster
#   ./scripts/local-cluster.sh stop    stop them (the data stays in .fabric-local/)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)/.fabric-local
target=${CARGO_TARGET_DIR:-$(pwd)/target}/release

if [ "${1:-}" = "stop" ]; then
	for i in 1 2 3; do
		pkill -TERM -f "fabricd --data-dir $root/n$i/data" || true
	done
	exit 0
fi

./scripts/install-deps.sh
cargo build --release -p fabric -p fabctl
mkdir -p "$root"
for i in 1 2 3; do
	if ! "$target/fabctl" --api "$root/n$i/api.sock" status >/dev/null 2>&1; then
		mkdir -p "$root/n$i"
		"$target/fabricd" --data-dir "$root/n$i/data" --api-socket "$root/n$i/api.sock" \
			--socket-dir "$root/n$i/vhost" --api-tcp "127.0.0.1:760$i" \
			--cluster-listen "127.0.0.1:770$i" --node-name "n$i" >>"$root/n$i/fabricd.log" 2>&1 &
	fi
done
for i in 1 2 3; do
	for _ in $(seq 100); do
		"$target/fabctl" --api "$root/n$i/api.sock" status >/dev/null 2>&1 && break
		sleep 0.1
	done
done
fabctl() { local node=$1; shift; echo "\$ fabctl --api $root/n$node/api.sock $*" >&2; "$target/fabctl" --api "$root/n$node/api.sock" "$@"; }
if ! "$target/fabctl" --api "$root/n1/api.sock" cluster status >/dev/null 2>&1; then
	fabctl 1 cluster init
	for i in 2 3; do
		token=$("$target/fabctl" --api "$root/n1/api.sock" cluster token)
		fabctl "$i" cluster join 127.0.0.1:7601 --token "$token"
	done
	sleep 2
fi
fabctl 2 node list
fabctl 3 pool
echo
echo "Stop with ./scripts/local-cluster.sh stop; logs in $root/n*/fabricd.log"
