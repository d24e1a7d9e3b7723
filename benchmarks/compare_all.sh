#!/usr/bin/env bash
# Regenerates the reports/compare-* tables quoted in the README and docs/benchmarks.md.
# One thread per arm (--threads 1): these models are small, and two threads on a loaded 2-core machine thrash.
# The two halves below can run at the same time on a 2-core machine (one core each).
set -euo pipefail
cd "$(dirname "$0")/.."
first_half() {  # the headline: an equal budget of wall-clock seconds
  hypermeta compare studies/digits_mlp.py --budget-seconds 20 --seeds 3 --threads 1 --out reports/compare-digits-mlp-seconds
  hypermeta compare studies/digits_highdim.py --budget-seconds 30 --seeds 3 --threads 1 --out reports/compare-digits-highdim-seconds
  # seeds 3-5 were not used to choose the study's hypergradient settings (docs/benchmarks.md)
  hypermeta compare studies/digits_highdim.py --budget-seconds 30 --seeds 6 --threads 1 --out reports/compare-digits-highdim-seconds-6-seeds
  # the second table: an equal number of training steps
  hypermeta compare studies/digits_mlp.py --budget-steps 12000 --seeds 3 --threads 1
  hypermeta compare studies/digits_highdim.py --budget-steps 18000 --seeds 3 --threads 1
  hypermeta compare studies/mnist1d_cnn.py --budget-steps 18000 --seeds 2 --threads 1
}
second_half() {
  hypermeta compare studies/mnist1d_cnn.py --budget-seconds 180 --seeds 3 --threads 1 --out reports/compare-mnist1d-cnn-seconds
}
streamed() {  # the study of data streamed from disk (made once under .hypermeta/data, about 40 s)
  # every search arm ends with one finishing run of its best trial's choices for the last 3/4 of its budget
  hypermeta compare studies/mnist1d_stream.py --budget-seconds 120 --seeds 3 --threads 1 --finish 0.75 \
    --out reports/compare-mnist1d-stream-seconds
}
streamed_more_seeds() {  # the same with 6 seeds: is the lead over the defaults arm more than noise?
  hypermeta compare studies/mnist1d_stream.py --budget-seconds 120 --seeds 6 --threads 1 --finish 0.75 \
    --out reports/compare-mnist1d-stream-seconds-6-seeds
}
finishing() {  # the three other studies with finishing runs (not their headline tables); one core each half
  hypermeta compare studies/digits_mlp.py --budget-seconds 20 --seeds 3 --threads 1 --finish 0.75 --out reports/compare-digits-mlp-seconds-finish
  hypermeta compare studies/digits_highdim.py --budget-seconds 30 --seeds 3 --threads 1 --finish 0.75 --out reports/compare-digits-highdim-seconds-finish
  hypermeta compare studies/mnist1d_cnn.py --budget-seconds 180 --seeds 3 --threads 1 --finish 0.75 --out reports/compare-mnist1d-cnn-seconds-finish
}
case "${1:-all}" in
  first) first_half ;;
  second) second_half ;;
  stream) streamed ;;
  stream-seeds) streamed_more_seeds ;;
  finish) finishing ;;
  *) first_half; second_half; streamed; streamed_more_seeds; finishing ;;
esac
