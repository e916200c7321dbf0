#!/usr/bin/env bash
# The whole test suite, from a fresh machine: adds the wasm target, redis-cli, chromium (the
# dashboard test), tmux (`grex top`'s test) and Python's venv (the Python jobs' test), builds the
# jobs, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
missing=()
command -v redis-cli > /dev/null || missing+=(redis-tools)
[ -x /usr/bin/chromium ] || [ -n "${GREX_CHROMIUM:-}" ] || missing+=(chromium)
command -v tmux > /dev/null || missing+=(tmux)
python3 -c 'import ensurepip, venv' 2> /dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi
scripts/build-jobs.sh > /dev/null
cargo test --workspace "$@"
