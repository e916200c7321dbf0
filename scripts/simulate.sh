#!/usr/bin/env bash
# Many simulated fault schedules of the consensus engine in a release build:
# scripts/simulate.sh [SCHEDULES] (default 100000). GREX_SEED picks the first schedule's seed; every failing schedule's seed is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
GREX_SIM_SCHEDULES=$count cargo test --release -p grex-tests --test simulation -- --nocapture --test-threads 1 seeded_schedules
