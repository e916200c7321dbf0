#!/usr/bin/env bash
# Where a job's CPU goes, by layer: µs of node CPU per job for the front end, routing, sandbox,
# consensus, log write, fsync, apply, network and wake-ups, per node and cluster-wide.
# Two runs of redis-benchmark (50 clients, 100k random keys, `FCALL counter` unless CMD is set) on
# the same nodes: the first, without perf, gives each node's CPU per job (threads' utime + stime
# from /proc, as scripts/cpu-per-job.sh); the second, under perf (call graphs from the release
# build's debug info), gives each layer's share of a node's samples. Each sample goes to one
# layer: an fsync anywhere in its stack, else the layer of the innermost frame that names one
# (rules below), else "other". NODES is 1 (256 flocks) or 3 (replication 3, leadership spread;
# redis-benchmark talks to node 0, which forwards). Needs perf (Debian: linux-perf).
# Usage: scripts/layers.sh NODES REQUESTS (release build and jobs first). GREX=path picks another
# binary; CLIENT=grex loads the nodes with `grex bench` for REQUESTS seconds instead (below).
# Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 NODES REQUESTS"; exit 2; }
nodes=$1 requests=$2
for tool in perf redis-benchmark; do
  command -v $tool > /dev/null || { echo "$tool is missing (see the usage at the top of $0)"; exit 1; }
done
grex=${GREX:-target/release/grex}
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
start_for_redis_load "$nodes"

# One line per node: index, CPU ticks of all its threads so far.
ticks() {
  local i
  for i in "${!pids[@]}"; do
    echo "$i $(cat /proc/"${pids[$i]}"/task/*/stat 2>/dev/null | awk '{ s += $14 + $15 } END { print s }')"
  done
}
# CLIENT=grex: the load is `grex bench` instead (50 canary-following QUIC clients, each job sent
# to its bucket's leader; PIPELINE jobs in flight each), for REQUESTS seconds per run.
if [ "${CLIENT:-redis}" = grex ]; then
  export GREX_NODE=quic://127.0.0.1:17071 GREX_CA=$data/node-0/ca.pem
  bench() {
    $grex bench --clients 50 --in-flight "${PIPELINE:-1}" --buckets 100000 --warm-up 0 --seconds "$requests" | tail -1
  }
  bench > /dev/null  # every node compiles the module and the clients find the leaders
fi
ticks > "$data/before"
start_ns=$(date +%s%N)
bench -n "$requests" > "$data/line"
end_ns=$(date +%s%N)
ticks > "$data/after"
if [ "${CLIENT:-redis}" = grex ]; then
  jobs=$(sed -nE 's/.*\(([0-9]+) jobs.*/\1/p' "$data/line")
  [ -n "$jobs" ] || { echo "grex bench gave no result: $(cat "$data/line")"; exit 1; }
else
  jobs=$requests
fi

# The profiled run, one perf per node so each sample's node is known.
perfs=()
for i in "${!pids[@]}"; do
  perf record -F 499 --call-graph dwarf,16384 -o "$data/perf-$i.data" -p "${pids[$i]}" \
    > /dev/null 2> "$data/record-$i.err" &
  perfs+=($!)
done
sleep 1
bench -n "$requests" > /dev/null
kill -INT "${perfs[@]}" 2> /dev/null || true
wait "${perfs[@]}" 2>/dev/null || true
for i in "${!pids[@]}"; do
  [ -s "$data/perf-$i.data" ] || { echo "perf recorded nothing for node $i:"; cat "$data/record-$i.err"; exit 1; }
  perf script -F comm,ip,sym -i "$data/perf-$i.data" > "$data/script-$i" 2> "$data/perf-$i.err" \
    || { echo "perf could not read node $i's samples:"; tail -n 3 "$data/perf-$i.err" "$data/record-$i.err"; exit 1; }
done

echo "$(cat "$data/line")"
python3 - "$data" "$jobs" "$start_ns" "$end_ns" "$(getconf CLK_TCK)" "${#pids[@]}" <<'EOF'
import collections, re, sys
data, jobs, start, end, hz, nodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
# Innermost frame first: the first rule a frame matches names the sample's layer. Thread kinds
# refine two of them (redb in an executor is a bucket load; in the committer, a state write).
rules = [
    ("sandbox (wasmtime, host calls)", r"wasmtime|grex::wasm::"),
    ("bucket load (redb reads)", r"load_bucket"),
    ("network (QUIC, TLS, UDP)", r"quinn|rustls|ring_core|\bring::|udp_|sendmsg|recvmsg|recvmmsg|ip_output|net_rx"),
    ("front end (RESP, HTTP, client QUIC)", r"grex::api::|tcp_|grex_client::"),
    ("log write", r"segment_log"),
    ("state write (apply, checkpoint)", r"redb::|grex::node::commit|grex::storage::"),
    ("consensus (raft-rs, engine, driver)", r"\braft::|openraft|grex::cluster::engine|grex::cluster::consensus|grex::cluster::wire"),
    ("routing and forwarding", r"grex::cluster::|grex::node::"),
    ("wake-ups and parking", r"futex|\bschedule\b|__schedule|finish_task_switch|epoll|tokio::runtime|tokio::sync|std::sync::mpmc|park"),
]
compiled = [(name, re.compile(pattern)) for name, pattern in rules]
fsync = re.compile(r"fdatasync|fsync")
def layer(thread, frames):
    if any(fsync.search(f) for f in frames):
        return "fsync"
    for frame in reversed(frames):
        for name, pattern in compiled:
            if pattern.search(frame):
                if name.startswith("state write") and thread.startswith("grex-shard"):
                    return "bucket load (redb reads)"
                return name
    return "other (allocator, copies, unattributed)"
def ticks(path):
    return {int(a): int(b) for a, b in (line.split() for line in open(path))}
before, after = ticks(f"{data}/before"), ticks(f"{data}/after")
us_per_job = {n: (after[n] - before[n]) / hz / jobs * 1e6 for n in range(nodes)}
table = collections.defaultdict(dict)
for n in range(nodes):
    weights, total = collections.Counter(), 0
    # `perf script -F comm,ip,sym`: a line with the thread's name, its frames innermost first, a blank line.
    for sample in open(f"{data}/script-{n}").read().split("\n\n"):
        lines = [line.strip() for line in sample.strip().splitlines()]
        if not lines:
            continue
        frames = [line.split(" ", 1)[-1] for line in lines[1:]]
        weights[layer(lines[0], frames[::-1])] += 1
        total += 1
    for name, weight in weights.items():
        table[name][n] = us_per_job[n] * weight / max(total, 1)
order = [name for name, _ in rules] + ["fsync", "other (allocator, copies, unattributed)"]
order = sorted(table, key=lambda name: -sum(table[name].values()))
print("| layer | " + " | ".join(f"node {n}" for n in range(nodes)) + " | all nodes |")
print("|---|" + "---:|" * (nodes + 1))
for name in order:
    cells = [table[name].get(n, 0) for n in range(nodes)]
    print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")
cells = [us_per_job[n] for n in range(nodes)]
print("| **all** | " + " | ".join(f"{c:.0f}" for c in cells) + f" | **{sum(cells):.0f}** |")
print(f"µs of node CPU per job; {jobs / ((end - start) / 1e9):,.0f} jobs/s in the unprofiled run")
EOF
