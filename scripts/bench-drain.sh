#!/usr/bin/env bash
# Draining a node that holds data, under load: four nodes (256 flocks, replication 3, every write
# fsync'd), filled through node 0's Redis port with HSETs of 1 KB values on random buckets until
# node 3's data directory holds MIB MiB (default 1024). Then `grex bench` (50 canary-following QUIC
# clients, the counter job on 100k buckets) measures the peak, and runs paced to half of it in
# windows of 5 s: before the drain, and while `grex cluster drain` of node 3 runs. Prints each
# window's throughput and p50/p99, how long the drain took, the snapshot bytes it copied, and the
# CPU the three nodes that stay used by thread, before and during the drain.
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
# CPU seconds of nodes 0 to 2 (the ones that stay) so far, by thread name (shards and workers
# folded into one name each): `name seconds` lines.
cpu_by_thread() {
  local tick; tick=$(getconf CLK_TCK)
  for pid in "${pids[0]}" "${pids[1]}" "${pids[2]}"; do
    for task in /proc/"$pid"/task/*; do
      cat "$task/stat" 2>/dev/null || true
    done
  done | sed -E 's/^[0-9]+ \(([^)]*)\) /\1 /' | awk -v tick="$tick" '{
    name = $1; sub(/-[0-9]+$/, "-N", name); sub(/tokio-runtime-w.*/, "tokio-runtime-worker", name)
    cpu[name] += ($12 + $13) / tick
  } END { for (n in cpu) printf "%s %.2f\n", n, cpu[n] }' | sort
  # And the bytes they had written to the disk so far.
  for pid in "${pids[0]}" "${pids[1]}" "${pids[2]}"; do
    awk '$1 == "write_bytes:" { print $2 }' /proc/"$pid"/io
  done | awk '{ s += $1 } END { printf "~disk-MiB-written %.2f\n", s / 1048576 }'
}
echo "paced to $rate jobs/s, windows of 5 s, before the drain:"
cpu_by_thread > "$data/cpu-0"
t_before=$(date +%s.%N)
for i in 1 2 3; do bench --seconds 5 --rate "$rate" --seed "$i"; done
t_mid=$(date +%s.%N)
cpu_by_thread > "$data/cpu-1"
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
cpu_by_thread > "$data/cpu-2"
after=$(copied)
touch "$data/drained"
wait "$load"
echo "while draining:"
cat "$data/during"
awk -v a="$t0" -v b="$t1" -v c="$before" -v d="$after" \
  'BEGIN { printf "drain: %.1f s, %.1f MiB of snapshots copied\n", b - a, (d - c) / 1048576 }'
echo "nodes 0-2, per second: CPU by thread in % of one core, and MiB written to disk (~disk...)"
echo "  (before: the three windows; during: the drain)"
join -a 1 -a 2 -e 0 -o 0,1.2,2.2 "$data/cpu-0" "$data/cpu-1" > "$data/cpu-01"
join -a 1 -a 2 -e 0 -o 0,1.2,1.3,2.2 "$data/cpu-01" "$data/cpu-2" | awk \
  -v before="$(awk -v a="$t_before" -v b="$t_mid" 'BEGIN { print b - a }')" \
  -v during="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
  '{ scale = $1 ~ /^~/ ? 1 : 100; printf "  %-22s %7.1f %7.1f\n", $1, scale * ($3 - $2) / before, scale * ($4 - $3) / during }'
