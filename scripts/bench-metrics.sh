#!/usr/bin/env bash
# What metrics cost: one durable node over QUIC, 50 clients run `counter` on random buckets (grex
# bench), alternately without scrapes and with `GET /metrics` every second (as a Prometheus server
# would scrape), ROUNDS times; then the time and size of one scrape, the median of 50.
# Usage: scripts/bench-metrics.sh [ROUNDS] (default 3). Everything listens on 127.0.0.1 and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-lib.sh
rounds=${1:-3}
scripts/build-jobs.sh > /dev/null
cargo build --release -p grex --bin grex --quiet
grex=target/release/grex
data=$(mktemp -d)
pids=()
scraper=
trap 'kill ${pids[@]} $scraper 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
start_for_load 1
export GREX_NODE=quic://127.0.0.1:17071 GREX_CA=$data/node-0/ca.pem
http=http://127.0.0.1:17070
bench() { $grex bench --clients 50 --seconds 8 --buckets 100000 --seed "$1" | tail -1; }
echo "== one node (256 flocks), durable, 50 clients over QUIC, counter on 100k random buckets, 8 s a run"
for i in $(seq 1 "$rounds"); do
  echo "no scrapes:            $(bench "$i")"
  (while true; do curl -s -o /dev/null "$http/metrics"; sleep 1; done) &
  scraper=$!
  echo "a scrape every second: $(bench "$i")"
  kill $scraper; wait $scraper 2>/dev/null || true
  scraper=
done
echo "== one scrape (after the runs above): median of 50"
for _ in $(seq 1 50); do curl -s -o /dev/null -w '%{time_total} %{size_download}\n' "$http/metrics"; done \
  | sort -n | awk '{t[NR]=$1; s=$2} END {printf "%.2f ms, %d bytes\n", t[int((NR+1)/2)]*1000, s}'
