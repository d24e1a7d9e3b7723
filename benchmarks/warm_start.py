"""Does a warm-started study reach a given validation loss in fewer trials than a cold one?

The source study (``benchmarks/warm_start_studies/source.py``, digits, 600 steps) runs once. The
target study (same layers, another digits split, 150 steps) then runs cold -- Optuna choosing
the initial learning rates and weight decay -- and warm-started from the source's best trial,
with the same seeds. The threshold is the median, over seeds, of the cold study's best
validation loss after all its trials; the first table gives the trials each needed to reach it,
the second the median best validation loss after 1, 2, 4 and 8 trials.

    python benchmarks/warm_start.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from hypermeta._runner import RunOptions, load_study_file, run_study

STUDIES = Path(__file__).parent / "warm_start_studies"


def _best_so_far(study) -> list[float]:
    values = [t.value if t.value is not None else math.inf for t in sorted(study.trials, key=lambda t: t.number)]
    return [min(values[: i + 1]) for i in range(len(values))]


def _trials_to_reach(curve: list[float], threshold: float) -> float:
    return next((i + 1 for i, value in enumerate(curve) if value <= threshold), math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"$ python benchmarks/warm_start.py --seeds {args.seeds}\n")
    source, target = load_study_file(STUDIES / "source.py"), load_study_file(STUDIES / "target.py")
    curves = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as directory:
        for seed in range(args.seeds):
            url = f"sqlite:///{directory}/seed{seed}.db"
            run_study(source, RunOptions(storage=url, seed=seed, quiet=True))
            for mode in curves:
                target.name = f"warm-target-{mode}"
                warm = "warm-source" if mode == "warm" else None
                stored = run_study(target, RunOptions(storage=url, seed=seed, quiet=True, warm_start=warm))
                curves[mode].append(_best_so_far(stored))
    threshold = statistics.median(curve[-1] for curve in curves["cold"])
    print(f"threshold: validation loss {threshold:.4f}, the cold study's median best after {target.n_trials} trials\n")
    print("| start | trials to reach it, per seed | median | best after 1 trial (median) |")
    print("|---|---|---|---|")
    for mode, mode_curves in curves.items():
        reached = [_trials_to_reach(curve, threshold) for curve in mode_curves]
        shown = ", ".join("never" if math.isinf(n) else str(n) for n in reached)
        first = statistics.median(curve[0] for curve in mode_curves)
        print(f"| {mode} | {shown} | {statistics.median(reached):g} | {first:.4f} |")
    counts = [n for n in (1, 2, 4, 8, 16) if n <= target.n_trials]
    print("\n| start | " + " | ".join(f"best after {n}" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for mode, mode_curves in curves.items():
        medians = [statistics.median(curve[n - 1] for curve in mode_curves) for n in counts]
        print(f"| {mode} | " + " | ".join(f"{m:.4f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
