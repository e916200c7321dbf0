#!/usr/bin/env bash
# Soak: one fault test of tests/tests/faults.rs run many times, each with a fresh seed, against a
# release build; one line per run, then a summary (failures with their seeds, and for kills the
# time until every flock had a leader again).
#
#   scripts/soak.sh [RUNS] [TEST]    RUNS: default 50; TEST: a test name in tests/tests/faults.rs,
#                                    default kills_pauses_and_restarts_lose_nothing_and_return_no_stale_list
#   GREX_FAULT_SECS=20               seconds of faults per run
#   GREX_SOAK_DIR=DIR                where the runs' logs go (default: a new temporary directory)
#   GREX_SOAK_PROFILE=debug          test a debug build instead (reuses the test suite's build)
#
# Replay one run: GREX_SEED=<seed> cargo test --release --workspace --test faults <TEST> -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-50}
test=${2:-kills_pauses_and_restarts_lose_nothing_and_return_no_stale_list}
export GREX_FAULT_SECS=${GREX_FAULT_SECS:-20}
dir=${GREX_SOAK_DIR:-$(mktemp -d -t grex-soak.XXXXXX)}
profile=(--release)
[ "${GREX_SOAK_PROFILE:-release}" = debug ] && profile=()
mkdir -p "$dir"

scripts/build-jobs.sh > /dev/null
# Build once and run copies, so that editing or rebuilding the tree during a soak changes nothing.
mkdir -p "$dir/bin"
cargo build "${profile[@]}" -q --workspace --bin grex 2> "$dir/build.log" || { cat "$dir/build.log"; exit 1; }
tests=$(cargo test "${profile[@]}" -q --workspace --test faults --no-run --message-format=json 2>> "$dir/build.log") \
  || { cat "$dir/build.log"; exit 1; }
faults=$(echo "$tests" | grep -oE '"executable":"[^"]+"' | cut -d'"' -f4 | tail -1)
target=$(dirname "$(dirname "$faults")")
cp "$faults" "$dir/bin/faults"
cp "$target/grex" "$dir/bin/grex"
export GREX_BIN="$dir/bin/grex"
echo "soak: $runs runs of $test, $GREX_FAULT_SECS s of faults each; logs in $dir"

failed=()
for i in $(seq 1 "$runs"); do
  log="$dir/run-$i.log"
  started=$(date +%s)
  if "$dir/bin/faults" --exact "$test" --nocapture --test-threads 1 > "$log" 2>&1; then
    status=ok
  else
    status=FAILED
  fi
  seed=$(grep -m1 -oE 'seed [0-9]+' "$log" | cut -d' ' -f2 || true)
  faults=$(grep -cE '^ +[0-9.]+s node ' "$log" || true)
  longest=$(grep -oE 'leaders again after [0-9.]+ s' "$log" | awk '{print $4}' | sort -n | tail -1 || true)
  history=$(grep -m1 -oE 'history: .*' "$log" | sed 's/history: //' || true)
  printf 'run %3d  seed %-20s  %-6s  %2s faults  longest leaderless %5s s  %ss  %s\n' \
    "$i" "${seed:-?}" "$status" "$faults" "${longest:--}" "$(($(date +%s) - started))" "$history"
  [ "$status" = ok ] || failed+=("run $i seed ${seed:-?}: $log")
done

echo
echo "== summary: $runs runs of $test"
echo "passed: $((runs - ${#failed[@]})), failed: ${#failed[@]}"
for f in "${failed[@]}"; do echo "  $f"; done
# Every kill the nemesis timed: how long until every flock had a leader other than the victim.
gaps=$(cat "$dir"/run-*.log | grep -oE 'leaders again after [0-9.]+ s' | awk '{print $4}' | sort -n || true)
untimed=$(cat "$dir"/run-*.log | grep -E '^ +[0-9.]+s node [0-9]+ (Kill|KillLeader)' | grep -vc 'leaders again' || true)
if [ -n "$gaps" ]; then
  count=$(echo "$gaps" | wc -l)
  within=$(echo "$gaps" | awk '$1 <= 2.0' | wc -l)
  echo "kills timed: $count; every flock led again within 2 s after $within of them; kills without a leader before the restart: $untimed"
  echo "$gaps" | awk '{a[NR]=$1} END {printf "leaderless after a kill: median %.2f s, p99 %.2f s, max %.2f s\n", a[int((NR+1)/2)], a[int(NR*0.99+0.999)], a[NR]}'
  # Per run: the longest gap.
  runs_within=0
  for log in "$dir"/run-*.log; do
    longest=$(grep -oE 'leaders again after [0-9.]+ s' "$log" | awk '{print $4}' | sort -n | tail -1 || true)
    [ -n "$longest" ] && awk -v g="$longest" 'BEGIN { exit !(g <= 2.0) }' && runs_within=$((runs_within + 1))
  done
  echo "runs whose longest leaderless gap was within 2 s: $runs_within of $runs"
fi
# Availability: per fault kind, the longest stretch with nothing acknowledged from the fault's
# start to 3 s after its end.
cat "$dir"/run-*.log | grep -E '^ +[0-9.]+s node [0-9]+ [A-Za-z]+.*nothing acknowledged for' \
  | sed -E 's/^ +[0-9.]+s node [0-9]+ ([A-Za-z]+).*nothing acknowledged for ([0-9.]+) s.*/\1 \2/' \
  | sort -k1,1 -k2,2n \
  | awk '{ v[$1] = v[$1] " " $2; n[$1]++ }
         END { for (k in n) { split(substr(v[k], 2), a, " ");
                 printf "%-10s faults: %4d; longest stretch with nothing acknowledged (fault start to 3 s after its end): median %.2f s, max %.2f s\n",
                        k, n[k], a[int((n[k] + 1) / 2)], a[n[k]] } }'
# Operations acknowledged, over all runs.
cat "$dir"/run-*.log | grep -oE '^history: Tally \{ ops: [0-9]+, appends_ok: [0-9]+, reads_ok: [0-9]+, follower_reads_ok: [0-9]+' \
  | awk -F'[:,]' '{ ops += $3; ok += $5 + $7 + $9 } END { if (ops) printf "operations: %d, acknowledged: %d (%.1f %%)\n", ops, ok, 100 * ok / ops }'
[ ${#failed[@]} -eq 0 ]
