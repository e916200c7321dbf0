#!/usr/bin/env bash
# What copying one large flock costs in memory: one node (256 flocks, replication 3) is filled
# through its Redis port with HSETs of 200 fields of 70 bytes whose keys share one hash tag, so
# that a single flock holds MIB MiB of values (default 256); then two nodes join, and each is sent
# a snapshot of every flock, that one among them. Prints how long it took until both stored every
# bucket, and each node's peak RSS (VmHWM) before the joins and after (node 0 sends, nodes 1 and 2
# receive) with the buckets it stores.
# Usage: scripts/bench-snapshot.sh [MIB] (release build first: cargo build --release -p grex).
# GREX=path picks another binary. Listens on 127.0.0.1 only; needs about 4 × MIB MiB free in TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
grex=${GREX:-target/release/grex}
value=$(head -c 70 /dev/zero | tr '\0' v)
args=()
for f in $(seq 1 200); do args+=("f$f" "$value"); done
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
peak() { awk '$1 == "VmHWM:" { printf "%d", $2 / 1024 }' /proc/"${pids[$1]}"/status; }
$grex init --data "$data/node-0" --flocks 256 --replication 3 > /dev/null
start 0
wait_formed 1
# Rounds of 4,500 HSETs (about 15 KB each) until the flock stores MIB MiB of values (the node
# refuses some as overloaded: what it stores is what counts).
stored() { redis-cli -p $((17073 + 10 * $1)) INFO keyspace | grep -o 'keys=[0-9]*' | cut -d= -f2 || echo 0; }
while [ $(( $(stored 0) * 200 * 70 >> 20 )) -lt "$mib" ]; do
  redis-benchmark -p 17073 -c 20 -P 4 -n 4500 -r 100000000 -q HSET "bucket:{one}:__rand_int__" "${args[@]}" > /dev/null 2>&1
done
want=$(stored 0)
echo "filled one flock with $want buckets of 200 records ($(( want * 200 * 70 >> 20 )) MiB of values); node 0 peak RSS $(peak 0) MiB"
started=$(date +%s.%N)
for i in 1 2; do
  $grex cluster credentials --data "$data/node-0" --out "$data/node-$i.creds" > /dev/null
  start "$i" --credentials "$data/node-$i.creds" --join 127.0.0.1:17072
done
wait_formed 3
# The map names a new herder before its copy has arrived: wait for the buckets themselves.
for t in $(seq 1 3000); do [ "$(stored 1)" = "$want" ] && [ "$(stored 2)" = "$want" ] && break; sleep 0.1; done
[ "$t" -lt 3000 ] || echo "the new nodes did not hold every bucket within 300 s"
awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "two nodes joined and hold every bucket in %.1f s\n", e - s }'
for i in 0 1 2; do echo "node $i: peak RSS $(peak "$i") MiB, $(stored "$i") buckets stored"; done
