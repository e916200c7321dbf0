#!/usr/bin/env bash
# Scan throughput: a cluster of NODES (replication 3, 256 flocks) holding BUCKETS buckets of the
# counter job, scanned ROUNDS times with `grex job scan counter --input 0` through node 0 (every
# result streamed to the client, and again folded by the `sum` reduce module). Prints buckets/s per
# run and the median; also checks that every scan covered every bucket and that the sum is right.
# Usage: scripts/bench-scan.sh NODES BUCKETS ROUNDS (release build and jobs first: cargo build
# --release -p grex; scripts/build-jobs.sh). GREX=path picks another binary. Listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 NODES BUCKETS ROUNDS"; exit 2; }
nodes=$1 buckets=$2 rounds=$3
grex=${GREX:-target/release/grex}
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
start_for_load "$nodes"
redis-cli -p 17073 -x GREX.MODULE LOAD sum < target/jobs/wasm32-unknown-unknown/wasm/sum.wasm > /dev/null

# Every bucket `scan-N` once, with count 1 (redis-benchmark's `-r` draws keys at random, so the
# keys are written from a list instead, 64 clients through the Redis port).
seq 0 $((buckets - 1)) | sed 's/^/FCALL counter 1 scan-/; s/$/ 1/' > "$data/fill"
split -n l/8 "$data/fill" "$data/fill-"
fillers=()
for part in "$data"/fill-*; do redis-cli -p 17073 < "$part" > /dev/null & fillers+=($!); done
wait "${fillers[@]}"
echo "filled $buckets buckets on $nodes nodes"

run() {  # run LABEL ARGS...: one scan, prints buckets/s
  local start end out
  start=$(date +%s%N)
  out=$($grex job scan counter --input 0 --node http://127.0.0.1:17070 "$@" 2> "$data/progress")
  end=$(date +%s%N)
  local summary
  summary=$(tail -1 "$data/progress")
  grep -q "$buckets buckets, 0 failed" <<< "$summary" || { echo "incomplete scan: $summary"; exit 1; }
  if [ "${1:-}" = --reduce ]; then
    [ "$out" = "$buckets" ] || { echo "the sum is $out, not $buckets"; exit 1; }
  else
    [ "$(wc -l <<< "$out")" = "$buckets" ] || { echo "$(wc -l <<< "$out") results, not $buckets"; exit 1; }
  fi
  python3 -c "print(round($buckets / (($end - $start) / 1e9)))"
}
for label in streamed reduced; do
  results=()
  for _ in $(seq 1 "$rounds"); do
    if [ $label = reduced ]; then results+=("$(run --reduce sum)"); else results+=("$(run)"); fi
  done
  median=$(printf '%s\n' "${results[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  echo "$label: buckets/s ${results[*]} (median $median)"
done
