# Shared by the benchmark scripts (source it): start Grex nodes on loopback and wait for a cluster.
# The caller sets `grex` (the binary) and `data` (a scratch directory) and declares `pids=()`.
# Node I listens on HTTP 17070 + 10*I, QUIC +1, peers +2, RESP +3, so a restart reuses its ports.

# start I ARGS...: starts node I (extra `grex serve` arguments after I), waits until it listens.
start() {
  local i=$1; shift
  local port=$((17070 + 10 * i))
  : > "$data/out-$i"
  $grex serve --data "$data/node-$i" --http 127.0.0.1:$port --quic 127.0.0.1:$((port + 1)) \
    --peer 127.0.0.1:$((port + 2)) --resp 127.0.0.1:$((port + 3)) "$@" > "$data/out-$i" 2>> "$data/err-$i" &
  pids[$i]=$!
  for _ in $(seq 1 600); do grep -q listening "$data/out-$i" 2>/dev/null && return; sleep 0.05; done
  echo "node $i did not start:"; cat "$data/err-$i"; exit 1
}

# start_cluster N [ARGS...]: `grex init` ($FLOCKS flocks, default 256, replication 3) for node 0,
# then N-1 nodes that join it; every node gets the `grex serve` arguments ARGS.
start_cluster() {
  local n=$1; shift
  $grex init --data "$data/node-0" --flocks ${FLOCKS:-256} --replication 3 > /dev/null
  start 0 "$@"
  for i in $(seq 1 $((n - 1))); do
    $grex cluster credentials --data "$data/node-0" --out "$data/node-$i.creds" > /dev/null
    start "$i" --credentials "$data/node-$i.creds" --join 127.0.0.1:17072 "$@"
  done
}

# formed N [I]: every flock has min(N, 3) herders and a leader, and no membership change is under
# way, as node I (default 0) sees it.
formed() {
  local map herders=$(($1 < 3 ? $1 : 3))
  map=$($grex flock ls --node "http://127.0.0.1:$((17070 + 10 * ${2:-0}))" 2>/dev/null) || return 1
  [ "$(grep -c '^node ' <<< "$map")" = "$1" ] && [ "$(grep -cE "^ *[0-9]+( \S+){$herders}\$" <<< "$map")" = ${FLOCKS:-256} ] \
    && [ "$(grep -c '\*' <<< "$map")" = ${FLOCKS:-256} ] && ! grep -q 'membership changing' <<< "$map"
}
wait_formed() {
  for _ in $(seq 1 1200); do formed "$@" && return; sleep 0.1; done
  echo "the cluster did not form"; exit 1
}

# wait_balanced N: every one of N nodes leads at least half its share of the flocks (right after
# forming, node 0 leads them all until idle flocks hand their lead over, a few seconds later).
wait_balanced() {
  local leaders
  for _ in $(seq 1 600); do
    leaders=$($grex flock ls --node http://127.0.0.1:17070 2>/dev/null | grep -oE '[0-9a-f]+\*' | sort | uniq -c) || true
    [ "$(awk -v min=$(( ${FLOCKS:-256} / $1 / 2 )) '$1 >= min' <<< "$leaders" | wc -l)" = "$1" ] && return
    sleep 0.1
  done
  echo "leadership did not spread over $1 nodes:"; echo "$leaders"; exit 1
}

# resp_errors: Redis-protocol commands answered with an error so far, over every node started
# (from each node's `grex_resp_commands_total{result="error"}`). redis-benchmark counts an error
# reply (`overloaded`, a redirect) as a command done, so a figure is honest only if this did not grow.
resp_errors() {
  local i total=0 n
  for i in "${!pids[@]}"; do
    n=$(curl -s "http://127.0.0.1:$((17070 + 10 * i))/metrics" \
      | awk 'index($1, "grex_resp_commands_total{") == 1 && /result="error"/ { s += $NF } END { printf "%d", s }')
    total=$((total + n))
  done
  echo "$total"
}

# report_errors BEFORE N: says how many of the N commands of a run were answered with an error
# (BEFORE: `resp_errors` before the run); silent if none.
report_errors() {
  local errors=$(($(resp_errors) - $1))
  [ "$errors" = 0 ] || echo "WARNING: $errors of $2 commands were answered with an error; the rate counts them as done"
}

# start_for_load N [ARGS...]: one node ($FLOCKS flocks, default 256) or a cluster of N (each node
# started with the `grex serve` arguments ARGS) with leadership spread, formed, with the counter
# job loaded (as `counter`) through node 0's Redis port.
start_for_load() {
  if [ "$1" = 1 ]; then start 0 --flocks "${FLOCKS:-256}" "${@:2}"; else start_cluster "$@"; fi
  wait_formed "$1"
  [ "$1" = 1 ] || wait_balanced "$1"
  redis-cli -p 17073 -x GREX.MODULE LOAD counter < target/jobs/wasm32-unknown-unknown/wasm/counter.wasm > /dev/null
}

# start_for_redis_load N: start_for_load N, then `cmd` (the command to run: CMD, default
# `FCALL counter 1 key:__rand_int__`), `bench ARGS...` (one redis-benchmark run through node 0:
# 50 clients, each with PIPELINE requests in flight (default 1), 100k random keys; prints its CSV
# result line; CLUSTER=1: `redis-benchmark --cluster`, each key sent to its flock's leader) and one
# warm-up run (the first job on a node compiles the module).
start_for_redis_load() {
  read -r -a cmd <<< "${CMD:-FCALL counter 1 key:__rand_int__}"
  start_for_load "$1"
  bench_cluster=()
  [ "${CLUSTER:-0}" != 1 ] || bench_cluster=(--cluster)  # each key to its leader: give CMD's keys a {tag}
  bench() { redis-benchmark "${bench_cluster[@]}" -p 17073 -c 50 -P "${PIPELINE:-1}" -r 100000 --csv "$@" "${cmd[@]}" 2>"$data/bench-err" | tail -1; }
  bench -n 3000 > /dev/null || true  # only a warm-up: its first jobs may meet a lead still moving (`overloaded`)
}
