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

from onestep.suite.spec import METRIC_LABELS as LABELS
from onestep.suite.spec import Suite, SuiteRun, metric_columns, pass_sampler, table_labels
from onestep.utils.atomic import atomic_write
from onestep.utils.rundir import RunDir

HEAD = ("method", "run", "step", "budget_min", "train_min", "nfe", "guidance", "sampler", "num_samples")


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
        higher: dict[str, bool] = {}
        groups: dict[tuple, dict[str, Any]] = {}
        for r in RunDir(run.dir).read_metrics():
            if r.get("step") not in wanted or r.get("seed") != seed or "metric" not in r:
                continue
            sampler = "restart" if r.get("sampler") == "restart" else "euler"
            key = (r["step"], r["nfe"], r.get("guidance"), r["num_samples"], sampler)
            values = groups.setdefault(key, {"_metrics": []})
            values[r["metric"]] = r["value"]
            values["_metrics"].append(r["metric"])
            higher[r["metric"]] = bool(r.get("higher_is_better"))
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
                    "_higher": higher,
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
    metrics = metric_columns(suite, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*HEAD, *metrics, "schedule"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    root = suite.root
    atomic_write(root / "curves.csv", lambda f: f.write(buf.getvalue().encode()))
    head = ["method", "step", "budget min", "train min", "NFE", "guidance", "samples", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = table_labels(suite.runs)
    for r in rows:
        mark = " *" if r["schedule"] else ""
        nfe = str(r["nfe"]) + (" (restart)" if r["sampler"] == "restart" else "")
        cells = [labels[r["run"]], str(r["step"]) + mark, _num(r["budget_min"]), _num(r["train_min"]), nfe]
        cells += [_num(r["guidance"]), str(r["num_samples"]), *(_num(r.get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['method']}: {r['schedule']}" for r in rows if r["schedule"]})
    if notes:
        lines.append(
            "\n\\* a point before the run's last step that differs from a run stopped there: " + "; ".join(notes)
        )
    lines += standings(suite, rows, metrics)
    lines += budget_tables(suite, rows, metrics)
    atomic_write(root / "curves.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    written = [root / "curves.csv", root / "curves.md"]
    try:
        written.append(plot_curves(suite, rows, root / "curves.png", metrics))
    except ImportError:
        echo("[suite] curves.png not drawn: it needs matplotlib (pip install 'onestep[plot]')")
    return written


def _higher(rows: list[dict]) -> dict[str, bool]:
    """Whether each metric of the rows is better higher (from their metric rows' ``higher_is_better``)."""
    return {k: v for r in rows for k, v in r.get("_higher", {}).items()}


def _point(row: dict) -> float:
    """The budget point a row belongs to: its minutes to 0.1 (DMF's 114 of 1820 steps is 3.758 minutes,
    MeanFlow's 225 of 3600 is 3.75: one point)."""
    return round(float(row["budget_min"]), 1)


def _shown_minutes(rows) -> str:
    """A point's minutes as its runs give them (3.75, not the grouping key of ``_point``, 3.8)."""
    return _num(min(float(r["budget_min"]) for r in rows))


def _better(metric: str, higher: dict[str, bool]):
    """Sort key putting the best value of ``metric`` first."""
    sign = -1.0 if higher.get(metric) else 1.0
    return lambda item: sign * item[1]


def standings(suite: Suite, rows: list[dict], metrics: list[str]) -> list[str]:
    """Markdown that reads the curves for a reader: which method leads at each point of the budget at
    one step (each run's first curve pass where it is 1 NFE: one network call, so iMF's guidance input
    counts and flow matching's guided passes do not; the curve's sample count; the runs of a ``seeds``
    group are averaged), and how each run's curve moved between its last two points. Points marked as
    differing from a run stopped there (mid-curriculum) do not compete."""
    shown = panels(metrics)
    curve_n = {run.name: run.curve.num_samples for run in suite.runs if run.curve is not None}
    one = [  # each run's line of the figure (its first curve pass) where that pass is one step
        r
        for run in suite.runs
        if run.curve is not None
        for r in _line_of(run, rows)
        if r["nfe"] == 1 and r["budget_min"] is not None
    ]
    if not shown or not one:
        return []
    higher = _higher(rows)
    points: dict[float, dict[str, list[dict]]] = {}
    group_of = {run.name: run.seeds or run.name for run in suite.runs}
    for r in one:  # runs of one seeds group are averaged; other runs stand alone, even under one label
        if not r["schedule"]:
            points.setdefault(_point(r), {}).setdefault(group_of[r["run"]], []).append(r)
    counts = "/".join(sorted({str(n) for n in curve_n.values()}))
    lines = [
        "",
        f"Who leads at each point of the budget (1 NFE, {counts} samples):",
        "",
        "| minutes | " + " | ".join(f"best {LABELS.get(m, m)} (next)" for m in shown) + " |",
        "|" + "---|" * (1 + len(shown)),
    ]
    for minute in sorted(points):
        cells = [_shown_minutes(r for group in points[minute].values() for r in group)]
        for metric in shown:
            means = []
            for group in points[minute].values():
                vals = [float(r[metric]) for r in group if r.get(metric) not in (None, "")]
                if vals:
                    name = group[0]["method"] + (f" (mean of {len(vals)})" if len(vals) > 1 else "")
                    means.append((name, sum(vals) / len(vals)))
            ranked = sorted(means, key=_better(metric, higher))
            cell = " ".join(f"{name} {_num(v)}" for name, v in ranked[:1])
            if len(ranked) > 1:
                cell += f" ({ranked[1][0]} {_num(ranked[1][1])})"
            cells.append(cell or "—")
        lines.append("| " + " | ".join(cells) + " |")
    marked = sorted({r["method"] for r in one if r["schedule"]})
    if marked:
        lines.append(f"\nLeft out before their last step (mid-schedule, marked \\*): {', '.join(marked)}.")
    metric = shown[0]
    lines += ["", f"How each curve ends (1 NFE, {LABELS.get(metric, metric)} at its last two points):", ""]
    lines += ["| run | minutes | " + f"{LABELS.get(metric, metric)} | change |", "|---|---|---|---|"]
    for run in suite.runs:
        mine = [r for r in one if r["run"] == run.name and r.get(metric) not in (None, "")]
        mine.sort(key=lambda r: r["step"])
        if len(mine) < 2:
            continue
        a, b = mine[-2], mine[-1]
        va, vb = float(a[metric]), float(b[metric])
        improved = (vb > va) if higher.get(metric) else (vb < va)
        trend = "still improving" if improved else "not improving"
        change = f"{100 * (vb - va) / abs(va):+.0f} % ({trend})" if va else "—"
        if a["schedule"]:
            change += ", from a mid-schedule point \\*"
        minutes = f"{_num(a['budget_min'])} → {_num(b['budget_min'])}"
        lines.append(f"| {run.label} ({run.name}) | {minutes} | {_num(va)} → {_num(vb)} | {change} |")
    return lines


def budget_tables(suite: Suite, rows: list[dict], metrics: list[str]) -> list[str]:
    """Markdown: one table per point of the budget scored on more samples than the curve (``full``
    points and the last step): every run's passes there, so the 15-minute and 1-hour tables come
    straight from the curves."""
    curve_n = {run.name: run.curve.num_samples for run in suite.runs if run.curve is not None}
    order = {run.name: i for i, run in enumerate(suite.runs)}
    full = [r for r in rows if r["budget_min"] is not None and r["num_samples"] != curve_n.get(r["run"])]
    points: dict[float, list[dict]] = {}
    for r in full:
        points.setdefault(_point(r), []).append(r)
    lines = []
    head = ["method", "step", "NFE", "guidance", "samples", *(LABELS.get(m, m) for m in metrics)]
    labels = table_labels(suite.runs)
    for minute in sorted(points):
        lines += ["", f"At {_shown_minutes(points[minute])} minutes of the budget:", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        group = sorted(points[minute], key=lambda r: (order[r["run"]], r["nfe"], r["guidance"] or 0.0, r["sampler"]))
        for r in group:
            nfe = str(r["nfe"]) + (" (restart)" if r["sampler"] == "restart" else "")
            step = str(r["step"]) + (" *" if r["schedule"] else "")
            cells = [labels[r["run"]], step, nfe, _num(r["guidance"]), str(r["num_samples"])]
            lines.append("| " + " | ".join(cells + [_num(r.get(m)) for m in metrics]) + " |")
    return lines


def _line_of(run: SuiteRun, rows: list[dict]) -> list[dict]:
    """The run's curve at its first curve pass (its first NFE, guidance and sampler), on the curve's
    sample count."""
    first = run.curve.evals[0]
    mine = [
        r
        for r in rows
        if r["run"] == run.name
        and r["nfe"] == first.nfe[0]
        and r["guidance"] == first.guidance
        and r["sampler"] == pass_sampler(run, first)
        and r["num_samples"] == run.curve.num_samples
    ]
    return sorted(mine, key=lambda r: r["step"])


def panels(metrics: list[str]) -> list[str]:
    """The figure's metrics: the first one (FD for labeled images) and class accuracy, or the second."""
    second = "acc" if "acc" in metrics[1:] else (metrics[1] if len(metrics) > 1 else None)
    return [m for m in (metrics[0] if metrics else None, second) if m]


def curve_series(suite: Suite, rows: list[dict], metrics: list[str]) -> list[dict[str, Any]]:
    """The figure's lines: one per run at its first curve pass, or one per ``seeds`` group: for each
    metric (xs, mean, low, high) over the points every run of the group reached (x: minutes of the
    budget, else measured training minutes), with its label, run count and schedule mark."""
    groups: dict[str, list[tuple[SuiteRun, list[dict]]]] = {}
    for run in suite.runs:
        line = _line_of(run, rows) if run.curve is not None else []
        if line:
            groups.setdefault(run.seeds or run.name, []).append((run, line))
    out = []
    for members in groups.values():
        run = members[0][0]
        x_key = "budget_min" if all(r["budget_min"] is not None for _, line in members for r in line) else "train_min"
        first = run.curve.evals[0]
        how = ([f"{first.nfe[0]} NFE"] if first.nfe[0] != 1 else []) + (
            [f"guidance {first.guidance:g}"] if first.guidance is not None else []
        )
        if len(members) > 1:
            how.append(f"{len(members)} seeds: mean and range")
        series: dict[str, Any] = {
            "label": run.label + (f" ({', '.join(how)})" if how else ""),
            "runs": len(members),
            "schedule": run.curve.schedule,
        }
        for metric in metrics:
            # keyed by step: measured training minutes differ between seeds at the same step
            per = [{r["step"]: r for r in line if r.get(metric) not in (None, "")} for _, line in members]
            steps = sorted(set.intersection(*(set(d) for d in per)))
            values = [[float(d[step][metric]) for d in per] for step in steps]
            series[metric] = (
                [sum(float(d[step][x_key]) for d in per) / len(per) for step in steps],
                [sum(v) / len(v) for v in values],
                [min(v) for v in values],
                [max(v) for v in values],
            )
        out.append(series)
    return out


def plot_curves(suite: Suite, rows: list[dict], path: Path, metrics: list[str]) -> Path:
    """One panel per metric of ``panels`` against minutes (the first on a log scale when lower is
    better), one line per run at its first curve pass (runs of one ``seeds`` group: their mean at the
    points they all reached, their range shaded); a run's ``yardstick`` pass (its last step, full
    sample count) is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels(metrics)
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 5), squeeze=False)
    axes = dict(zip(shown, axes[0]))
    higher = _higher(rows)
    for series in curve_series(suite, rows, shown):
        for metric, ax in axes.items():
            xs, mean, low, high = series[metric]
            if not xs:
                continue
            label = series["label"] if metric == shown[0] else None
            (drawn,) = ax.plot(xs, mean, marker="o", markersize=3, label=label)
            if series["runs"] > 1:
                ax.fill_between(xs, low, high, color=drawn.get_color(), alpha=0.2, linewidth=0)
            if series["schedule"]:
                ax.plot(xs[:-1], mean[:-1], linestyle="none", marker="x", color=drawn.get_color())
    for run in suite.runs:
        stick = yardstick(suite, run)
        for metric, ax in axes.items():
            if stick is not None and stick["values"].get(metric) is not None:
                value = stick["values"][metric]
                ax.axhline(value, linestyle="--", color="gray", linewidth=1)
                ax.text(
                    0.01,
                    value,
                    f" {stick['label']}",
                    color="gray",
                    fontsize=8,
                    va="bottom",
                    transform=ax.get_yaxis_transform(),
                )
    x_label = "minutes of the run's budget" if any(r["budget_min"] is not None for r in rows) else "training minutes"
    for metric, ax in axes.items():
        better = "higher" if higher.get(metric) else "lower"
        ax.set(xlabel=x_label, ylabel=f"{LABELS.get(metric, metric)} ({better} is better)")
        ax.set_title(f"{LABELS.get(metric, metric)} during training")
        ax.grid(True, which="both", alpha=0.3)
    first_ax = axes[shown[0]]
    if not higher.get(shown[0]) and all(r.get(shown[0], 1) > 0 for r in rows if r.get(shown[0]) is not None):
        first_ax.set_yscale("log")
    first_ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def yardstick(suite: Suite, run: SuiteRun) -> dict[str, Any] | None:
    """The run's first pass marked ``yardstick``: its metrics at the last step on the full sample
    count, with a label ("flow matching, 50 NFE, guidance 2")."""
    from onestep.suite.spec import trained_step

    marks = [e for e in run.evals if e.yardstick]
    if not marks:
        return None
    e, step, n = marks[0], trained_step(run), suite.num_samples(run)
    values = {
        r["metric"]: r["value"]
        for r in RunDir(run.dir).read_metrics()
        if r.get("step") == step
        and r.get("num_samples") == n
        and r.get("nfe") == e.nfe[0]
        and r.get("guidance") == e.guidance
        and (r.get("sampler") or "euler") == pass_sampler(run, e)
    }
    if not values:
        return None
    guided = "" if e.guidance is None else f", guidance {e.guidance:g}"
    return {"values": values, "label": f"{run.label}, {e.nfe[0]} NFE{guided}"}
