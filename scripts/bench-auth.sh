#!/usr/bin/env bash
# What checking users costs: one durable node over QUIC, 50 clients run `counter` on random buckets
# (grex bench), alternately as an anonymous loopback client of a cluster without users and signed
# in with a token once a user exists (the user is deleted again between rounds), ROUNDS times.
# Usage: scripts/bench-auth.sh [ROUNDS] (default 3). Everything listens on 127.0.0.1 and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
scripts/build-jobs.sh > /dev/null
cargo build --release -p grex --bin grex --quiet
grex=target/release/grex
data=$(mktemp -d)
trap 'kill $node_pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
$grex serve --data "$data/node" --http 127.0.0.1:0 --quic 127.0.0.1:0 --peer 127.0.0.1:0 > "$data/out" 2> "$data/err" &
node_pid=$!
for _ in $(seq 1 200); do grep -q listening "$data/out" 2>/dev/null && break; sleep 0.05; done
line=$(head -1 "$data/out")
export GREX_NODE=$(sed -n 's/.*quic=\([^ ]*\).*/\1/p' <<< "$line") GREX_CA=$(sed -n 's/.*ca=\([^ ]*\).*/\1/p' <<< "$line")
$grex module put target/jobs/wasm32-unknown-unknown/wasm/counter.wasm --name counter > /dev/null
bench() { $grex bench --clients 50 --seconds 8 --buckets 100000 --seed "$1" | tail -1; }
echo "== one node, durable, 50 clients over QUIC, counter on 100k random buckets, 8 s a run"
for i in $(seq 1 "$rounds"); do
  echo "no users (anonymous, loopback): $(bench "$i")"
  token=$($grex user add bench --run counter --admin 2> /dev/null)
  echo "signed in with a token:         $(GREX_TOKEN=$token bench "$i")"
  GREX_TOKEN=$token $grex user rm bench > /dev/null
done
