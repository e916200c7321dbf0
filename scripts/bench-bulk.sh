#!/usr/bin/env bash
# Bulk writes: redis-benchmark `HSET bucket:<random> f1 v f2 v ... fN v` (FIELDS fields of
# VALUE_BYTES-byte values each, default 100 × 70: the original design's 70-byte records), 50
# clients, REQUESTS commands through node 0, after a warm-up. Prints records/s (commands/s ×
# FIELDS), each node's RSS and peak RSS afterwards, and the bytes it read and wrote per command.
# CLUSTER=1: `redis-benchmark --cluster`, which sends each key to its flock's leader (its keys
# share a hash tag per node: one flock per node).
# PIPELINE=N: each client keeps N commands in flight (default 1).
# Usage: scripts/bench-bulk.sh NODES REQUESTS [grex serve arguments for every node...]
# NODES is 1 or 3 (replication 3). GREX=path picks another binary (release build first: cargo
# build --release -p grex; scripts/build-jobs.sh). Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 NODES REQUESTS [grex serve arguments...]"; exit 2; }
nodes=$1 requests=$2; shift 2
grex=${GREX:-target/release/grex}
fields=${FIELDS:-100}
value=$(head -c "${VALUE_BYTES:-70}" /dev/zero | tr '\0' v)
args=()
for f in $(seq 1 "$fields"); do args+=("f$f" "$value"); done
data=$(mktemp -d)
pids=()  # scripts/cluster-lib.sh
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
if [ "$nodes" = 1 ]; then
  start 0 --flocks 256 "$@"
else
  $grex init --data "$data/node-0" --flocks 256 --replication 3 > /dev/null
  start 0 "$@"
  for i in $(seq 1 $((nodes - 1))); do
    $grex cluster credentials --data "$data/node-0" --out "$data/node-$i.creds" > /dev/null
    start "$i" --credentials "$data/node-$i.creds" --join 127.0.0.1:17072 "$@"
  done
fi
wait_formed "$nodes"
[ "$nodes" = 1 ] || wait_balanced "$nodes"
bench_cluster=() key="bucket:__rand_int__"
[ "${CLUSTER:-0}" != 1 ] || bench_cluster=(--cluster) key="bucket:{tag}:__rand_int__"
bench() { redis-benchmark "${bench_cluster[@]}" -p 17073 -c 50 -P "${PIPELINE:-1}" -r 1000000 --csv "$@" HSET "$key" "${args[@]}" 2>/dev/null | tail -1; }
bench -n 2000 > /dev/null
# Bytes each node read and wrote through read/write system calls so far (its files, mostly: QUIC
# uses sendmsg and recvmsg, which these do not count).
io() { for i in "${!pids[@]}"; do awk '$1 == "rchar:" { r = $2 } $1 == "wchar:" { w = $2 } END { print r, w }' /proc/"${pids[$i]}"/io; done; }
mapfile -t io_before < <(io)
errors_before=$(resp_errors)
rate=$(bench -n "$requests" | cut -d, -f2 | tr -d '"')
mapfile -t io_after < <(io)
awk -v r="$rate" -v f="$fields" 'BEGIN { printf "%.0f HSET/s × %d fields = %.0f records/s\n", r, f, r * f }'
report_errors "$errors_before" "$requests"
for i in "${!pids[@]}"; do
  read -r read_before wrote_before <<< "${io_before[$i]}"
  read -r read_after wrote_after <<< "${io_after[$i]}"
  awk -v i="$i" -v n="$requests" -v r=$((read_after - read_before)) -v w=$((wrote_after - wrote_before)) \
    '$1 == "VmRSS:" { rss = $2 } $1 == "VmHWM:" { hwm = $2 }
    END { printf "node %d: RSS %d MiB, peak %d MiB; per HSET read %.1f KB, wrote %.1f KB\n", i, rss / 1024, hwm / 1024, r / n / 1000, w / n / 1000 }' \
    /proc/"${pids[$i]}"/status
done
