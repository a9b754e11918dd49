"""Learning curves of a suite: ``curves.csv`` / ``curves.md`` (method, step, minutes, NFE and the
metrics at each curve point) and ``curves.png`` (1-NFE FD on a log scale against minutes, one line per
run, a yardstick line; a second panel with class accuracy).

The points are scored from the checkpoints a run kept at its curve steps (``train.keep_steps``), by
separate ``onestep eval`` commands: scoring never touches the training process, its RNG streams or
its EMA. Minutes are minutes of the run's budget (step / train.steps × ``budget_minutes``) when the
suite gives one, else its measured training time up to that step.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from onestep.suite.spec import Suite, SuiteRun
from onestep.utils.atomic import atomic_write
from onestep.utils.rundir import RunDir

CURVE_METRICS = ("fd", "is", "acc", "precision", "recall")
COLUMNS = (
    "method",
    "run",
    "step",
    "budget_min",
    "train_min",
    "nfe",
    "guidance",
    "sampler",
    "num_samples",
    *CURVE_METRICS,
    "schedule",
)


def train_seconds_at(run_dir: Path, step: int | None = None) -> float | None:
    """Training wall time up to ``step`` (all of it for None) from stats.jsonl: ``time_s`` restarts at
    each resume, so the segments are summed; steps between log rows are interpolated."""
    rows = RunDir(run_dir).read_stats()
    if not rows:
        return None
    total, last_t, last_step = 0.0, 0.0, 0
    for row in rows:
        t, s = float(row.get("time_s", 0.0)), int(row.get("step", 0))
        if t < last_t:  # a resumed segment starts again from zero
            total += last_t
            last_t = 0.0
        if step is not None and s >= step:
            span = max(1, s - last_step)
            return total + last_t + (t - last_t) * (step - last_step) / span
        last_t, last_step = t, s
    return total + last_t


def curve_rows(suite: Suite) -> list[dict[str, Any]]:
    """One row per (run, step, NFE, guidance, sample count) scored at a curve point of the run."""
    out = []
    for run in suite.runs:
        if run.curve is None or not RunDir(run.dir).is_run():
            continue
        seed = suite.eval_seed(run)
        wanted = set(run.curve.steps) | set(run.curve.full_steps)
        groups: dict[tuple, dict[str, Any]] = {}
        for r in RunDir(run.dir).read_metrics():
            if r.get("step") not in wanted or r.get("seed") != seed or r.get("metric") not in CURVE_METRICS:
                continue
            sampler = "restart" if r.get("sampler") == "restart" else "euler"
            key = (r["step"], r["nfe"], r.get("guidance"), r["num_samples"], sampler)
            groups.setdefault(key, {})[r["metric"]] = r["value"]
        for (step, nfe, guidance, num, sampler), values in sorted(groups.items(), key=lambda kv: _order(kv[0])):
            secs = train_seconds_at(run.dir, step)
            budget = run.curve.budget_minutes
            out.append(
                {
                    "method": run.label,
                    "run": run.name,
                    "step": step,
                    "budget_min": None if budget is None else round(budget * step / run.steps, 3),
                    "train_min": None if secs is None else round(secs / 60, 2),
                    "nfe": nfe,
                    "guidance": guidance,
                    "sampler": sampler,
                    "num_samples": num,
                    **values,
                    "schedule": "" if step == run.steps else run.curve.schedule,
                }
            )
    return out


def _order(key: tuple) -> tuple:
    step, nfe, guidance, num, sampler = key
    return (nfe, guidance or 0.0, sampler, num, step)


def _num(v) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_curves(suite: Suite, echo=print) -> list[Path]:
    """Write ROOT/curves.csv, ROOT/curves.md and (with matplotlib) ROOT/curves.png; nothing when no run
    has a curve."""
    rows = curve_rows(suite)
    if not rows:
        return []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    root = suite.root
    atomic_write(root / "curves.csv", lambda f: f.write(buf.getvalue().encode()))
    head = ["method", "step", "budget min", "train min", "NFE", "guidance", "samples", *CURVE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " *" if r["schedule"] else ""
        nfe = str(r["nfe"]) + (" (restart)" if r["sampler"] == "restart" else "")
        cells = [r["method"], str(r["step"]) + mark, _num(r["budget_min"]), _num(r["train_min"]), nfe]
        cells += [_num(r["guidance"]), str(r["num_samples"]), *(_num(r.get(m)) for m in CURVE_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['method']}: {r['schedule']}" for r in rows if r["schedule"]})
    if notes:
        lines.append(
            "\n\\* a point before the run's last step that differs from a run stopped there: " + "; ".join(notes)
        )
    atomic_write(root / "curves.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    written = [root / "curves.csv", root / "curves.md"]
    try:
        written.append(plot_curves(suite, rows, root / "curves.png"))
    except ImportError:
        echo("[suite] curves.png not drawn: it needs matplotlib (pip install 'onestep[plot]')")
    return written


def _line_of(run: SuiteRun, rows: list[dict]) -> list[dict]:
    """The run's curve at its first curve pass (its first NFE and guidance), on the curve's sample count."""
    first = run.curve.evals[0]
    mine = [
        r
        for r in rows
        if r["run"] == run.name
        and r["nfe"] == first.nfe[0]
        and r["guidance"] == first.guidance
        and r["sampler"] == (first.sampler or "euler")
        and r["num_samples"] == run.curve.num_samples
    ]
    return sorted(mine, key=lambda r: r["step"])


def plot_curves(suite: Suite, rows: list[dict], path: Path) -> Path:
    """Two panels against minutes: FD (log scale) and class accuracy, one line per run at its first
    curve pass; a run's ``yardstick`` pass (its last step, full sample count) is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(13, 5))
    for run in suite.runs:
        if run.curve is None:
            continue
        line = _line_of(run, rows)
        if not line:
            continue
        x_key = "budget_min" if all(r["budget_min"] is not None for r in line) else "train_min"
        first = run.curve.evals[0]
        label = run.label + ("" if first.nfe[0] == 1 else f" ({first.nfe[0]} NFE")
        label += (
            "" if first.guidance is None else (", " if first.nfe[0] != 1 else " (") + f"guidance {first.guidance:g}"
        )
        label += "" if first.nfe[0] == 1 and first.guidance is None else ")"
        xs = [r[x_key] for r in line]
        for ax, metric in ((ax_fd, "fd"), (ax_acc, "acc")):
            pts = [(x, r[metric]) for x, r in zip(xs, line) if r.get(metric) is not None]
            if pts:
                (drawn,) = ax.plot(*zip(*pts), marker="o", markersize=3, label=label if ax is ax_fd else None)
                if run.curve.schedule:
                    ax.plot(*zip(*pts[:-1]), linestyle="none", marker="x", color=drawn.get_color())
    for run in suite.runs:
        stick = yardstick(suite, run)
        if stick is not None:
            ax_fd.axhline(stick["fd"], linestyle="--", color="gray", linewidth=1)
            ax_fd.text(
                0.01,
                stick["fd"],
                f" {stick['label']}",
                color="gray",
                fontsize=8,
                va="bottom",
                transform=ax_fd.get_yaxis_transform(),
            )
            if stick.get("acc") is not None:
                ax_acc.axhline(stick["acc"], linestyle="--", color="gray", linewidth=1)
    x_label = "minutes of the run's budget" if any(r["budget_min"] is not None for r in rows) else "training minutes"
    ax_fd.set_yscale("log")
    ax_fd.set(xlabel=x_label, ylabel="FD (lower is better)", title="1-NFE FD during training")
    ax_acc.set(xlabel=x_label, ylabel="class accuracy (higher is better)", title="class accuracy")
    for ax in (ax_fd, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
    ax_fd.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def yardstick(suite: Suite, run: SuiteRun) -> dict[str, Any] | None:
    """The run's late passes marked ``yardstick`` in the suite: FD and accuracy at its last step on the
    full sample count, with a label ("flow matching, 50 NFE, guidance 2")."""
    from onestep.suite.spec import trained_step

    marks = [e for e in run.evals if e.yardstick]
    if not marks:
        return None
    e, step, n = marks[0], trained_step(run), suite.num_samples(run)
    vals = {
        r["metric"]: r["value"]
        for r in RunDir(run.dir).read_metrics()
        if r.get("step") == step
        and r.get("num_samples") == n
        and r.get("nfe") == e.nfe[0]
        and r.get("guidance") == e.guidance
    }
    if "fd" not in vals:
        return None
    guided = "" if e.guidance is None else f", guidance {e.guidance:g}"
    return {"fd": vals["fd"], "acc": vals.get("acc"), "label": f"{run.label}, {e.nfe[0]} NFE{guided}"}
