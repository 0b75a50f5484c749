#!/usr/bin/env bash
# The test command: formatting, lints, then every test in release mode (unit, property,
# GRE vectors, and the end-to-end lab tests, which need root and the tools .ci/run installs).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== cargo test --release"
cargo test --workspace --release -- --test-threads="${VPCD_TEST_THREADS:-2}"
