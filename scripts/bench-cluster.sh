#!/usr/bin/env bash
# Cluster benchmarks, figures for docs/benchmarks.md. Three `grex serve` processes on loopback, one
# cluster of 256 flocks, replication 3, every write fsync'd:
#  1. idle CPU of each node over 30 s, once the cluster has formed (target: <= 1% of a core);
#  2. durable throughput: 50 clients run `counter` on 100k random buckets (grex bench; each client
#     follows canaries to the flock's leader), RUNS runs of 10 s, with p50/p99 latency;
#  3. failover: SIGKILL the leader of a bucket's flock while jobs on it run back to back through
#     another node; time from the kill to the next acknowledged job. RUNS rounds, the killed node
#     restarted between rounds.
# Usage: scripts/bench-cluster.sh [RUNS] (default 3). Everything listens on 127.0.0.1 and stops at
# the end.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
scripts/build-jobs.sh > /dev/null
cargo build --release --quiet -p grex --bin grex -p grex-examples --bin failover
grex=target/release/grex
data=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT

source scripts/cluster-lib.sh
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start_cluster 3
wait_formed 3
export GREX_NODE=quic://127.0.0.1:17071 GREX_CA=$data/node-0/ca.pem
$grex module put target/jobs/wasm32-unknown-unknown/wasm/counter.wasm --name counter > /dev/null

echo "== idle CPU, 3 nodes, 256 flocks, 30 s (after 5 s to settle)"
sleep 5
hz=$(getconf CLK_TCK)
declare -a before
for i in 0 1 2; do before[$i]=$(cpu_ticks "${pids[$i]}"); done
sleep 30
for i in 0 1 2; do
  ticks=$(( $(cpu_ticks "${pids[$i]}") - before[i] ))
  awk -v t="$ticks" -v hz="$hz" -v i="$i" 'BEGIN { printf "node %d: %.2f%% of a core\n", i, 100 * t / hz / 30 }'
done

echo "== 3 nodes, RF=3, durable, 50 clients over QUIC, counter on 100k random buckets ($runs runs of 10 s)"
for i in $(seq 1 "$runs"); do
  $grex bench --clients 50 --seconds 10 --buckets 100000 --seed "$i" | tail -1
done

echo "== failover: SIGKILL the bucket's flock leader, time to the next acknowledged job ($runs rounds)"
for round in $(seq 1 "$runs"); do
  out=$(target/release/failover "failover-$round" \
    "http://127.0.0.1:17070=${pids[0]}" "http://127.0.0.1:17080=${pids[1]}" "http://127.0.0.1:17090=${pids[2]}")
  grep failover_ms <<< "$out"
  port=$(sed -n 's/^killed http:\/\/127.0.0.1:\([0-9]*\)$/\1/p' <<< "$out")
  killed=$(( (port - 17070) / 10 ))
  wait "${pids[$killed]}" 2>/dev/null || true
  start "$killed"
  wait_formed 3
done
