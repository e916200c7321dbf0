#!/usr/bin/env bash
# Grex against Redis with the same load generator (redis-benchmark), side by side in one run.
# Systems: Redis 7 (Debian's redis-server) without persistence and with `appendfsync always`;
# one durable Grex node; three Grex nodes with replication 3, once through node 0 (which forwards
# to each key's flock leader, as for any cluster-unaware client) and once with
# `redis-benchmark --cluster`, which reads CLUSTER NODES and sends each key to its leader (keys
# `key:{tag}:N`, the tag picking a slot of the client's node, so each client's keys fall in one
# flock). A last row spreads the same job over every flock with a cluster-aware client:
# `grex bench` (QUIC, each job sent to its bucket's leader as the canary names it) on the same
# 100k random keys, 50 clients each keeping PIPELINE jobs in flight on its connections.
# Tests, each with 50 clients, the same request count and 100k random keys:
#   counter: Grex `FCALL counter 1 key` (the wasm job) / Redis `EVAL` and `FCALL` of Lua HINCRBY;
#   HSET key f v; HGET key f.
# ROUNDS rounds, each running every test on every system in turn; the report gives medians.
# Usage: scripts/bench-redis.sh [REQUESTS] [ROUNDS] (default 50000 3). PIPELINE=N has every client
# pipeline N requests (redis-benchmark -P; default 1).
# Writes target/bench-redis/{results.csv,summary.md,plot.svg} (target/bench-redis-PN with PIPELINE). Everything listens on 127.0.0.1
# and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-50000}
rounds=${2:-3}
clients=50
keys=100000
pipeline=${PIPELINE:-1}
if ! command -v redis-server > /dev/null || ! command -v redis-benchmark > /dev/null; then
  echo "installing redis-server and redis-tools"
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools > /dev/null
fi
scripts/build-jobs.sh > /dev/null
cargo build --release --quiet -p grex --bin grex
grex=target/release/grex
out=target/bench-redis
[ "$pipeline" = 1 ] || out=$out-P$pipeline
mkdir -p "$out"
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
redis_pids=()
trap 'kill "${pids[@]}" "${redis_pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh

# Redis on the same disk as Grex's data; 16380 without persistence, 16381 fsyncing every write.
redis() {
  local port=$1; shift
  mkdir -p "$data/redis-$port"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$data/redis-$port" --save '' --daemonize no \
    --logfile "$data/redis-$port/log" "$@" &
  redis_pids+=($!)
  for _ in $(seq 1 200); do redis-cli -p "$port" PING > /dev/null 2>&1 && return; sleep 0.05; done
  echo "redis-server on $port did not start"; cat "$data/redis-$port/log"; exit 1
}
redis 16380 --appendonly no
redis 16381 --appendonly yes --appendfsync always
lua="#!lua name=grexbench
redis.register_function('counter', function(keys, args) return redis.call('HINCRBY', keys[1], 'count', 1) end)"
for port in 16380 16381; do redis-cli -p $port FUNCTION LOAD REPLACE "$lua" > /dev/null; done

# Three nodes (0-2) in one cluster, and node 5 on its own.
start_cluster 3
start 5
wait_formed 3
wait_formed 1 5
wait_balanced 3
for port in 17073 17123; do
  redis-cli -p $port -x GREX.MODULE LOAD counter < target/jobs/wasm32-unknown-unknown/wasm/counter.wasm > /dev/null
done

# bench SYSTEM PORT TEST COMMAND...: one redis-benchmark run, appended to results.csv.
bench() {
  local system=$1 port=$2 test=$3; shift 3
  local line
  line=$(redis-benchmark -p "$port" -c "$clients" -P "$pipeline" -n "$requests" -r "$keys" --csv "$@" 2> "$data/bench.err" | tail -1)
  # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
  # (the test name may hold commas; the numbers are the last seven fields)
  local rps= p50= p99=
  read -r rps p50 p99 < <(awk -F'","' '{ gsub(/"/, "", $NF); print $(NF-6), $(NF-3), $(NF-1) }' <<< "$line") || true
  [ -n "$p99" ] || { echo "redis-benchmark gave no result for $system $test: $line"; grep -v '^WARNING' "$data/bench.err" | tail -5; exit 1; }
  echo "$round,$system,$test,$rps,$p50,$p99" >> "$out/results.csv"
  printf '%-13s %-15s %9.0f/s  p50 %6.2f ms  p99 %6.2f ms\n' "$system" "$test" "$rps" "$p50" "$p99"
}
# grex_bench SYSTEM QUIC_PORT TEST: one `grex bench` run of the counter job on node 0's cluster,
# about as long as a redis-benchmark run of $requests at the previous row's rate.
grex_bench() {
  local system=$1 port=$2 test=$3 line rps p50 p99
  line=$($grex bench --node "quic://127.0.0.1:$port" --ca "$data/node-0/ca.pem" --clients "$clients" --in-flight "$pipeline" \
    --seconds "$bench_seconds" --buckets "$keys" --module counter 2> "$data/bench.err" | tail -1)
  # jobs/s 6427  p50 7.10 ms  p99 20.01 ms  (64270 jobs, 0 errors)
  read -r rps p50 p99 < <(awk '{ print $2, $4, $7 }' <<< "$line") || true
  [ -n "$p99" ] || { echo "grex bench gave no result for $system: $line"; tail -5 "$data/bench.err"; exit 1; }
  echo "$round,$system,$test,$rps,$p50,$p99" >> "$out/results.csv"
  printf '%-13s %-15s %9.0f/s  p50 %6.2f ms  p99 %6.2f ms\n' "$system" "$test" "$rps" "$p50" "$p99"
}
bench_seconds=${BENCH_SECONDS:-10}
eval_counter="return redis.call('HINCRBY', KEYS[1], 'count', 1)"
echo "round,system,test,rps,p50_ms,p99_ms" > "$out/results.csv"
echo "== $clients clients (pipelining $pipeline), $requests requests per test, $keys random keys, $rounds rounds"
for round in $(seq 1 "$rounds"); do
  echo "-- round $round"
  for target in redis-none:16380 redis-always:16381; do
    system=${target%:*} port=${target#*:}
    bench "$system" "$port" "counter EVAL" EVAL "$eval_counter" 1 key:__rand_int__
    bench "$system" "$port" "counter FCALL" FCALL counter 1 key:__rand_int__
    bench "$system" "$port" HSET HSET key:__rand_int__ f v
    bench "$system" "$port" HGET HGET key:__rand_int__ f
  done
  for target in grex-1:17123 grex-3:17073 grex-3c:17073; do
    system=${target%:*} port=${target#*:} key=key:__rand_int__ cluster=()
    [ "$system" != grex-3c ] || { key="key:{tag}:__rand_int__"; cluster=(--cluster); }
    bench "$system" "$port" "counter FCALL" "${cluster[@]}" FCALL counter 1 "$key"
    bench "$system" "$port" HSET "${cluster[@]}" HSET "$key" f v
    bench "$system" "$port" HGET "${cluster[@]}" HGET "$key" f
  done
  grex_bench grex-3r 17071 "counter FCALL"
done
PIPELINE=$pipeline python3 scripts/bench-redis-report.py "$out/results.csv" "$out/summary.md" "$out/plot.svg"
cat "$out/summary.md"
echo "(table: $out/summary.md, plot: $out/plot.svg)"
