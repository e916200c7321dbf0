#!/usr/bin/env bash
# Memory and throughput of one node while its store grows: rounds of redis-benchmark `HSET` (50
# clients, pipeline 16, random keys over 10M buckets, VALUE_BYTES-byte values, default 1000), each
# round ROUND requests (default 200k), until the data directory holds GIB GiB. After each round it
# prints the store's size on disk, the node's RSS (and its peak) and that round's writes/s, so
# throughput and memory can be read against the store's size.
# Usage: scripts/bench-growth.sh GIB [grex serve arguments...], e.g. `scripts/bench-growth.sh 10`
# or `scripts/bench-growth.sh 2 --node-memory-mib 128`. GREX=path picks another binary (release
# build first: cargo build --release -p grex). Listens on 127.0.0.1 only; the data directory is
# deleted at the end (it needs GIB GiB free on the disk of TMPDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 GIB [grex serve arguments...]"; exit 2; }
gib=$1; shift
grex=${GREX:-target/release/grex}
round=${ROUND:-200000}
value=$(head -c "${VALUE_BYTES:-1000}" /dev/zero | tr '\0' v)
data=$(mktemp -d)
pids=()  # scripts/cluster-lib.sh
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
start 0 --flocks 256 "$@"
wait_formed 1
pid=${pids[0]}
kib() { awk -v k="$1" '$1 == k":" { print $2 }' /proc/"$pid"/status; }
printf '%8s %10s %9s %9s %10s\n' round "store MiB" "RSS MiB" "peak MiB" "writes/s"
printf '%8s %10d %9d %9d %10s\n' 0 $(( $(du -sk "$data/node-0" | cut -f1) / 1024 )) $(( $(kib VmRSS) / 1024 )) $(( $(kib VmHWM) / 1024 )) -
n=0
while [ $(( $(du -sk "$data/node-0" | cut -f1) >> 20 )) -lt "$gib" ]; do
  n=$((n + 1))
  rate=$(redis-benchmark -p 17073 -c 50 -P 16 -n "$round" -r 10000000 --csv \
    HSET "bucket:__rand_int__" "item:__rand_int__" "$value" 2>/dev/null | tail -1 | cut -d, -f2 | tr -d '"')
  kill -0 "$pid" 2>/dev/null || { echo "the node stopped:"; tail -20 "$data/err-0"; exit 1; }
  printf '%8d %10d %9d %9d %10.0f\n' "$n" $(( $(du -sk "$data/node-0" | cut -f1) / 1024 )) \
    $(( $(kib VmRSS) / 1024 )) $(( $(kib VmHWM) / 1024 )) "$rate"
done
