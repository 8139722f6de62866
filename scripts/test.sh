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
cargo test --workspace -- --test-threads=2
