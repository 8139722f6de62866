#!/usr/bin/env bash
# Metadata commits: a 3-node Fabric cluster against a 3-member etcd 3.4
# cluster on loopback, side by side (see integration/src/bin/metabench.rs).
#   integration/bench/meta-vs-etcd.sh [--ops 2000] [--runs 5] [--concurrency 16]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! command -v etcd >/dev/null 2>&1; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server
fi
cargo build --release --bins
exec "${CARGO_TARGET_DIR:-target}/release/metabench" "$@"
