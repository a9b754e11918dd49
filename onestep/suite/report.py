"""The suite's tables: ``results.md`` / ``results.csv``, ``seeds.md`` and the combined sample figure."""

from __future__ import annotations

import csv
import io
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

from onestep.registry import ConfigError
from onestep.suite.spec import METRIC_COLUMNS, METRIC_LABELS, Suite, metric_columns, table_labels, trained_step
from onestep.utils.atomic import atomic_write
from onestep.utils.rundir import RunDir, read_jsonl


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


def result_rows(suite: Suite) -> list[dict[str, Any]]:
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
            "status": run.status if run.status != "pending" else training_status(run),
        }
        step = trained_step(run)
        metrics = [
            r
            for r in RunDir(run.dir).read_metrics()
            if r.get("step") == step and r.get("num_samples") == suite.num_samples(run)
        ]

        def key(r: dict) -> tuple:
            return (r["nfe"], r.get("guidance"), "restart" if r.get("sampler") == "restart" else "")

        keys = sorted({key(r) for r in metrics}, key=lambda k: (k[1] or 0, k[2], k[0]))
        if not keys:
            rows.append({**base, "nfe": None, "guidance": None})
        for nfe, guidance, sampler in keys:
            # The restart sampler's rows are their own row: "2 (restart)".
            row = {**base, "nfe": f"{nfe} (restart)" if sampler else nfe, "guidance": guidance, "_metrics": []}
            for r in metrics:
                if key(r) == (nfe, guidance, sampler):
                    row[r["metric"]] = r["value"]
                    row["_metrics"].append(r["metric"])
            rows.append(row)
    return rows


def training_status(run) -> str:
    """ "trained" (its last checkpoint is at train.steps), "at step K of N" (cut) or "pending"."""
    step = trained_step(run)
    if step is None:
        return "pending"
    return "trained" if step >= run.steps else f"at step {step} of {run.steps}"


def _num(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


HEADINGS = {"fd": "FD ↓", "is": "IS ↑", "acc": "acc ↑", "precision": "precision ↑", "recall": "recall ↑"}


def _heading(metric: str, higher: dict[str, bool]) -> str:
    if metric in HEADINGS:
        return HEADINGS[metric]
    return metric + ({True: " ↑", False: " ↓"}.get(higher.get(metric), ""))


def write_results(suite: Suite, echo=print) -> None:
    rows = result_rows(suite)
    real = read_jsonl(suite.root / "real.jsonl")
    columns = metric_columns(suite, rows) or list(METRIC_COLUMNS)
    higher = {
        r["metric"]: bool(r.get("higher_is_better"))
        for run in suite.runs
        for r in RunDir(run.dir).read_metrics()
        if "metric" in r
    }
    cols = ["method", "run", "nfe", "guidance", *columns, "train_min", "params", "images_per_s", "status"]
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
    head = ["method", "NFE", "guidance", *(_heading(m, higher) for m in columns), "train min", "params", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = table_labels(suite.runs)
    for r in rows:
        method = labels[r["run"]]
        cells = [method + ("" if r["status"] == "trained" else f" ({r['status']})"), _num(r["nfe"])]
        cells += [_num(r["guidance"]), *(_num(r.get(m)) for m in columns)]
        cells += [_num(r["train_min"]), _num(r["params"]), _num(r["images_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    for split in sorted({r["weights"] for r in real}):
        vals = {r["metric"]: r["value"] for r in real if r["weights"] == split}
        cells = [f"real images ({split.split(':')[1]} split)", "—", "—", *(_num(vals.get(m)) for m in columns)]
        lines.append("| " + " | ".join(cells + ["—", "—", "—"]) + " |")
    impl = sorted(
        {
            f"{r['metric']}: {r['implementation']}"
            for run in suite.runs
            for r in RunDir(run.dir).read_metrics()
            if r.get("metric") in columns[:1] and r.get("implementation")
        }
    )
    notes = [f"\n{i}" for i in impl[:3]]
    groups = {r.name: r.seeds for r in suite.runs if r.seeds}
    seeds = seeds_table(rows, groups)
    timing = suite_wall_time(suite.root)
    text = "\n".join(lines) + "\n" + "".join(notes) + "\n" + (f"\n{timing}\n" if timing else "") + seeds
    atomic_write(suite.root / "results.md", lambda f: f.write(text.encode()))
    atomic_write(suite.root / "seeds.md", lambda f: f.write(seeds.encode()))
    by_group = seed_groups(rows, groups)
    if any(len(rs) > 1 for rs in by_group.values()):
        try:
            plot_seeds(by_group, suite.root / "seeds.png")
        except ImportError:
            echo("[suite] seeds.png not drawn: it needs matplotlib (pip install 'onestep[plot]')")
    first_of_group = {}
    for r in suite.runs:
        if r.in_figure:
            first_of_group.setdefault(r.seeds or r.name, r)
    figure = [
        (r.label + (f" ({r.grid.nfe[0]} NFE)" if r.grid.nfe[0] != 1 else ""), r.dir, r.grid.nfe[0], r.grid.guidance)
        for r in first_of_group.values()
        if training_status(r) == "trained"  # finished runs only: a cut run's samples are not its result
    ]
    if figure:
        try:
            from onestep.suite.grids import combined_grid

            names = list(getattr(suite.runs[0].cfg, "class_names", None) or [])
            combined_grid(figure, suite.root / "grid.png", class_names=names or None)
        except (ConfigError, OSError, ValueError, RuntimeError) as exc:
            echo(f"[suite] combined grid failed: {exc}")
    from onestep.suite.curves import write_curves

    write_curves(suite, echo=echo)


def suite_wall_time(root: Path) -> str:
    """One line on the suite's wall time from ROOT/suite.jsonl: the sum over its invocations of each
    one's span from its start to its last recorded event (an invocation killed without a word counts
    to its last event), how many, since when and at which commits; "" without a log."""
    from datetime import datetime

    spans: list[dict[str, Any]] = []
    for row in read_jsonl(Path(root) / "suite.jsonl"):
        try:
            when = datetime.fromisoformat(row["time"])
        except (KeyError, TypeError, ValueError):
            continue
        if row.get("event") == "start":
            spans.append({"start": when, "last": when, "commit": row.get("commit"), "closed": False})
        elif spans:
            spans[-1]["last"] = max(spans[-1]["last"], when)
            spans[-1]["closed"] |= row.get("event") in ("end", "stopped")
    if not spans:
        return ""
    hours = sum((s["last"] - s["start"]).total_seconds() for s in spans) / 3600
    commits = list(dict.fromkeys(s["commit"] for s in spans if s["commit"]))
    cut = sum(not s["closed"] for s in spans)
    text = (
        f"Suite wall time: {hours:.2f} h over {len(spans)} invocation{'s' * (len(spans) != 1)} since "
        f"{spans[0]['start']:%Y-%m-%d %H:%M} UTC (suite.jsonl)"
    )
    if commits:
        text += f", commits {', '.join(commits)}"
    if cut:
        text += f"; {cut} without a record of its end (running, or killed) count{'s' * (cut == 1)} to the last event"
    return text + "."


SEED_METRICS = ("fd", "acc", "precision", "recall")


def seed_groups(rows: list[dict], groups: dict[str, str]) -> dict[str, list[dict]]:
    """Each ``seeds`` group's runs, one result row per run: its first 1-NFE row with an FD (rows come
    sorted by guidance), in the suite's order."""
    by_group: dict[str, list[dict]] = {}
    counted: set[str] = set()
    for r in rows:
        group = groups.get(r["run"])
        if group and r.get("nfe") == 1 and r.get("fd") is not None and r["run"] not in counted:
            counted.add(r["run"])
            by_group.setdefault(group, []).append(r)
    return by_group


def seeds_table(rows: list[dict], groups: dict[str, str]) -> str:
    """Mean ± sample std (over runs sharing a ``seeds`` group) of FD, accuracy, precision and recall at
    1 NFE; a group with one finished run shows that run's value marked "(1 run)". Below it, for each
    pair of groups with two or more runs each, Welch's t-test p-value of each difference."""
    by_group = seed_groups(rows, groups)
    if not by_group:
        return ""
    out = [
        "",
        "| seeds group | runs | FD ↓ (mean ± std) | acc ↑ (mean ± std) | precision ↑ (mean ± std) "
        "| recall ↑ (mean ± std) |",
        "|---|---|---|---|---|---|",
    ]
    for group, rs in by_group.items():
        cells = []
        for m in SEED_METRICS:
            vals = _values(rs, m)
            if len(vals) > 1:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
            else:  # one run has no spread: its value alone, not a std of 0
                cells.append(f"{vals[0]:.3f} (1 run)" if vals else "—")
        out.append(f"| {group} | {', '.join(r['run'] for r in rs)} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for i, a in enumerate(by_group) for b in list(by_group)[i + 1 :]]
    tests = [welch_row(a, b, by_group[a], by_group[b]) for a, b in pairs]
    tests = [t for t in tests if t]
    if tests:
        out += ["", "| groups | " + " | ".join(f"{m}: difference (p)" for m in SEED_METRICS) + " |"]
        out += ["|---|" + "---|" * len(SEED_METRICS), *tests]
        out.append("\np: Welch's two-sided t-test over the seeds (unequal variances); few seeds give little power.")
    return "\n".join(out) + "\n"


def _values(rows: list[dict], metric: str) -> list[float]:
    return [float(r[metric]) for r in rows if r.get(metric) is not None]


def welch_p(va: list[float], vb: list[float]) -> float:
    """Welch's two-sided t-test p-value of two samples (nan when neither has spread)."""
    from scipy import stats

    with warnings.catch_warnings():  # identical values in both groups: no spread, p is nan
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(vb, va, equal_var=False).pvalue)


def seeds_panel_title(by_group: dict[str, list[dict]], metric: str) -> str:
    """A seeds.png panel's title: the metric, and Welch's p of the last group against the first when
    both have two or more runs."""
    title = f"{METRIC_LABELS.get(metric, metric)} (1 NFE)"
    names = list(by_group)
    first, last = _values(by_group[names[0]], metric), _values(by_group[names[-1]], metric)
    if len(names) > 1 and len(first) > 1 and len(last) > 1:
        p = welch_p(first, last)
        title += f"\n{names[-1]} vs {names[0]}: Welch p = {p:.2g}" if math.isfinite(p) else "\nno spread"
    return title


def plot_seeds(by_group: dict[str, list[dict]], path: Path) -> Path:
    """``seeds.png``: one panel per metric of ``SEED_METRICS``, one column per seeds group: each run
    as a dot, the group's mean ± sample std as a bar; a panel's title
    gives Welch's p of the last group against the first when both have two or more runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_group)
    fig, axes = plt.subplots(1, len(SEED_METRICS), figsize=(3.2 * len(SEED_METRICS), 3.6), squeeze=False)
    for ax, m in zip(axes[0], SEED_METRICS):
        for i, g in enumerate(names):
            vals = _values(by_group[g], m)
            offsets = [0.08 * (k - (len(vals) - 1) / 2) for k in range(len(vals))]
            ax.plot([i + o for o in offsets], vals, "o", markersize=4, alpha=0.7)
            if len(vals) > 1:
                mean, std = statistics.mean(vals), statistics.stdev(vals)
                ax.errorbar([i + 0.3], [mean], yerr=[std], fmt="_", color="black", capsize=4, markersize=12)
        title = seeds_panel_title(by_group, m)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("per seed (dots) and mean ± std (bars)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def welch_row(a: str, b: str, rows_a: list[dict], rows_b: list[dict]) -> str:
    """One markdown row: mean(b) - mean(a) of each metric and Welch's p-value; "" when either group has
    fewer than two runs."""
    cells = []
    for m in SEED_METRICS:
        va, vb = _values(rows_a, m), _values(rows_b, m)
        if len(va) < 2 or len(vb) < 2:
            return ""
        p = welch_p(va, vb)
        diff = statistics.mean(vb) - statistics.mean(va)
        cells.append(f"{diff:+.3f} (p={p:.2g})" if math.isfinite(p) else f"{diff:+.3f} (no spread)")
    return f"| {b} − {a} | " + " | ".join(cells) + " |"
