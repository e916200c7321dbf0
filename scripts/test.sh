#!/usr/bin/env bash
# The whole test suite, from a fresh machine: adds the wasm target, builds the jobs, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
scripts/build-jobs.sh > /dev/null
cargo test --workspace "$@"
