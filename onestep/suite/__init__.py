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
``NAME.incomplete`` and started again. ``--jobs N`` runs N commands at once, each with
``cores // N`` threads. Everything is a subprocess of the CLI, logged to ROOT/logs/.

Outputs in ROOT: ``results.md`` and ``results.csv`` (method, NFE, FD, IS, acc, precision, recall, train
minutes, parameters, images/s), ``seeds.md`` (mean ± std over runs that share a ``seeds`` group),
``grids/NAME.png`` (10 samples per class, one row per class) and ``grid.png`` (one row per run or
seeds group, one column per class; a run with ``grid: false`` keeps its own grid but has no row).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onestep.config import apply_overrides, find_recipe, from_dict, load_yaml
from onestep.registry import ConfigError
from onestep.utils import yamlio
from onestep.utils.atomic import atomic_write
from onestep.utils.rundir import RunDir, read_jsonl

METRIC_COLUMNS = ("fd", "is", "acc", "precision", "recall")
_RUN_KEYS = {"name", "recipe", "label", "overrides", "after", "evals", "seeds", "grid"}
_EVAL_KEYS = {"nfe", "guidance", "late"}


@dataclass
class EvalPass:
    nfe: list[int]
    guidance: float | None = None
    late: bool = False


@dataclass
class SuiteRun:
    name: str
    recipe: str
    label: str
    overrides: list[str]
    after: list[str]
    evals: list[EvalPass]
    seeds: str | None
    dir: Path
    grid: EvalPass | None = None
    in_figure: bool = True  # a row in the combined grid.png (``grid: false`` leaves it out)
    steps: int = 0
    cfg: Any = None
    status: str = "pending"
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Suite:
    root: Path
    runs: list[SuiteRun]
    eval: dict[str, Any]
    real: list[str]
    path: str


# ----------------------------------------------------------------------------------------- loading
def _fmt(items: list[str], root: Path) -> list[str]:
    return [str(x).replace("{root}", str(root)) for x in items]


def load_suite(args: list[str], *, root: str | None = None, overrides: list[str] = ()) -> Suite:
    """A suite file, or recipes given directly. ``overrides`` apply to every run (after its own)."""
    path = Path(args[0]) if len(args) == 1 else None
    if path is not None and path.suffix in (".yaml", ".yml") and path.is_file():
        raw = yamlio.safe_load(path.read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("runs"), list) or not raw["runs"]:
            raise ConfigError(f"{path}: a suite is a mapping with 'runs' (a list of {{name, recipe, ...}})")
        unknown = set(raw) - {"root", "eval", "real", "runs"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown suite key(s) {', '.join(sorted(unknown))}; allowed: root, eval, real, runs"
            )
        entries, source = raw["runs"], str(path)
    else:
        raw, source = {}, " ".join(args)
        entries = [{"name": Path(find_recipe(a)).stem, "recipe": a} for a in args]
    base = Path(root or raw.get("root") or "runs/suite")
    suite_eval = dict(raw.get("eval") or {})
    runs, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{source}: runs[{i}]"
        if not isinstance(entry, dict) or "recipe" not in entry:
            raise ConfigError(f"{where}: each run is a mapping with at least 'recipe'")
        bad = set(entry) - _RUN_KEYS
        if bad:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(_RUN_KEYS))}"
            )
        name = str(entry.get("name") or Path(str(entry["recipe"])).stem)
        if name in names:
            raise ConfigError(f"{where}: run name '{name}' is used twice")
        names.add(name)
        run_overrides = _fmt(list(entry.get("overrides") or []), base) + list(overrides)
        recipe_path = find_recipe(entry["recipe"])
        cfg = from_dict(apply_overrides(load_yaml(recipe_path), run_overrides))
        evals = []
        for j, e in enumerate(entry.get("evals") or [{}]):
            if set(e) - _EVAL_KEYS:
                raise ConfigError(f"{where}.evals[{j}]: allowed keys are {', '.join(sorted(_EVAL_KEYS))}")
            guidance = e.get("guidance", cfg.eval.guidance)
            if isinstance(guidance, list):
                raise ConfigError(f"{where}.evals[{j}]: one guidance value per pass (add a pass per value)")
            evals.append(EvalPass(list(e.get("nfe") or cfg.eval.nfe), guidance, bool(e.get("late", False))))
        grid = entry.get("grid", {})
        if grid is not False and not isinstance(grid, dict | None):
            raise ConfigError(f"{where}.grid: a mapping ({{nfe: N, guidance: W}}) or false, got {grid!r}")
        in_figure, grid = grid is not False, grid or {}
        grid = EvalPass([int(grid.get("nfe", evals[0].nfe[0]))], grid.get("guidance", evals[0].guidance))
        runs.append(
            SuiteRun(
                name,
                str(recipe_path),
                str(entry.get("label") or name),
                run_overrides,
                list(entry.get("after") or []),
                evals,
                entry.get("seeds"),
                base / name,
                grid=grid,
                in_figure=in_figure,
                steps=cfg.train.steps,
                cfg=cfg,
            )
        )
    by_dir = {r.dir.resolve(): r.name for r in runs}
    for r in runs:  # a teacher or init run of the suite is a dependency
        for ref in (r.cfg.objective.get("teacher"), r.cfg.train.init_from):
            if isinstance(ref, str) and Path(ref).resolve() in by_dir and by_dir[Path(ref).resolve()] != r.name:
                r.after.append(by_dir[Path(ref).resolve()])
        missing = [a for a in r.after if a not in names]
        if missing:
            raise ConfigError(f"{source}: run '{r.name}' waits for unknown run(s) {', '.join(missing)}")
    return Suite(base, runs, suite_eval, list(raw.get("real") or []), source)


# ----------------------------------------------------------------------------------------- running
class Runner:
    def __init__(self, suite: Suite, jobs: int = 1, echo=print):
        self.suite, self.jobs, self.echo = suite, max(1, jobs), echo
        cores = os.cpu_count() or 1
        self.threads = max(1, cores // self.jobs)
        self.logs = suite.root / "logs"
        self._lock = threading.Lock()

    def _env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": str(self.threads)}

    def _call(self, name: str, what: str, cmd: list[str]) -> bool:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.{what}.log"
        t0 = time.perf_counter()
        self.echo(f"[suite] {name}: {what} started ({shlex.join(cmd[2:])})")
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env()).returncode
        minutes = (time.perf_counter() - t0) / 60
        self.echo(
            f"[suite] {name}: {what} {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} in {minutes:.1f} min"
        )
        return rc == 0

    # -- one run ------------------------------------------------------------------------------
    def trained_step(self, run: SuiteRun) -> int | None:
        """The step of the run's last checkpoint, or None."""
        from onestep.utils.checkpoint import read_checkpoint_file

        last = RunDir(run.dir).last_checkpoint
        if not last.is_file():
            return None
        try:
            return int(read_checkpoint_file(last, "cpu")["step"])
        except (ConfigError, KeyError, ValueError, OSError):
            return None

    def train(self, run: SuiteRun) -> bool:
        step = self.trained_step(run)
        base = [sys.executable, "-m", "onestep", "train"]
        if step is not None and step >= run.steps:
            return True
        if step is not None:
            cmd = base + ["--resume", str(run.dir), "--no-progress", f"train.threads={self.threads}"]
        else:
            rd = RunDir(run.dir)
            if rd.leftovers():  # a start that never reached a checkpoint: keep it aside, start again
                aside = run.dir.with_name(run.dir.name + ".incomplete")
                if aside.exists():
                    import shutil

                    shutil.rmtree(aside)
                run.dir.rename(aside)
                self.echo(f"[suite] {run.name}: no checkpoint in {run.dir}; moved it to {aside}, starting again")
            cmd = base + [
                run.recipe,
                "--run-dir",
                str(run.dir),
                "--no-progress",
                *run.overrides,
                f"train.threads={self.threads}",
            ]
        return self._call(run.name, "train", cmd)

    def pending_evals(self, run: SuiteRun, late: bool) -> list[EvalPass]:
        rows = RunDir(run.dir).read_metrics()
        step = self.trained_step(run)
        metrics = self.metric_names()
        n, seed = self.num_samples(run), self.suite.eval.get("seed", run.cfg.eval.seed)
        todo = []
        for e in run.evals:
            if e.late != late:
                continue
            have = {
                (r.get("nfe"), r.get("metric"))
                for r in rows
                if r.get("step") == step
                and r.get("num_samples") == n
                and r.get("seed") == seed
                and r.get("guidance") == e.guidance
            }
            if any((nfe, m) not in have for nfe in e.nfe for m in metrics):
                todo.append(e)
        return todo

    def metric_names(self) -> list[str]:
        return [str(m) for m in self.suite.eval.get("metrics") or METRIC_COLUMNS]

    def num_samples(self, run: SuiteRun) -> int:
        return int(self.suite.eval.get("num_samples") or run.cfg.eval.num_samples)

    def evaluate(self, run: SuiteRun, late: bool) -> bool:
        ok = True
        for e in self.pending_evals(run, late):
            cmd = [
                sys.executable,
                "-m",
                "onestep",
                "eval",
                str(run.dir),
                "--metrics",
                ",".join(self.metric_names()),
                "--num-samples",
                str(self.num_samples(run)),
                "--seed",
                str(self.suite.eval.get("seed", run.cfg.eval.seed)),
            ]
            for nfe in e.nfe:
                cmd += ["--nfe", str(nfe)]
            if e.guidance is not None:
                cmd += ["--guidance", f"{e.guidance:g}"]
            if self.suite.eval.get("batch_size"):
                cmd += ["--batch-size", str(self.suite.eval["batch_size"])]
            ok = self._call(run.name, "eval" + ("_late" if late else ""), cmd) and ok
        return ok

    def run_one(self, run: SuiteRun) -> None:
        try:
            for dep in run.after:
                other = self.by_name[dep]
                other.done.wait()
                if other.status != "trained":
                    run.status, run.error = "skipped", f"its dependency '{dep}' did not train"
                    self.echo(f"[suite] {run.name}: skipped ({run.error})")
                    return
            if not self.train(run):
                run.status, run.error = "failed", f"training failed (see {self.logs / (run.name + '.train.log')})"
                return
            run.status = "trained"
        finally:
            run.done.set()
        if not self.evaluate(run, late=False):
            run.error = f"an evaluation failed (see {self.logs / (run.name + '.eval.log')})"
        self.grid(run)

    def grid(self, run: SuiteRun) -> None:
        from onestep.suite.grids import class_grid

        path = self.suite.root / "grids" / f"{run.name}.png"
        step = self.trained_step(run)
        if (
            path.is_file()
            and path.with_suffix(".step").is_file()
            and path.with_suffix(".step").read_text() == str(step)
        ):
            return
        try:
            class_grid(run.dir, path, per_class=10, nfe=run.grid.nfe[0], guidance=run.grid.guidance)
            atomic_write(path.with_suffix(".step"), lambda f: f.write(str(step).encode()))
        except (ConfigError, OSError, ValueError, RuntimeError) as exc:
            self.echo(f"[suite] {run.name}: grid failed: {exc}")

    def run(self) -> int:
        self.by_name = {r.name: r for r in self.suite.runs}
        t0 = time.perf_counter()
        with RunDir(self.suite.root).lock():
            with ThreadPoolExecutor(self.jobs) as pool:
                list(pool.map(self.run_one, self._ordered()))
            with ThreadPoolExecutor(self.jobs) as pool:
                list(
                    pool.map(
                        lambda r: self.evaluate(r, late=True), [r for r in self.suite.runs if r.status == "trained"]
                    )
                )
            self.real_rows()
            write_results(self.suite, self)
        failed = [r for r in self.suite.runs if r.status != "trained"]
        self.echo(
            f"[suite] {len(self.suite.runs) - len(failed)} of {len(self.suite.runs)} runs trained; "
            f"wall time {(time.perf_counter() - t0) / 60:.1f} min; results in {self.suite.root / 'results.md'}"
        )
        for r in failed:
            self.echo(f"[suite] {r.name}: {r.status}: {r.error}")
        return 0 if not failed else 1

    def _ordered(self) -> list[SuiteRun]:
        """Runs in an order where each comes after its dependencies (the pool takes them in order, so
        a job never waits on a run that has not started)."""
        out, seen = [], set()

        def visit(r: SuiteRun, stack: tuple[str, ...]) -> None:
            if r.name in seen:
                return
            if r.name in stack:
                raise ConfigError(f"suite: runs depend on each other in a cycle ({' -> '.join(stack + (r.name,))})")
            for dep in r.after:
                visit(self.by_name[dep], stack + (r.name,))
            seen.add(r.name)
            out.append(r)

        for r in self.suite.runs:
            visit(r, ())
        return out

    def real_rows(self) -> list[dict]:
        """Rows for real images of each ``real`` split (cached in ROOT/real.jsonl)."""
        cache = self.suite.root / "real.jsonl"
        rows = read_jsonl(cache)
        want = [s for s in self.suite.real if not any(r.get("weights") == f"real:{s}" for r in rows)]
        if want and self.suite.runs:
            from onestep.build import build_dataset
            from onestep.eval.evaluate import evaluate_real

            dataset = build_dataset(self.suite.runs[0].cfg)
            for split in want:
                rows += evaluate_real(
                    dataset,
                    split=split,
                    metrics=self.metric_names(),
                    num_samples=self.num_samples(self.suite.runs[0]),
                    seed=int(self.suite.eval.get("seed", 0)),
                )
            atomic_write(cache, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return rows


# ----------------------------------------------------------------------------------------- results
def train_seconds(run_dir: Path) -> float | None:
    """Training wall time from stats.jsonl: the sum over the run's segments (``time_s`` restarts at
    each resume)."""
    total, last = 0.0, 0.0
    rows = RunDir(run_dir).read_stats()
    if not rows:
        return None
    for row in rows:
        t = float(row.get("time_s", 0.0))
        if t < last:
            total += last
        last = t
    return total + last


def result_rows(suite: Suite, runner: Runner) -> list[dict[str, Any]]:
    rows = []
    for run in suite.runs:
        meta = RunDir(run.dir).read_config().get("meta", {}) if RunDir(run.dir).is_run() else {}
        stats = RunDir(run.dir).read_stats()
        speed = statistics.median([r["images_per_s"] for r in stats[1:]]) if len(stats) > 1 else None
        secs = train_seconds(run.dir)
        base = {
            "method": run.label,
            "run": run.name,
            "params": meta.get("parameters"),
            "train_min": None if secs is None else round(secs / 60, 2),
            "images_per_s": speed,
            "status": run.status if run.status != "pending" else ("trained" if runner.trained_step(run) else "pending"),
        }
        step = runner.trained_step(run)
        metrics = [
            r
            for r in RunDir(run.dir).read_metrics()
            if r.get("step") == step and r.get("num_samples") == runner.num_samples(run)
        ]
        keys = sorted({(r["nfe"], r.get("guidance")) for r in metrics}, key=lambda k: (k[1] or 0, k[0]))
        if not keys:
            rows.append({**base, "nfe": None, "guidance": None})
        for nfe, guidance in keys:
            row = {**base, "nfe": nfe, "guidance": guidance}
            for r in metrics:
                if (r["nfe"], r.get("guidance")) == (nfe, guidance) and r["metric"] in METRIC_COLUMNS:
                    row[r["metric"]] = r["value"]
            rows.append(row)
    return rows


def _num(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_results(suite: Suite, runner: Runner) -> None:
    rows = result_rows(suite, runner)
    real = read_jsonl(suite.root / "real.jsonl")
    cols = ["method", "run", "nfe", "guidance", *METRIC_COLUMNS, "train_min", "params", "images_per_s", "status"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    for split in sorted({r["weights"] for r in real}):
        writer.writerow(
            {
                "method": f"real images ({split})",
                "nfe": 0,
                **{r["metric"]: r["value"] for r in real if r["weights"] == split},
            }
        )
    atomic_write(suite.root / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    head = [
        "method",
        "NFE",
        "guidance",
        "FD ↓",
        "IS ↑",
        "acc ↑",
        "precision ↑",
        "recall ↑",
        "train min",
        "params",
        "img/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"] + ("" if r["status"] == "trained" else f" ({r['status']})"),
                    _num(r["nfe"]),
                    _num(r["guidance"]),
                    *(_num(r.get(m)) for m in METRIC_COLUMNS),
                    _num(r["train_min"]),
                    _num(r["params"]),
                    _num(r["images_per_s"]),
                ]
            )
            + " |"
        )
    for split in sorted({r["weights"] for r in real}):
        vals = {r["metric"]: r["value"] for r in real if r["weights"] == split}
        lines.append(
            "| "
            + " | ".join(
                [
                    f"real images ({split.split(':')[1]} split)",
                    "—",
                    "—",
                    *(_num(vals.get(m)) for m in METRIC_COLUMNS),
                    "—",
                    "—",
                    "—",
                ]
            )
            + " |"
        )
    impl = sorted(
        {
            r["implementation"]
            for run in suite.runs
            for r in RunDir(run.dir).read_metrics()
            if r.get("metric") in ("fd",)
        }
    )
    notes = [f"\nFD/IS/acc/precision/recall: {i}" for i in impl[:3]]
    groups = {r.name: r.seeds for r in suite.runs if r.seeds}
    seeds = seeds_table(rows, groups)
    text = "\n".join(lines) + "\n" + "".join(notes) + "\n" + seeds
    atomic_write(suite.root / "results.md", lambda f: f.write(text.encode()))
    atomic_write(suite.root / "seeds.md", lambda f: f.write(seeds.encode()))
    first_of_group = {}
    for r in suite.runs:
        if r.in_figure:
            first_of_group.setdefault(r.seeds or r.name, r)
    figure = [
        (r.label + (f" ({r.grid.nfe[0]} NFE)" if r.grid.nfe[0] != 1 else ""), r.dir, r.grid.nfe[0], r.grid.guidance)
        for r in first_of_group.values()
        if runner.trained_step(r) is not None
    ]
    try:
        from onestep.suite.grids import combined_grid

        names = list(getattr(suite.runs[0].cfg, "class_names", None) or [])
        combined_grid(figure, suite.root / "grid.png", class_names=names or None)
    except (ConfigError, OSError, ValueError) as exc:
        runner.echo(f"[suite] combined grid failed: {exc}")


def seeds_table(rows: list[dict], groups: dict[str, str]) -> str:
    """Mean ± sample std (over runs sharing a ``seeds`` group) of FD, precision and acc at 1 NFE; a group
    with one finished run shows that run's value marked "(1 run)"."""
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        group = groups.get(r["run"])
        if group and r.get("nfe") == 1 and r.get("fd") is not None:
            by_group.setdefault(group, []).append(r)
    if not by_group:
        return ""
    out = [
        "",
        "| seeds group | runs | FD ↓ (mean ± std) | precision ↑ (mean ± std) | acc ↑ (mean ± std) |",
        "|---|---|---|---|---|",
    ]
    for group, rs in by_group.items():
        cells = []
        for m in ("fd", "precision", "acc"):
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            if len(vals) > 1:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
            else:  # one run has no spread: its value alone, not a std of 0
                cells.append(f"{vals[0]:.3f} (1 run)" if vals else "—")
        out.append(f"| {group} | {', '.join(r['run'] for r in rs)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


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
        suite.runs = [r for r in suite.runs if r.name in needed]
    runner = Runner(suite, jobs=args.jobs, echo=echo)
    if args.report_only:
        runner.by_name = {r.name: r for r in suite.runs}
        write_results(suite, runner)
        echo(str(suite.root / "results.md"))
        return 0
    return runner.run()
