"""``onestep plot``: training curves and metric-vs-step plots as PNG."""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    from onestep.report.plot import plot_runs

    out = args.out or (str(Path(args.runs[0]) / "plots") if len(args.runs) == 1 else "plots")
    for path in plot_runs(args.runs, out):
        print(path)
    return 0
