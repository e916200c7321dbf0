#!/usr/bin/env bash
# What a job costs by language, side by side in one run: the Rust `counter` (jobs/) and the same
# job in JavaScript and in Python (the `grex new --lang js|python` templates, built with
# componentize-js and componentize-py), on one durable node (release build), driven by `grex bench`
# over QUIC: CLIENTS clients on 100k random buckets for SECONDS each, ROUNDS rounds taking the
# three in turn. Prints jobs/s and latency per run and the node's CPU per job. Usage:
# scripts/bench-languages.sh [SECONDS] [ROUNDS] (default 10 3). Needs Node.js 20 and Python 3.10
# with venv (the build tools go into scratch projects). Listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
rounds=${2:-3}
clients=${CLIENTS:-16}
scripts/build-jobs.sh > /dev/null
cargo build --release --quiet -p grex --bin grex
grex=$PWD/target/release/grex
data=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh
FLOCKS=64
start 0 --flocks $FLOCKS --compile-timeout-secs 600
wait_formed 1
node=http://127.0.0.1:17070
$grex module put target/jobs/wasm32-unknown-unknown/wasm/counter.wasm --name counter --node $node > /dev/null
$grex new counter-js --lang js --dir "$data/counter-js" > /dev/null
$grex module put "$data/counter-js" --node $node > /dev/null 2> "$data/js-build.log" || { cat "$data/js-build.log"; exit 1; }
$grex new counter-py --lang python --dir "$data/counter-py" > /dev/null
$grex module put "$data/counter-py" --node $node > /dev/null 2> "$data/py-build.log" || { cat "$data/py-build.log"; exit 1; }
echo "component sizes: counter $(stat -c %s target/jobs/wasm32-unknown-unknown/wasm/counter.wasm) B," \
  "counter-js $(stat -c %s "$data/counter-js/counter-js.wasm") B," \
  "counter-py $(stat -c %s "$data/counter-py/counter-py.wasm") B"
# All compiled and warm before the runs.
for module in counter counter-js counter-py; do $grex job run warm $module --node $node > /dev/null; done
cpu() { awk '{ print $14 + $15 }' "/proc/${pids[0]}/stat"; }  # node CPU in clock ticks
tick=$(getconf CLK_TCK)
for round in $(seq 1 "$rounds"); do
  for module in counter counter-js counter-py; do
    before=$(cpu)
    line=$($grex bench --node "quic://127.0.0.1:17071" --ca "$data/node-0/ca.pem" --clients "$clients" \
      --seconds "$seconds" --module "$module" --buckets 100000 2> /dev/null | tail -1)
    after=$(cpu)
    # The run's jobs, and the one-second warm-up's at the same rate: the CPU covers both.
    jobs=$(awk -v s="$seconds" '{ print $2 * (s + 1) }' <<< "$line")
    per_job=$(awk -v t=$((after - before)) -v hz="$tick" -v n="$jobs" 'BEGIN { printf "%.0f", t / hz / n * 1e6 }')
    printf 'round %d  %-11s %s  node CPU %s µs/job\n' "$round" "$module" "$line" "$per_job"
  done
done
# In-process, the sandbox alone (instantiate, run, change set), one job at a time, without the node.
echo "in-process (cargo bench -p grex --bench job):"
GREX_BENCH_MODULES="counter-js=$data/counter-js/counter-js.wasm,counter-py=$data/counter-py/counter-py.wasm" \
  cargo bench --quiet -p grex --bench job 2> /dev/null | grep sandbox
