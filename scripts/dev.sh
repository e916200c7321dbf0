#!/usr/bin/env bash
# A local Grex node on loopback with the example jobs loaded: adds the wasm target, builds the jobs
# and the node (release), then runs `grex dev` with any arguments given (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
scripts/build-jobs.sh > /dev/null
cargo build --release -p grex --bin grex
exec target/release/grex dev "$@"
