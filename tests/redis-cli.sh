#!/usr/bin/env bash
# redis-cli against a real node: every command docs/resp.md lists, as a shell user would type it.
# Usage: tests/redis-cli.sh [GREX_BINARY] (default target/debug/grex). Needs redis-cli
# (Debian: redis-tools) and the example jobs (scripts/build-jobs.sh). The node listens on
# 127.0.0.1 with ports the OS picks, and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
grex=${1:-target/debug/grex}
counter=target/jobs/wasm32-unknown-unknown/wasm/counter.wasm
command -v redis-cli > /dev/null || { echo "redis-cli not found: install it (Debian: apt-get install redis-tools)" >&2; exit 1; }
[ -x "$grex" ] || { echo "$grex not found: build it first (cargo build -p grex)" >&2; exit 1; }
[ -f "$counter" ] || { echo "$counter not found: run scripts/build-jobs.sh" >&2; exit 1; }

data=$(mktemp -d)
trap 'kill $node 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
"$grex" serve --data "$data" --http 127.0.0.1:0 --quic 127.0.0.1:0 --peer 127.0.0.1:0 --resp 127.0.0.1:0 \
  > "$data/out" 2> "$data/err" &
node=$!
for _ in $(seq 1 400); do grep -q listening "$data/out" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/.*resp=redis:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$data/out")
[ -n "$port" ] || { echo "the node did not start:" >&2; cat "$data/err" >&2; exit 1; }

failures=0
cli() { redis-cli -p "$port" "$@" 2>&1; }
# expect NAME EXPECTED COMMAND...: runs redis-cli COMMAND and compares its whole output.
expect() {
  local name=$1 want=$2
  shift 2
  local got
  got=$(cli "$@")
  if [ "$got" == "$want" ]; then
    echo "ok   $name"
  else
    echo "FAIL $name"
    echo "     redis-cli $*"
    echo "     want: $(printf %q "$want")"
    echo "     got:  $(printf %q "$got")"
    failures=$((failures + 1))
  fi
}
# expect_match NAME REGEX COMMAND...: the output must match the extended regular expression.
expect_match() {
  local name=$1 pattern=$2
  shift 2
  local got
  got=$(cli "$@")
  if [[ "$got" =~ $pattern ]]; then
    echo "ok   $name"
  else
    echo "FAIL $name"
    echo "     redis-cli $*"
    echo "     want match: $pattern"
    echo "     got:  $(printf %q "$got")"
    failures=$((failures + 1))
  fi
}

expect "ping" "PONG" PING
expect "echo" "hello there" ECHO "hello there"
expect "hset counts new fields" "2" HSET customer-1 name Ada city Paris
expect "hset of an existing field" "0" HSET customer-1 city London
expect "hget" "London" HGET customer-1 city
expect "hget of a missing field is nil" "" HGET customer-1 phone
expect "hmget" $'Ada\n\nLondon' HMGET customer-1 name phone city
# Items come back in key order.
expect "hgetall" $'city\nLondon\nname\nAda' HGETALL customer-1
expect "hkeys" $'city\nname' HKEYS customer-1
expect "hlen" "2" HLEN customer-1
expect "hexists" "1" HEXISTS customer-1 name
expect "hdel counts what existed" "1" HDEL customer-1 name phone
expect "exists" "1" EXISTS customer-1 customer-2
expect "del" "1" DEL customer-1 customer-2
expect "exists after del" "0" EXISTS customer-1
expect "hmset" "OK" HMSET customer-3 a 1 b 2
expect "resp3 hgetall is a map" $'1# "a" => "1"\n2# "b" => "2"' -3 --no-raw HGETALL customer-3

expect_match "module load from a file" '^sha256:[0-9a-f]{64}$' -x GREX.MODULE LOAD counter < "$counter"
expect_match "module list" 'counter' GREX.MODULE LIST
expect "fcall" "5" FCALL counter 1 orders-9 5
expect "fcall again" "7" FCALL counter 1 orders-9 2
expect "fcall_ro sees the count" "7" HGET orders-9 count
expect "fcall_ro with a bad increment is the job's error" \
  "ERR the increment must be a decimal integer such as 5 or -2, got \`x\` (job_failed)" FCALL counter 1 orders-9 x
expect "fcall with numkeys 2" \
  "ERR numkeys must be 1: a Grex job runs on one bucket (got '2')" FCALL counter 2 a b
expect_match "fcall of an unknown module" '^ERR .*\(module_not_found\)$' FCALL nosuch 1 k
expect_match "canary" 'url' GREX.CANARY orders-9

expect "unknown command" "ERR unknown command 'SET', with args beginning with: 'k' 'v' " SET k v
expect "wrong arity" "ERR wrong number of arguments for 'hget' command" HGET k

# Redis Cluster's view: hash slots as Redis computes them; one node serves every slot.
expect "cluster keyslot" "11058" CLUSTER KEYSLOT somekey
expect "cluster keyslot of a hash tag" "2515" CLUSTER KEYSLOT "foo{hash_tag}"
expect_match "cluster myid" '^[0-9a-f]{40}$' CLUSTER MYID
expect "cluster slots" "$(printf '0\n16383\n127.0.0.1\n%s\n%s' "$port" "$(cli CLUSTER MYID)")" CLUSTER SLOTS
expect_match "cluster nodes" "^[0-9a-f]{40} 127\.0\.0\.1:$port@[0-9]+ myself,master - 0 0 [0-9]+ connected 0-16383\$" CLUSTER NODES
expect_match "cluster info" 'cluster_state:ok' CLUSTER INFO
expect_match "cluster subcommands Grex does not offer" "^ERR unknown subcommand 'addslots'" CLUSTER ADDSLOTS 1
expect "a cluster-mode redis-cli" "3" -c FCALL counter 1 "{orders-9}.returns" 3

# Pipelining: 1,000 commands in one write, answered in order without errors.
pipe=$(for i in $(seq 1 1000); do printf 'HSET pipe-%d f %d\r\n' $((i % 10)) "$i"; done | redis-cli -p "$port" --pipe 2>&1)
if [[ "$pipe" == *"errors: 0, replies: 1000"* ]]; then echo "ok   pipe of 1000 commands"; else
  echo "FAIL pipe of 1000 commands: $pipe"; failures=$((failures + 1)); fi
expect "pipelined writes landed in order" "1000" HGET pipe-0 f

if [ "$failures" -ne 0 ]; then
  echo "$failures redis-cli check(s) failed; node log:" >&2
  tail -20 "$data/err" >&2
  exit 1
fi
echo "redis-cli: all checks passed"
