#!/usr/bin/env bash
# First job after a restart, with the compiled module kept on disk ("cached") and without it
# ("fresh": the code directory removed, so the node compiles again). Prints milliseconds per run.
# Needs `cargo build --release -p grex` and scripts/build-jobs.sh; uses 127.0.0.1:29170-29171.
set -u
cd "$(dirname "$0")/.."
G=$PWD/target/release/grex
data=$(mktemp -d)
export GREX_NODE=http://127.0.0.1:29170
start() { $G serve --data $data --http 127.0.0.1:29170 --quic 127.0.0.1:29171 --peer 127.0.0.1:29172 >/dev/null 2>&1 & pid=$!; for i in $(seq 200); do curl -s -o /dev/null $GREX_NODE/v1/status && break; sleep 0.02; done; }
rm -rf $data; start
$G module put target/jobs/wasm32-unknown-unknown/wasm/ledger.wasm --name ledger >/dev/null
kill $pid; wait $pid
for mode in cached fresh cached fresh cached fresh cached fresh; do
  [ $mode = fresh ] && rm -rf $data/code
  start
  s=$(date +%s%N); $G job run c ledger >/dev/null; e=$(date +%s%N); echo "$mode $(( (e-s)/1000000 ))"
  kill $pid; wait $pid
done
rm -rf "$data"
