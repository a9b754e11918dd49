"""Training curves (loss terms, lr, grad norm), metric-vs-step plots and, for guidance sweeps of
guidance-conditioned models (``onestep eval --guidance 1,2,4,8``), metric-vs-ω plots as PNG
(matplotlib extra)."""

from __future__ import annotations

from pathlib import Path

from onestep.registry import ConfigError
from onestep.utils.rundir import RunDir


def plot_runs(runs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """One PNG of training curves and one of metrics vs step, each with a line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("onestep plot needs matplotlib: pip install 'onestep[plot]'") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {RunDir(r).name: RunDir(r).read_stats() for r in runs}
    metrics = {RunDir(r).name: RunDir(r).read_metrics() for r in runs}
    if not any(stats.values()):
        raise ConfigError(f"no {RunDir.STATS} rows in {', '.join(map(str, runs))}")
    written = [_stacked_plot(plt, training_panels(stats), out_dir / "training.png")]
    panels = metric_panels(metrics)
    if panels:
        written.append(_stacked_plot(plt, panels, out_dir / "metrics.png", marker="o"))
    sweeps = guidance_sweeps(metrics)
    if sweeps:
        written.append(_stacked_plot(plt, sweeps, out_dir / "guidance.png", marker="o", xlabel="guidance scale ω"))
    return written


TRAINING_KEYS = ("grad_norm", "lr", "mse")
TRAINING_PREFIXES = ("loss", "feature_rms")  # loss terms; a regularizer's feature scale (feature_rms_<name>)


def training_panels(stats: dict[str, list[dict]]) -> dict[str, dict[str, list[tuple]]]:
    """{stats key: {run: [(step, value), ...]}} for the plotted keys of stats.jsonl: every loss term,
    each regularizer's feature RMS, grad norm, lr and the per-sample MSE."""
    keys = sorted(
        {
            k
            for rows in stats.values()
            for row in rows
            for k in row
            if k.startswith(TRAINING_PREFIXES) or k in TRAINING_KEYS
        }
    )
    return {
        key: {name: [(r["step"], r[key]) for r in rows if key in r] for name, rows in stats.items()} for key in keys
    }


# What makes two metrics.jsonl rows of one run, metric and NFE different measurements: a learning curve
# scored on 2 000 samples beside a final 10 000, guided and unguided passes, another sampler or weights.
_SETTING = (
    ("num_samples", lambda v: f"{v:,} samples".replace(",", " ")),
    ("guidance", lambda v: "unguided" if v is None else f"ω={v:g}"),
    ("sampler", lambda v: v or "euler"),
    ("weights", lambda v: f"{v} weights"),
    ("seed", lambda v: f"sampling seed {v}"),
)


def _setting(row: dict) -> tuple:
    return tuple(row.get(k) for k, _ in _SETTING)


def metric_panels(metrics: dict[str, list[dict]]) -> dict[str, dict[str | tuple[str, str], list[tuple]]]:
    """{metric@nfe: {line: [(step, value), ...]}} from each run's metrics.jsonl rows. A run whose rows
    come from several settings (``_SETTING``: sample count, guidance, sampler, weights, sampling seed)
    gets one line per setting, keyed (run, what differs within that run, e.g. "2 000 samples"), the
    same words in every panel and its most frequent setting first, instead of one line zig-zagging
    between them; a run with one setting is keyed by its name."""
    settings: dict[str, dict[tuple, str]] = {}  # run -> {setting: its words}, most frequent first
    for name, rows in metrics.items():
        count: dict[tuple, int] = {}
        for r in rows:
            count[_setting(r)] = count.get(_setting(r), 0) + 1
        varies = [i for i in range(len(_SETTING)) if len({key[i] for key in count}) > 1]
        settings[name] = {
            key: ", ".join(_SETTING[i][1](key[i]) for i in varies) for key in sorted(count, key=lambda k: -count[k])
        }
    panels: dict[str, dict] = {}
    for metric, nfe in sorted({(r["metric"], r["nfe"]) for rows in metrics.values() for r in rows}):
        panel = panels[f"{metric}@{nfe}"] = {}
        for name, rows in metrics.items():
            mine = [r for r in rows if r["metric"] == metric and r["nfe"] == nfe]
            if len(settings[name]) <= 1:
                panel[name] = sorted((r["step"], r["value"]) for r in mine)
                continue
            by_setting: dict[tuple, list] = {}
            for r in mine:
                by_setting.setdefault(_setting(r), []).append((r["step"], r["value"]))
            for key, what in settings[name].items():
                if key in by_setting:
                    panel[(name, what)] = sorted(by_setting[key])
    return panels


def guidance_sweeps(metrics: dict[str, list[dict]]) -> dict[str, dict[str, list[tuple]]]:
    """{metric@nfe: {run (interval): [(ω, value), ...]}} from each run's latest step with guided rows,
    for series with at least two guidance values (the last row per ω wins)."""
    panels: dict[str, dict[str, list[tuple]]] = {}
    for name, rows in metrics.items():
        guided = [r for r in rows if r.get("guidance") is not None]
        if not guided:
            continue
        step = max(r.get("step", 0) for r in guided)
        series: dict[tuple, dict[float, float]] = {}
        for r in guided:
            if r.get("step", 0) == step:
                interval = tuple(r.get("guidance_interval") or (0.0, 1.0))
                series.setdefault((r["metric"], r["nfe"], interval), {})[float(r["guidance"])] = r["value"]
        for (metric, nfe, interval), points in series.items():
            if len(points) < 2:
                continue
            label = name if interval == (0.0, 1.0) else f"{name} [{interval[0]:g}, {interval[1]:g}]"
            panels.setdefault(f"{metric}@{nfe}", {})[label] = sorted(points.items())
    return dict(sorted(panels.items()))


def _stacked_plot(
    plt, panels: dict[str, dict[str, list[tuple]]], path: Path, marker: str | None = None, xlabel: str = "step"
) -> Path:
    """One panel per y-label, stacked over a shared x axis (step, or ω); in each, a line per run (its
    (x, value) points; runs without points are skipped). A line is keyed by its run, or by (run, setting)
    where a run has several (``metric_panels``): a run keeps one colour over all panels, a setting one
    dash pattern, and one legend, on the top panel, names every line, including those the top panel
    has no points of."""
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    colours: dict[str, str] = {}  # per run
    lines_of: dict[str, int] = {}  # per run: its lines so far (its settings: solid, dashed, ...)
    styles: dict[str, tuple[str, str]] = {}  # per line: colour, dash
    for ax, (label, runs) in zip(axes[:, 0], panels.items()):
        for key, pts in runs.items():
            name, setting = key if isinstance(key, tuple) else (key, "")
            colours.setdefault(name, f"C{len(colours) % 10}")
            line = f"{name} ({setting})" if setting else name
            if line not in styles:
                n = lines_of[name] = lines_of.get(name, -1) + 1
                styles[line] = (colours[name], ("-", "--", ":", "-.")[n % 4])
            if pts:
                ax.plot(*zip(*pts), color=styles[line][0], linestyle=styles[line][1], marker=marker, label=line)
        ax.set_ylabel(label)
    handles = [Line2D([], [], color=c, linestyle=ls, marker=marker, label=line) for line, (c, ls) in styles.items()]
    # beside the top panel, outside the axes, so that a long legend hides no points
    axes[0, 0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
