#!/usr/bin/env bash
# Makes the data directories that tests/tests/migrate.rs starts this version on: grex of an older
# storage schema, built from the commit that last wrote it, runs a cluster, takes writes through
# the Redis protocol, and is stopped with SIGTERM; its data directories are packed as they are.
#
#   scripts/migration-fixtures.sh [OUT_DIR]     (default: tests/fixtures/migrate)
#
# Writes, for each commit below, `schemaN-Mnodes.tar.gz`: the data directories n0..n(M-1) of an
# M-node cluster with 16 flocks whose node i listened on 127.0.0.1:(BASE + 10 i + x) (x = 0 HTTP,
# 1 QUIC, 2 peer, 3 Redis), BASE below the ports the tests draw (20000 and up). Buckets customer-0 .. customer-199 each hold the items
# `name` (customer-I) and `n` (I); a bucket `wide` holds 100 items f0 .. f99 (v0 .. v99).
# Needs cargo, redis-cli, curl, python3 and git history (the commits are built with `git archive`);
# GREX_OLD_BINS=DIR takes DIR/grex-COMMIT instead of building it; GREX_FIXTURE_ONLY=schema5-3nodes
# makes only that one.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/tests/fixtures/migrate}"
WORK="$(mktemp -d /tmp/grex-fixtures.XXXXXX)"
trap 'pkill -f "$WORK/" 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

# schema  commit  nodes  copies  base   what it ran
FIXTURES=(
  "3 1ad4ad9 1 1 19300"   # openraft, flocks by xxh3; one copy, so flocks later move whole
  "3 1ad4ad9 3 3 19400"   # the same in three nodes: refused (flocks were cut by another hash)
  "4 307782a 3 3 19600"   # openraft, flocks by hash slot
  "5 838c295 3 3 19500"   # raft-rs, logs in a redb file
)

build() {
  local commit=$1
  local src="$WORK/src-$commit"
  if [ -n "${GREX_OLD_BINS:-}" ] && [ -x "$GREX_OLD_BINS/grex-$commit" ]; then
    echo "$GREX_OLD_BINS/grex-$commit"
    return
  fi
  if [ ! -x "$WORK/grex-$commit" ]; then
    mkdir -p "$src"
    git -C "$ROOT" archive "$commit" | tar -x -C "$src"
    (cd "$src" && cargo build -q -p grex --bin grex --target-dir "$WORK/target-$commit")
    cp "$WORK/target-$commit/debug/grex" "$WORK/grex-$commit"
  fi
  echo "$WORK/grex-$commit"
}

port() { echo $((base + 10 * $1 + $2)); }

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 600); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $what" >&2
  exit 1
}

for fixture in "${FIXTURES[@]}"; do
  read -r schema commit nodes copies base <<<"$fixture"
  if [ -n "${GREX_FIXTURE_ONLY:-}" ] && [ "$GREX_FIXTURE_ONLY" != "schema$schema-${nodes}nodes" ]; then continue; fi
  bin=$(build "$commit")
  dir="$WORK/schema$schema-${nodes}nodes"
  mkdir -p "$dir"
  pids=()
  for i in $(seq 0 $((nodes - 1))); do
    args=(serve --data "$dir/n$i" --flocks 16 --replication "$copies" --http "127.0.0.1:$(port "$i" 0)" --quic "127.0.0.1:$(port "$i" 1)"
      --peer "127.0.0.1:$(port "$i" 2)" --resp "127.0.0.1:$(port "$i" 3)")
    if [ "$i" -gt 0 ]; then
      "$bin" cluster credentials --data "$dir/n0" --out "$dir/n$i.creds" >/dev/null
      args+=(--credentials "$dir/n$i.creds" --join "127.0.0.1:$(port 0 2)")
    fi
    GREX_LOG=warn "$bin" "${args[@]}" >"$dir/n$i.out" 2>"$dir/n$i.log" &
    pids+=($!)
    wait_for "node $i" redis-cli -p "$(port "$i" 3)" PING
  done
  # Every flock has its copies, settled, with a leader, before the writes.
  settled() {
    curl -sf "http://127.0.0.1:$(port 0 0)/v1/flocks" | python3 -c '
import json, sys
flocks = json.load(sys.stdin)["flocks"]
sys.exit(0 if len(flocks) == 16 and all(len(f["herders"]) == int(sys.argv[1]) and f["settled"] and f["leader"] for f in flocks) else 1)
' "$nodes"
  }
  wait_for "every flock settled on $nodes nodes" settled
  for b in $(seq 0 199); do
    node=$((b % nodes))
    redis-cli -p "$(port "$node" 3)" HSET "customer-$b" name "customer-$b" n "$b" >/dev/null
  done
  fields=()
  for f in $(seq 0 99); do fields+=("f$f" "v$f"); done
  redis-cli -p "$(port 0 3)" HSET wide "${fields[@]}" >/dev/null
  [ "$(redis-cli -p "$(port $((nodes - 1)) 3)" HGET customer-199 n)" = 199 ]
  sleep 2 # followers learn the last commit index from the next heartbeat
  kill -TERM "${pids[@]}"
  wait "${pids[@]}" || true
  rm -f "$dir"/*.creds "$dir"/*.out "$dir"/*.log
  rm -rf "$dir"/n*/code
  tar -C "$dir" -czf "$OUT/schema$schema-${nodes}nodes.tar.gz" .
  echo "$OUT/schema$schema-${nodes}nodes.tar.gz: $(du -h "$OUT/schema$schema-${nodes}nodes.tar.gz" | cut -f1)"
done
