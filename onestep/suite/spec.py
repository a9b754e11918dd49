"""The suite file: its runs, their evaluations, learning curves and dependencies (``load_suite``).

Every mistake in a suite file is one ``ConfigError`` line naming the file, the run and the key, and
what is allowed: YAML syntax, unknown keys, wrong types, a recipe or override that does not resolve, a
teacher or init that is neither a run of the suite nor an existing checkpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onestep.config import apply_overrides, find_recipe, from_dict, load_yaml
from onestep.registry import ConfigError
from onestep.utils import yamlio
from onestep.utils.rundir import RunDir

METRIC_COLUMNS = ("fd", "is", "acc", "precision", "recall")
# How a figure names each metric.
METRIC_LABELS = {"fd": "FD", "is": "IS", "acc": "class accuracy", "precision": "precision", "recall": "recall"}
_SUITE_KEYS = {"root", "eval", "real", "curve", "runs"}
_RUN_KEYS = {"name", "recipe", "label", "overrides", "after", "evals", "seeds", "grid", "curve"}
_EVAL_KEYS = {"nfe", "guidance", "late", "yardstick", "sampler"}
_CURVE_KEYS = {"points", "steps", "num_samples", "full", "budget_minutes", "evals"}


@dataclass
class EvalPass:
    nfe: list[int]
    guidance: float | None = None
    late: bool = False
    yardstick: bool = False  # drawn as the reference line of curves.png (its value at the last step)
    sampler: str | None = None  # flow maps: "euler" / "restart" (None: the run's objective.sampler)


@dataclass
class Curve:
    """Where a run is scored during training: ``steps`` (each a numbered checkpoint kept by
    ``train.keep_steps``), on ``num_samples`` samples with each pass of ``evals``; ``full_steps`` are
    also scored on the suite's full sample count. ``budget_minutes`` maps steps to minutes of the
    run's budget (step / train.steps × budget). ``schedule`` says why a point before the last differs
    from a run that stopped there ("" when it does not)."""

    steps: list[int]
    num_samples: int
    evals: list[EvalPass]
    full_steps: list[int] = field(default_factory=list)
    budget_minutes: float | None = None
    schedule: str = ""


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
    curve: Curve | None = None
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

    def metric_names(self) -> list[str]:
        return [str(m) for m in self.eval.get("metrics") or METRIC_COLUMNS]

    def num_samples(self, run: SuiteRun) -> int:
        return int(self.eval.get("num_samples") or run.cfg.eval.num_samples)

    def eval_seed(self, run: SuiteRun) -> int:
        return int(self.eval.get("seed", run.cfg.eval.seed))


def table_labels(runs) -> dict[str, str]:
    """{run name: its name in the tables' method column}: its label, followed by the run's name where
    other runs share that label (the seeds of one method), so that every row says which run it is."""
    count: dict[str, int] = {}
    for run in runs:
        count[run.label] = count.get(run.label, 0) + 1
    return {run.name: f"{run.label} ({run.name})" if count[run.label] > 1 else run.label for run in runs}


def _fmt(items: list[str], root: Path) -> list[str]:
    return [str(x).replace("{root}", str(root)) for x in items]


def _read_suite_file(path: Path) -> dict[str, Any]:
    try:
        raw = yamlio.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the suite file ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("runs"), list) or not raw["runs"]:
        raise ConfigError(f"{path}: a suite is a mapping with 'runs' (a list of {{name, recipe, ...}})")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown suite key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_SUITE_KEYS))}"
        )
    for key in ("eval", "curve"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: '{key}' is a mapping, got {raw[key]!r}")
    if raw.get("real") is not None and not (
        isinstance(raw["real"], list) and all(s in ("train", "test") for s in raw["real"])
    ):
        raise ConfigError(f"{path}: 'real' is a list of splits (train, test), got {raw['real']!r}")
    return raw


def _has_samplers(objective: str | None) -> bool:
    """Whether the objective samples as a flow map with a choice of sampler (``flow_map``)."""
    from onestep.registry import OBJECTIVES

    try:
        return hasattr(OBJECTIVES.get(str(objective)), "set_sampler")
    except ConfigError:
        return False


def _is_recipe_file(path: Path) -> bool:
    """A YAML file that is a recipe (recipe sections, no ``runs``) rather than a suite."""
    try:
        raw = yamlio.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False  # _read_suite_file says what is wrong
    recipe_keys = {"data", "backbone", "objective", "train", "base"}
    return isinstance(raw, dict) and "runs" not in raw and bool(recipe_keys & set(raw))


def _nfe_list(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ConfigError(f"{where}.nfe: a list of whole numbers >= 1, got {value!r}")
    return list(values)


def _eval_passes(entries: Any, cfg, where: str) -> list[EvalPass]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: a list of passes ({{nfe: [N, ...], guidance: W, late: true}}), got {entries!r}")
    passes = []
    for j, e in enumerate(entries):
        here = f"{where}[{j}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{here}: a mapping with keys {', '.join(sorted(_EVAL_KEYS))}, got {e!r}")
        if set(e) - _EVAL_KEYS:
            raise ConfigError(f"{here}: allowed keys are {', '.join(sorted(_EVAL_KEYS))}")
        guidance = e.get("guidance", cfg.eval.guidance)
        if isinstance(guidance, list):
            raise ConfigError(f"{here}: one guidance value per pass (add a pass per value)")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float)):
            raise ConfigError(f"{here}.guidance: a number, got {guidance!r}")
        nfe = _nfe_list(e["nfe"], here) if "nfe" in e else list(cfg.eval.nfe)
        sampler = e.get("sampler")
        if sampler not in (None, "euler", "restart"):
            raise ConfigError(f"{here}.sampler: euler or restart, got {sampler!r}")
        if sampler is not None and not _has_samplers(cfg.objective.get("name")):
            raise ConfigError(f"{here}.sampler: objective {cfg.objective.get('name')} has one sampler of its own")
        passes.append(EvalPass(nfe, guidance, bool(e.get("late", False)), bool(e.get("yardstick", False)), sampler))
    return passes


def _schedule_note(cfg) -> str:
    """Why a point before a run's last step is not the run that stopped there: a schedule set by the
    total number of steps (a cosine learning rate, iCT's discretisation curriculum, an α-Flow
    curriculum that ends at the run's last step, so that an earlier point is mid-curriculum while the
    same recipe stopped there would have finished it)."""
    notes = []
    if cfg.train.lr_schedule != "constant":
        notes.append(f"train.lr_schedule {cfg.train.lr_schedule} decays over train.steps")
    if "total_steps" in cfg.objective:
        notes.append("objective.total_steps sets its curriculum")
    alpha = cfg.objective.get("alpha_steps")
    if (
        isinstance(alpha, (list, tuple))
        and len(alpha) == 2
        and alpha[1] == cfg.train.steps
        and cfg.objective.get("alpha_start", 1.0) != cfg.objective.get("alpha_end", 0.0)
    ):
        notes.append(f"objective.alpha_steps anneals α until train.steps ({alpha[1]})")
    return "; ".join(notes)


def _curve(spec: Any, run_evals: list[EvalPass], cfg, where: str, suite_eval: dict) -> Curve | None:
    if spec is False or spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a mapping ({', '.join(sorted(_CURVE_KEYS))}) or false, got {spec!r}")
    bad = set(spec) - _CURVE_KEYS
    if bad:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(_CURVE_KEYS))}"
        )
    total = cfg.train.steps

    def as_steps(key: str) -> list[int]:
        values = spec.get(key) or []
        if not isinstance(values, list):
            raise ConfigError(f"{where}.{key}: a list, got {values!r}")
        out = []
        for v in values:
            ok_fraction = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
            if key == "steps":
                if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= total):
                    raise ConfigError(f"{where}.steps: whole numbers in 1..train.steps ({total}), got {v!r}")
                out.append(v)
            elif not ok_fraction:
                raise ConfigError(f"{where}.{key}: fractions of train.steps in (0, 1], got {v!r}")
            else:
                out.append(max(1, round(v * total)))
        return out

    steps = sorted(set(as_steps("points") + as_steps("steps")))
    if not steps:
        raise ConfigError(f"{where}: give the curve's 'points' (fractions of train.steps) or 'steps'")
    full = sorted(set(as_steps("full")))
    num = spec.get("num_samples", suite_eval.get("num_samples") or cfg.eval.num_samples)
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ConfigError(f"{where}.num_samples: a whole number >= 1, got {num!r}")
    budget = spec.get("budget_minutes")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
        raise ConfigError(f"{where}.budget_minutes: a positive number, got {budget!r}")
    evals = (
        _eval_passes(spec["evals"], cfg, f"{where}.evals")
        if "evals" in spec
        else [e for e in run_evals if not e.late] or run_evals[:1]
    )
    return Curve(steps, num, evals, full, None if budget is None else float(budget), _schedule_note(cfg))


def _check_reference(ref: Any, key: str, where: str, suite_dirs: set[Path]) -> None:
    """A teacher / init that is neither a run of the suite, nor a FORMAT:PATH spec, nor an existing path."""
    if not isinstance(ref, str) or ref.lower() in ("none", ""):
        return
    if Path(ref).resolve() in suite_dirs or ":" in ref or Path(ref).exists():
        return
    raise ConfigError(f"{where}: {key} '{ref}' is neither a run of this suite nor an existing run or checkpoint")


def load_suite(args: list[str], *, root: str | None = None, overrides: list[str] = ()) -> Suite:
    """A suite file, or recipes given directly. ``overrides`` apply to every run (after its own)."""
    path = Path(args[0]) if len(args) == 1 else None
    if path is not None and path.suffix in (".yaml", ".yml") and (path.is_file() or "/" in args[0]):
        if not path.is_file():
            raise ConfigError(f"{path}: no such suite file")
        raw = None if _is_recipe_file(path) else _read_suite_file(path)
    else:
        raw = None
    if raw is not None:
        source, entries = str(path), raw["runs"]
    else:
        raw, source = {}, " ".join(args)
        entries = [{"name": Path(find_recipe(a)).stem, "recipe": a} for a in args]
    base = Path(root or raw.get("root") or "runs/suite")
    suite_eval = dict(raw.get("eval") or {})
    suite_curve = raw.get("curve")
    runs, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{source}: runs[{i}]"
        if not isinstance(entry, dict) or "recipe" not in entry:
            raise ConfigError(f"{where}: each run is a mapping with at least 'recipe', got {entry!r}")
        bad = set(entry) - _RUN_KEYS
        if bad:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(_RUN_KEYS))}"
            )
        name = str(entry.get("name") or Path(str(entry["recipe"])).stem)
        where = f"{source}: runs[{i}] ({name})"
        if name in names:
            raise ConfigError(f"{where}: run name '{name}' is used twice")
        names.add(name)
        if not isinstance(entry.get("overrides") or [], list):
            raise ConfigError(f"{where}.overrides: a list of KEY=VALUE strings, got {entry['overrides']!r}")
        run_overrides = _fmt(list(entry.get("overrides") or []), base) + list(overrides)
        try:
            recipe_path = find_recipe(str(entry["recipe"]))
            cfg = from_dict(apply_overrides(load_yaml(recipe_path), run_overrides))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        evals = (
            _eval_passes(entry["evals"], cfg, f"{where}.evals") if "evals" in entry else _eval_passes([{}], cfg, where)
        )
        grid = entry.get("grid", {})
        if grid is not False and not isinstance(grid, dict | None):
            raise ConfigError(f"{where}.grid: a mapping ({{nfe: N, guidance: W}}) or false, got {grid!r}")
        in_figure, grid = grid is not False, grid or {}
        grid = EvalPass(
            _nfe_list(grid.get("nfe", evals[0].nfe[0]), f"{where}.grid")[:1], grid.get("guidance", evals[0].guidance)
        )
        curve_spec = entry.get("curve", suite_curve)
        if isinstance(entry.get("curve"), dict) and isinstance(suite_curve, dict):
            curve_spec = {**suite_curve, **entry["curve"]}  # a run's keys replace the suite's
        after = entry.get("after") or []
        if not isinstance(after, list):
            raise ConfigError(f"{where}.after: a list of run names, got {after!r}")
        runs.append(
            SuiteRun(
                name,
                str(recipe_path),
                str(entry.get("label") or name),
                run_overrides,
                [str(a) for a in after],
                evals,
                entry.get("seeds"),
                base / name,
                grid=grid,
                in_figure=in_figure,
                steps=cfg.train.steps,
                cfg=cfg,
                curve=_curve(curve_spec, evals, cfg, f"{where}.curve", suite_eval),
            )
        )
    by_dir = {r.dir.resolve(): r.name for r in runs}
    for i, r in enumerate(runs):  # a teacher or init run of the suite is a dependency
        where = f"{source}: runs[{i}] ({r.name})"
        for key, ref in (
            ("objective.teacher", r.cfg.objective.get("teacher")),
            ("train.init_from", r.cfg.train.init_from),
        ):
            _check_reference(ref, key, where, set(by_dir))
            if isinstance(ref, str) and Path(ref).resolve() in by_dir and by_dir[Path(ref).resolve()] != r.name:
                r.after.append(by_dir[Path(ref).resolve()])
        missing = [a for a in r.after if a not in names]
        if missing:
            raise ConfigError(f"{source}: run '{r.name}' waits for unknown run(s) {', '.join(missing)}")
    return Suite(base, runs, suite_eval, list(raw.get("real") or []), source)


_STEPS: dict[tuple[str, int, int], int | None] = {}


def trained_step(run: SuiteRun) -> int | None:
    """The step of the run's last checkpoint, or None (read once per version of the file)."""
    from onestep.utils.checkpoint import read_checkpoint_file

    last = RunDir(run.dir).last_checkpoint
    try:
        stat = last.stat()
    except OSError:
        return None
    key = (str(last.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _STEPS:
        try:
            _STEPS[key] = int(read_checkpoint_file(last, "cpu")["step"])
        except (ConfigError, KeyError, ValueError, OSError):
            return None
    return _STEPS[key]


def pass_sampler(run: SuiteRun, e: EvalPass) -> str:
    """The sampler a pass's rows carry: its own, else the run's ``objective.sampler`` (Euler when the
    objective has none: its rows carry no sampler)."""
    return e.sampler or run.cfg.objective.get("sampler") or "euler"


def metric_columns(suite: Suite, rows: list[dict[str, Any]]) -> list[str]:
    """The suite's ``eval.metrics``, else every metric the rows were scored with (their ``_metrics``),
    in order: each data kind has its own defaults (FD/IS/... for labeled images, sliced Wasserstein/...
    for toy data)."""
    if suite.eval.get("metrics"):
        return suite.metric_names()
    seen: dict[str, None] = {}
    for row in rows:
        for key in row.get("_metrics", ()):
            seen.setdefault(key)
    return list(seen)
