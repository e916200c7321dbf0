#!/usr/bin/env bash
# Draining a node that holds data, under load: four nodes (256 flocks, replication 3, every write
# fsync'd), filled through node 0's Redis port with HSETs of 1 KB values on random buckets until
# node 3's data directory holds MIB MiB (default 1024). Then `grex bench` (50 canary-following QUIC
# clients, the counter job on 100k buckets) measures the peak, and runs paced to half of it in
# windows of 5 s: before the drain, and while `grex cluster drain` of node 3 runs. Prints each
# window's throughput and p50/p99, how long the drain took and the snapshot bytes it copied.
# Usage: scripts/bench-drain.sh [MIB] (release build and jobs first: cargo build --release -p grex;
# scripts/build-jobs.sh). GREX=path picks another binary; SERVE_ARGS adds `grex serve` arguments to
# every node (e.g. SERVE_ARGS="--snapshot-mib-per-sec 4"); KEEP=1 keeps the data and logs. Listens
# on 127.0.0.1 only; needs about 5 × MIB MiB free in TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-1024}
grex=${GREX:-target/release/grex}
value=$(head -c 1000 /dev/zero | tr '\0' v)
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "kept $data" || rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
read -r -a serve_args <<< "${SERVE_ARGS:-}"
start_for_load 4 "${serve_args[@]}"
export GREX_NODE=quic://127.0.0.1:17071 GREX_CA=$data/node-0/ca.pem
held() { echo $(( $(du -sk "$data/node-3" | cut -f1) / 1024 )); }
echo "filling until node 3 holds $mib MiB"
started=$(date +%s)
while [ "$(held)" -lt "$mib" ]; do
  redis-benchmark -p 17073 -c 50 -P 16 -n 200000 -r 10000000 -q \
    HSET "bucket:__rand_int__" "item:__rand_int__" "$value" > /dev/null 2>&1
  echo "  node 3 holds $(held) MiB after $(( $(date +%s) - started )) s"
done
bench() { $grex bench --clients 50 --buckets 100000 "$@" | tail -1; }
bench --seconds 3 > /dev/null  # warm-up: every node compiles the module
peak=$(bench --seconds 8)
rate=$(awk '{ printf "%.0f", $2 / 2 }' <<< "$peak")
echo "peak: $peak"
echo "paced to $rate jobs/s, windows of 5 s, before the drain:"
for i in 1 2 3; do bench --seconds 5 --rate "$rate" --seed "$i"; done
node3=$(awk '/listening/ { print $3 }' "$data/out-3")
# Snapshot bytes every member has sent, as node 0 hears (pings carry them).
copied() {
  curl -s http://127.0.0.1:17070/v1/cluster/nodes | python3 -c \
    'import json, sys; print(sum(n["snapshot_bytes_sent"] for n in json.load(sys.stdin)["nodes"]))'
}
before=$(copied)
( i=10; while [ ! -e "$data/drained" ]; do i=$((i + 1)); bench --seconds 5 --rate "$rate" --seed "$i"; done ) \
  > "$data/during" &
load=$!
echo "draining node $node3 ($(held) MiB)"
t0=$(date +%s.%N)
$grex cluster drain "$node3" --node http://127.0.0.1:17070 2> "$data/drain-progress"
t1=$(date +%s.%N)
after=$(copied)
touch "$data/drained"
wait "$load"
echo "while draining:"
cat "$data/during"
awk -v a="$t0" -v b="$t1" -v c="$before" -v d="$after" \
  'BEGIN { printf "drain: %.1f s, %.1f MiB of snapshots copied\n", b - a, (d - c) / 1048576 }'
