#!/usr/bin/env bash
# Job latency at a fixed share of the peak: three nodes (256 flocks, replication 3, leadership
# spread, every write fsync'd), `grex bench` with 50 canary-following QUIC clients on 100k random
# buckets. Measures the peak once (8 s, back to back), then RUNS runs of 8 s paced to SHARE of it
# (latency counted from when each job was due), and prints each run's p50 and p99.
# Usage: scripts/bench-latency.sh [RUNS] [SHARE] (defaults 3 and 0.5; release build and jobs first:
# cargo build --release -p grex; scripts/build-jobs.sh). GREX=path picks another binary. RATE=N
# skips the peak run and paces to N jobs/s (to compare binaries at one rate). Listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3} share=${2:-0.5}
grex=${GREX:-target/release/grex}
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
start_for_load 3
export GREX_NODE=quic://127.0.0.1:17071 GREX_CA=$data/node-0/ca.pem
bench() { $grex bench --clients 50 --buckets 100000 "$@" | tail -1; }
bench --seconds 3 > /dev/null  # warm-up: every node compiles the module and loads buckets
rate=${RATE:-}
if [ -z "$rate" ]; then
  peak=$(bench --seconds 8)
  echo "peak: $peak"
  rate=$(awk -v s="$share" '{ printf "%.0f", $2 * s }' <<< "$peak")
fi
echo "paced to $rate jobs/s:"
for i in $(seq 1 "$runs"); do bench --seconds 8 --rate "$rate" --seed "$i"; done
