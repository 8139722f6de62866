#!/usr/bin/env bash
# Runs Fabric's whole test suite: formatting, lints, unit and property
# tests, and the integration tests with real peers (QEMU guests, fio,
# qemu-storage-daemon). Installs what is missing first. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

# CI runs in a fresh clone; a target directory outside it keeps the build
# cache between runs on the same machine.
if [ "${CI:-}" = "true" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
	export CARGO_TARGET_DIR=/var/tmp/fabric-target
fi

# The test guest (kernel, initramfs, tools disk), cached outside the tree.
./integration/guest/build.sh

echo "== format"
cargo fmt --all -- --check
echo "== lints"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
# Integration tests start the binaries; build them first.
cargo build --workspace --bins
echo "== tests"
# Two cores: tests that boot QEMU take one each, so run two at a time.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
	END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
