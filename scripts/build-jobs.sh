#!/usr/bin/env bash
# Builds the example and test jobs in jobs/ for wasm32-unknown-unknown.
# Output: target/jobs/wasm32-unknown-unknown/wasm/<job>.wasm (a separate target directory, so this
# can run while another cargo command holds the main one).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
jobs=()
for dir in jobs/*/; do jobs+=(-p "$(basename "$dir")"); done
CARGO_TARGET_DIR=target/jobs cargo build --quiet --target wasm32-unknown-unknown --profile wasm "${jobs[@]}"
ls -1 target/jobs/wasm32-unknown-unknown/wasm/*.wasm
