"""``onestep suite``: train and score a list of recipes into one results table.

A suite file (YAML) names a root folder and its runs::

    root: runs/fashion                 # run directories are ROOT/<name>
    eval: {num_samples: 10000, seed: 0, batch_size: 1000, metrics: [fd, is, acc, precision, recall]}
    real: [train]                      # also score real images of these splits (the floor)
    runs:
      - {name: flow_matching, recipe: fashion_flow_matching, label: flow matching,
         evals: [{nfe: [1, 2]}, {nfe: [10, 50], late: true}]}
      - {name: cd, recipe: fashion_cd, label: CD, overrides: ["objective.teacher={root}/flow_matching"]}
      - {name: meanflow_s1, recipe: fashion_meanflow, label: MeanFlow, overrides: [seed=1], seeds: meanflow}

Recipes may also be given directly (``onestep suite fashion_meanflow fashion_ict``): one run each,
named after the recipe. A run waits for the runs it names in ``after`` and for any run whose
directory is its ``objective.teacher`` or ``train.init_from``. ``evals`` default to one pass at the
recipe's ``eval.nfe`` / ``eval.guidance``; ``late`` passes run after every training has finished.

Resumable: a run whose last checkpoint is at its ``train.steps`` is not trained again, a cut one is
resumed (``--resume``), an evaluation already in ``metrics.jsonl`` (same step, nfe, metric, guidance,
samples, seed) is not repeated; a directory with a config but no checkpoint is moved aside to
``NAME.incomplete`` and started again. ``--jobs N`` runs N commands at once, each with ``--threads``
or ``cores // N`` threads. Everything is a subprocess of the CLI, logged to ROOT/logs/.

Outputs in ROOT: ``results.md`` and ``results.csv`` (method, NFE, FD, IS, acc, precision, recall, train
minutes, parameters, images/s), ``seeds.md`` (mean ± std over runs that share a ``seeds`` group),
``grids/NAME.png`` (10 samples per class, one row per class) and ``grid.png`` (one row per run or
seeds group, one column per class; a run with ``grid: false`` keeps its own grid but has no row).
"""

from __future__ import annotations

from onestep.registry import ConfigError
from onestep.suite.report import result_rows, seeds_table, train_seconds, write_results
from onestep.suite.runner import Runner
from onestep.suite.spec import EvalPass, Suite, SuiteRun, load_suite

__all__ = [
    "EvalPass",
    "Runner",
    "Suite",
    "SuiteRun",
    "load_suite",
    "main",
    "result_rows",
    "seeds_table",
    "train_seconds",
    "write_results",
]


def main(args, echo=print) -> int:
    suite = load_suite(args.suite, root=args.root, overrides=args.overrides)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {r.name for r in suite.runs}
        if unknown:
            raise ConfigError(
                f"--only: unknown run(s) {', '.join(sorted(unknown))}; the suite has "
                f"{', '.join(r.name for r in suite.runs)}"
            )
        needed = set()

        def need(name):
            if name not in needed:
                needed.add(name)
                for d in next(r for r in suite.runs if r.name == name).after:
                    need(d)

        for name in keep:
            need(name)
    else:
        needed = None
    # --only picks what is trained and scored; the tables and figures still cover every run.
    runner = Runner(suite, jobs=args.jobs, echo=echo, threads=getattr(args, "threads", None), only=needed)
    if args.report_only:
        write_results(suite, echo=echo)
        echo(str(suite.root / "results.md"))
        return 0
    return runner.run()
