#!/usr/bin/env bash
# Benchmarks, figures for docs/benchmarks.md:
#  1. in-process cost per job (cargo bench -p grex --bench job);
#  2. one durable node over QUIC: 50 clients run `counter` on random buckets (grex bench), RUNS times.
# Usage: scripts/bench.sh [RUNS] (default 3). Everything listens on 127.0.0.1 and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
scripts/build-jobs.sh > /dev/null
cargo build --release -p grex --bin grex --quiet
echo "== in-process (cargo bench -p grex --bench job)"
cargo bench -p grex --bench job --quiet 2>/dev/null | grep -v '^$'

data=$(mktemp -d)
trap 'kill $node_pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
target/release/grex serve --data "$data" --http 127.0.0.1:0 --quic 127.0.0.1:0 --peer 127.0.0.1:0 > "$data/out" 2> "$data/err" &
node_pid=$!
for _ in $(seq 1 200); do grep -q listening "$data/out" 2>/dev/null && break; sleep 0.05; done
line=$(head -1 "$data/out")
quic=$(sed -n 's/.*quic=\([^ ]*\).*/\1/p' <<< "$line")
ca=$(sed -n 's/.*ca=\([^ ]*\).*/\1/p' <<< "$line")
export GREX_NODE=$quic GREX_CA=$ca
target/release/grex module put target/jobs/wasm32-unknown-unknown/wasm/counter.wasm --name counter > /dev/null
echo "== one node, durable, 50 clients over QUIC, counter on 100k random buckets ($runs runs of 10 s)"
for i in $(seq 1 "$runs"); do
  target/release/grex bench --clients 50 --seconds 10 --buckets 100000 --seed "$i" | tail -1
done
target/release/grex status | grep -E '"(commits|change_sets|cache_hits|cache_misses)"'
