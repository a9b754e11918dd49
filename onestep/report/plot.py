"""Training curves (loss terms, lr, grad norm) and metric-vs-step plots as PNG (matplotlib extra)."""
from __future__ import annotations

from pathlib import Path

from onestep.registry import ConfigError
from onestep.report.compare import _read_jsonl


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
    stats = {Path(r).name: _read_jsonl(Path(r) / "stats.jsonl") for r in runs}
    metrics = {Path(r).name: _read_jsonl(Path(r) / "metrics.jsonl") for r in runs}
    if not any(stats.values()):
        raise ConfigError(f"no stats.jsonl rows in {', '.join(map(str, runs))}")
    keys = sorted({k for rows in stats.values() for row in rows for k in row
                   if k.startswith("loss") or k in ("grad_norm", "lr", "mse")})
    written = []
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for i, (name, rows) in enumerate(stats.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", label=name)
        ax.set_ylabel(key)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "training.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "training.png")
    series = sorted({(r["metric"], r["nfe"]) for rows in metrics.values() for r in rows})
    if series:
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.2 * len(series)), sharex=True, squeeze=False)
        for ax, (metric, nfe) in zip(axes[:, 0], series):
            for i, (name, rows) in enumerate(metrics.items()):
                pts = sorted((r["step"], r["value"]) for r in rows if r["metric"] == metric and r["nfe"] == nfe)
                if pts:
                    ax.plot(*zip(*pts), color=f"C{i}", marker="o", label=name)
            ax.set_ylabel(f"{metric}@{nfe}")
        axes[0, 0].legend(fontsize=7)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "metrics.png")
    return written
