#!/usr/bin/env bash
# Where a job's CPU goes: CPU time per job of every thread of every Grex node, and of the load
# generator, under redis-benchmark (50 clients, each with PIPELINE requests in flight (default 1),
# 100k random keys, `FCALL counter` unless CMD is set), and how often each thread slept and was
# woken per job (voluntary context switches: a thread hand-off or a wait for the disk or network).
# Reads utime+stime and the switches of each thread from /proc before and after one run, after a
# warm-up run (the first job on a node compiles the module). NODES is 1 (256 flocks) or 3 (replication 3,
# leadership spread; redis-benchmark talks to node 0, which forwards to each key's leader).
# Also prints the UDP datagrams per job over loopback (QUIC between the nodes, and from the
# client with CLIENT=grex: `grex bench`, 50 canary-following QUIC clients with PIPELINE jobs in
# flight each, for REQUESTS seconds instead of REQUESTS requests).
# Usage: scripts/cpu-per-job.sh NODES REQUESTS (release build and jobs first: cargo build --release
# -p grex; scripts/build-jobs.sh). GREX=path picks another binary. Listens on 127.0.0.1 only.
set -Eeuo pipefail
trap 'echo "$0: line $LINENO failed: $BASH_COMMAND" >&2; tail -3 "${data:-/nonexistent}/bench-err" >&2 2>/dev/null' ERR
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 NODES REQUESTS"; exit 2; }
nodes=$1 requests=$2
grex=${GREX:-target/release/grex}
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
start_for_redis_load "$nodes"

# One line per thread: node index, thread name, CPU ticks and voluntary context switches so far.
ticks() {
  local i t
  for i in "${!pids[@]}"; do
    for t in /proc/"${pids[$i]}"/task/*; do
      # A thread may end between the listing and the read (blocking-pool threads come and go).
      local name stat switches
      { name=$(tr ' ' _ < "$t/comm") && stat=$(awk '{ print $14 + $15 }' "$t/stat") \
        && switches=$(awk '$1 == "voluntary_ctxt_switches:" { print $2 }' "$t/status") \
        && echo "$i $name $stat $switches"; } 2>/dev/null || true
    done
  done
}
# UDP datagrams received on this host so far (every one is a loopback QUIC packet here).
datagrams() { awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print $2 }' /proc/net/snmp; }
if [ "${CLIENT:-redis}" = grex ]; then
  export GREX_NODE=quic://127.0.0.1:17071 GREX_CA=$data/node-0/ca.pem
  load() {
    /usr/bin/time -f "%U %S" -o "$data/bench-cpu" \
      $grex bench --clients 50 --in-flight "${PIPELINE:-1}" --buckets 100000 --warm-up 0 --seconds "$1" | tail -1
  }
  load 3 > /dev/null  # every node compiles the module and the clients find the leaders
  client=grex-bench
else
  load() {
    /usr/bin/time -f "%U %S" -o "$data/bench-cpu" redis-benchmark "${bench_cluster[@]}" -p 17073 -c 50 \
      -P "${PIPELINE:-1}" -n "$1" -r 100000 --csv "${cmd[@]}" 2>"$data/bench-err" | tail -1
  }
  client=redis-benchmark
fi
ticks > "$data/before"
datagrams_before=$(datagrams)
errors_before=$(resp_errors)
start_ns=$(date +%s%N)
line=$(load "$requests")
end_ns=$(date +%s%N)
datagrams_after=$(datagrams)
ticks > "$data/after"
echo "$line"
if [ "$client" = grex-bench ]; then
  jobs=$(echo "$line" | sed -nE 's/.*\(([0-9]+) jobs.*/\1/p')
  [ -n "$jobs" ] || { echo "grex bench gave no result: $line"; exit 1; }
else
  report_errors "$errors_before" "$requests"
  jobs=$requests
fi
python3 - "$data/before" "$data/after" "$data/bench-cpu" "$jobs" "$start_ns" "$end_ns" "$(getconf CLK_TCK)" \
  "$client" "$((datagrams_after - datagrams_before))" <<'EOF'
import collections, sys
before, after, bench_cpu, jobs, start, end, hz, client, datagrams = sys.argv[1:]
jobs, seconds, hz = int(jobs), (int(end) - int(start)) / 1e9, int(hz)
datagrams = int(datagrams)
used, woken = collections.Counter(), collections.Counter()
for path, sign in ((before, -1), (after, 1)):
    for line in open(path):
        node, thread, value, switches = line.split()
        used[(int(node), thread)] += sign * int(value)
        woken[(int(node), thread)] += sign * int(switches)
us = lambda ticks: ticks / hz / jobs * 1e6
total = 0
for node in sorted({n for n, _ in used}):
    threads = sorted(((t, v) for (n, t), v in used.items() if n == node and v > 0), key=lambda x: -x[1])
    node_ticks = sum(v for _, v in threads)
    total += node_ticks / hz
    print(f"node {node}: {us(node_ticks):4.0f} us/job  " + "  ".join(f"{t} {us(v):.0f}" for t, v in threads))
    wakes = sorted(((t, v) for (n, t), v in woken.items() if n == node and v > 0), key=lambda x: -x[1])
    print(f"        {sum(v for _, v in wakes) / jobs:4.2f} wake-ups/job  " + "  ".join(f"{t} {v / jobs:.2f}" for t, v in wakes))
bench = sum(map(float, open(bench_cpu).read().split()))
print(f"{client}: {bench / jobs * 1e6:.0f} us/job; {jobs / seconds:,.0f} jobs/s; "
      f"{(total + bench) / seconds:.2f} cores busy over {seconds:.1f} s; {datagrams / jobs:.2f} UDP datagrams/job")
EOF
