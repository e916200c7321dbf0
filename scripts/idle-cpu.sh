#!/usr/bin/env bash
# What an idle cluster costs: starts N release nodes (256 flocks, replication 3; FLOCKS overrides),
# waits until every node sees it formed, lets it settle for 15 s, then prints each node's CPU over
# 20 s as a share of one core, and the mean.
# Usage: scripts/idle-cpu.sh N [BINARY] (default target/release/grex; build it first).
# Everything listens on 127.0.0.1 (ports from 17070, scripts/cluster-lib.sh) and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 N [BINARY]"; exit 2; }
n=$1 grex=${2:-target/release/grex}
[ -x "$grex" ] || { echo "$grex is missing: cargo build --release -p grex"; exit 1; }
data=$(mktemp -d)
pids=()  # Grex nodes, by index (scripts/cluster-lib.sh)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
source scripts/cluster-lib.sh

cpu_ticks() { for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat"; done; }

start_cluster "$n"
for i in $(seq 0 $((n - 1))); do wait_formed "$n" "$i"; done
sleep 15
cpu_ticks > "$data/before"
sleep 20
cpu_ticks > "$data/after"
ticks=$(getconf CLK_TCK)
paste "$data/before" "$data/after" | awk -v n="$n" -v hz="$ticks" '
  { pct = ($2 - $1) * 100 / hz / 20; sum += pct; printf "node %d: %.2f%% of a core\n", NR - 1, pct }
  END { printf "%d nodes, idle: %.2f%% of a core per node (mean)\n", n, sum / n }'
