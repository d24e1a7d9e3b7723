"""Redraw the figures of committed ``hypermeta compare`` reports from their stored trials.csv.

    python benchmarks/compare_figures.py reports/compare-*/

Only the PNGs change: the trials (and so README.md and summary.csv) are the benchmark's, read back
as stored. The study name and metric come from the report's README.md heading and first line.
"""

import argparse
import re
from pathlib import Path

import pandas as pd

from hypermeta._compare import plot_best_so_far


def redraw(directory: Path) -> None:
    readme = (directory / "README.md").read_text()
    name = re.search(r"^# compare (\S+):", readme, re.MULTILINE).group(1)
    metric = re.search(r"is the best (\w+) within the budget", readme).group(1)
    direction = "minimize" if "loss" in metric else "maximize"
    trials = pd.read_csv(directory / "trials.csv")
    counted = trials[trials["within_budget"]]
    for axis in ("steps", "seconds"):
        figure = plot_best_so_far(counted, axis=axis, study_name=name, metric=metric, direction=direction)
        figure.savefig(directory / f"best_vs_{axis}.png", dpi=100)
    print(f"{directory}: redrew best_vs_steps.png and best_vs_seconds.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="compare report directories")
    for directory in parser.parse_args().reports:
        redraw(directory)
