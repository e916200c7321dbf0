#!/usr/bin/env bash
# docs/images/dashboard.png: the dashboard of a local 3-node cluster under load. Starts the
# cluster (cluster-lib.sh), runs `grex bench` against it with a few failing jobs among the load,
# and has headless Chromium (driven by tests/src/bin/screenshot.rs) load /ui and take the picture
# 60 s later.
# GREX_BIN picks the binary (default target/release/grex); OUT the file.
set -euo pipefail
cd "$(dirname "$0")/.."
grex=${GREX_BIN:-target/release/grex}
out=${OUT:-docs/images/dashboard.png}
data=$(mktemp -d)
pids=()
trap 'kill ${pids[@]} 2> /dev/null; wait 2> /dev/null; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
FLOCKS=64 start_cluster 3
FLOCKS=64 wait_formed 3
FLOCKS=64 wait_balanced 3
scripts/build-jobs.sh > /dev/null
for job in counter hostile; do
  $grex module put "target/jobs/wasm32-unknown-unknown/wasm/$job.wasm" --name "$job" --node http://127.0.0.1:17070 > /dev/null
done
$grex bench --node http://127.0.0.1:17070 --clients 16 --seconds 80 --rate 400 > "$data/bench" 2>&1 &
pids+=($!)
for i in 1 2 3; do $grex job run "failing-$i" hostile --input panic --node http://127.0.0.1:17070 > /dev/null 2>&1 || true; done
cargo run -q -p grex-tests --bin screenshot -- http://127.0.0.1:17070/ui "$out" 60
echo "wrote $out"
