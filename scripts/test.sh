#!/usr/bin/env bash
# The whole test suite, from a fresh machine: adds the wasm target and redis-cli, builds the jobs,
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if ! command -v redis-cli > /dev/null; then
  echo "installing redis-tools (redis-cli, for tests/redis-cli.sh)"
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools > /dev/null
fi
scripts/build-jobs.sh > /dev/null
cargo test --workspace "$@"
