#!/usr/bin/env bash
# Regenerates the reports/compare-* tables quoted in the README and docs/benchmarks.md.
# One thread per arm (--threads 1): these models are small, and two threads on a loaded 2-core machine thrash.
# Every search arm ends with one finishing run of its best trial's choices for the last 3/4 of its budget.
# The two halves below can run at the same time on a 2-core machine (one core each).
set -euo pipefail
cd "$(dirname "$0")/.."
compare() {  # STUDY_FILE SECONDS: 3 seeds at an equal budget of wall-clock seconds
  local file=$1 seconds=$2 name
  name=$(basename "$file" .py | tr _ -)
  hypermeta compare "$file" --budget-seconds "$seconds" --seeds 3 --threads 1 --finish 0.75 \
    --out "reports/compare-$name-seconds"
}
first_half() {
  compare studies/digits_mlp.py 20
  compare studies/digits_highdim.py 30
  compare studies/mnist1d_small_mlp.py 90
  compare studies/friedman_regression.py 60
}
second_half() {
  compare studies/mnist1d_cnn.py 180
  compare studies/mnist1d_stream.py 120  # data streamed from disk, made once under .hypermeta/data (40 s)
}
case "${1:-all}" in
  first) first_half ;;
  second) second_half ;;
  *) first_half; second_half ;;
esac
