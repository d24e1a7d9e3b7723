#!/usr/bin/env bash
# Regenerates the reports/compare-* tables quoted in the README (hypermeta compare, equal budgets).
# One intra-op thread: these models are small, and two threads on a loaded 2-core machine thrash.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 hypermeta compare studies/digits_mlp.py --budget-steps 7200 --seeds 3
OMP_NUM_THREADS=1 hypermeta compare studies/digits_highdim.py --budget-steps 12000 --seeds 3
OMP_NUM_THREADS=1 hypermeta compare studies/mnist1d_cnn.py --budget-steps 18000 --seeds 2
# The same studies at an equal budget of wall-clock seconds (hypergradient overhead included).
OMP_NUM_THREADS=1 hypermeta compare studies/digits_mlp.py --budget-seconds 10 --seeds 3 --out reports/compare-digits-mlp-seconds
OMP_NUM_THREADS=1 hypermeta compare studies/mnist1d_cnn.py --budget-seconds 60 --seeds 2 --out reports/compare-mnist1d-cnn-seconds
