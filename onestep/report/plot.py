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
    series = sorted({(r["metric"], r["nfe"]) for rows in metrics.values() for r in rows})
    if series:
        panels = {
            f"{metric}@{nfe}": {
                name: sorted((r["step"], r["value"]) for r in rows if r["metric"] == metric and r["nfe"] == nfe)
                for name, rows in metrics.items()
            }
            for metric, nfe in series
        }
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
    (x, value) points; runs without points are skipped but keep their colour)."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (label, runs) in zip(axes[:, 0], panels.items()):
        for i, (name, pts) in enumerate(runs.items()):
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", marker=marker, label=name)
        ax.set_ylabel(label)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
