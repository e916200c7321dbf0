#!/usr/bin/env bash
# Several grex binaries side by side under the same load, interleaved per round (the machine's
# speed drifts, so only ratios within one run mean much): for each round and each binary, one
# fresh node and then a fresh 3-node cluster (replication 3, leadership spread), each driven by redis-benchmark with
# 50 clients and 100k random keys running `FCALL counter`. Prints medians per binary. FLOCKS sets
# the flock count (default 256); NODES="3" runs only the clusters (default "1 3"); COMMAND sets
# the command (default "FCALL counter 1 key:__rand_int__"; e.g. "PING", "HSET key:__rand_int__ f v").
# Usage: scripts/bench-compare.sh REQUESTS ROUNDS NAME=BINARY... (build the binaries first, e.g.
# from two checkouts; the jobs come from scripts/build-jobs.sh).
# Writes target/bench-compare/results.csv. Everything listens on 127.0.0.1 and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 REQUESTS ROUNDS NAME=BINARY..."; exit 2; }
requests=$1 rounds=$2
shift 2
command -v redis-benchmark > /dev/null || { echo "redis-benchmark is missing: apt-get install redis-tools"; exit 1; }
scripts/build-jobs.sh > /dev/null
out=target/bench-compare
mkdir -p "$out"
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh

stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  pids=()
  rm -rf "${data:?}"/*
}

# run NAME NODES: one redis-benchmark run against node 0, appended to results.csv.
run() {
  local name=$1 nodes=$2 line rps p50 p99
  # shellcheck disable=SC2086 # the command's words
  line=$(redis-benchmark -p 17073 -c 50 -n "$requests" -r 100000 --csv ${COMMAND:-FCALL counter 1 key:__rand_int__} 2>/dev/null | tail -1)
  read -r rps p50 p99 < <(awk -F'","' '{ gsub(/"/, "", $NF); print $(NF-6), $(NF-3), $(NF-1) }' <<< "$line")
  [ -n "$p99" ] || { echo "redis-benchmark gave no result for $name: $line"; exit 1; }
  echo "$round,$name,$nodes,$rps,$p50,$p99" >> "$out/results.csv"
  printf '%-12s %d node(s) %9.0f/s  p50 %6.2f ms  p99 %6.2f ms\n' "$name" "$nodes" "$rps" "$p50" "$p99"
}

echo "round,binary,nodes,rps,p50_ms,p99_ms" > "$out/results.csv"
for round in $(seq 1 "$rounds"); do
  echo "-- round $round"
  for spec in "$@"; do
    name=${spec%%=*} grex=${spec#*=}
    for nodes in ${NODES:-1 3}; do
      start_for_load "$nodes"
      run "$name" "$nodes"
      stop_all
    done
  done
done
python3 - "$out/results.csv" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
keys = sorted({(r["nodes"], r["binary"]) for r in rows}, key=lambda k: (k[0], [r["binary"] for r in rows].index(k[1])))
print("| nodes | binary | requests/s (median) | p50 ms | p99 ms | runs |")
print("|---|---|---|---|---|---|")
for nodes, binary in keys:
    rs = [r for r in rows if r["nodes"] == nodes and r["binary"] == binary]
    med = lambda f: statistics.median(float(r[f]) for r in rs)
    print(f"| {nodes} | {binary} | {med('rps'):,.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} | {len(rs)} |")
EOF
