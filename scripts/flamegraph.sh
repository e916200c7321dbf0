#!/usr/bin/env bash
# A flame graph of Grex nodes under redis-benchmark (50 clients, 100k random keys, `FCALL counter`
# unless CMD is set): perf samples every node's threads (call graphs from DWARF debug info, which
# the release profile keeps) for SECONDS while the load runs, then inferno draws them. The root
# frames are the thread names: grex (the async runtime: RESP, QUIC, the consensus engine),
# grex-commit (the committer: log appends, applies, fsyncs), grex-shard-N (job executors). NODES is
# 1 (256 flocks) or 3 (replication 3, leadership spread; redis-benchmark talks to node 0, which
# forwards).
# Usage: scripts/flamegraph.sh NODES SECONDS [OUT.svg] (default target/flamegraph/grex-NODES.svg).
# Needs perf (Debian: linux-perf) and inferno (cargo install inferno), a release build (cargo
# build --release -p grex) and the jobs (scripts/build-jobs.sh). Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 NODES SECONDS [OUT.svg]"; exit 2; }
nodes=$1 seconds=$2
out=${3:-target/flamegraph/grex-$nodes.svg}
for tool in perf inferno-collapse-perf inferno-flamegraph redis-benchmark; do
  command -v $tool > /dev/null || { echo "$tool is missing (see the usage at the top of $0)"; exit 1; }
done
grex=${GREX:-target/release/grex}
read -r -a cmd <<< "${CMD:-FCALL counter 1 key:__rand_int__}"
mkdir -p "$(dirname "$out")"
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
load=
trap 'kill $load "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
start_for_load "$nodes"
redis-benchmark -p 17073 -c 50 -n 3000 -r 100000 "${cmd[@]}" > /dev/null 2>&1  # compiles the module everywhere

redis-benchmark -p 17073 -c 50 -n 100000000 -r 100000 "${cmd[@]}" > /dev/null 2>&1 &
load=$!
sleep 1
perf record -F 249 --call-graph dwarf,16384 -o "$data/perf.data" \
  -p "$(IFS=,; echo "${pids[*]}")" -- sleep "$seconds" 2> "$data/perf.err" > /dev/null \
  || { cat "$data/perf.err"; exit 1; }
kill $load
perf script -i "$data/perf.data" 2> /dev/null | inferno-collapse-perf > "$data/folded"
inferno-flamegraph --title "Grex, $nodes node(s): ${cmd[*]} from redis-benchmark, 50 clients" \
  --minwidth 0.2 < "$data/folded" > "$out"
echo "$out"
# Per thread: its share of all samples, and the share of its own samples whose stack passes
# through each part (the parts overlap: consensus calls into storage, for one).
python3 - "$data/folded" <<'EOF'
import collections, re, sys
parts = [("consensus (raft-rs, engine)", r"\braft::|grex::cluster::engine|grex::cluster::consensus"),
         ("log (segment files)", r"grex::cluster::engine::log"), ("QUIC/TLS (quinn, rustls)", r"quinn|rustls|aws_lc|\bring::"),
         ("RESP", r"grex::api::resp"), ("storage (redb)", r"redb::"), ("fsync", r"fdatasync|fsync"),
         ("sandbox (wasmtime)", r"wasmtime"), ("UDP/TCP syscalls", r"sendmsg|recvmsg|sendto|recvfrom|tcp_|udp_"),
         ("scheduler/futex", r"futex|schedule\b|__schedule")]
threads, by_part, total = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, weight = line.rpartition(" ")
    weight = int(weight)
    thread = re.sub(r"-\d+$", "-N", stack.split(";", 1)[0])
    threads[thread] += weight
    total += weight
    for name, pattern in parts:
        if re.search(pattern, stack):
            by_part[(thread, name)] += weight
for thread, weight in threads.most_common():
    if weight / total < 0.005:
        continue
    shares = [(by_part[(thread, n)] / weight, n) for n, _ in parts if by_part[(thread, n)] / weight >= 0.02]
    print(f"{100 * weight / total:5.1f}% {thread}: " + ", ".join(f"{n} {100 * s:.0f}%" for s, n in sorted(shares, reverse=True)))
EOF
