"""The scale of a block's features along a run: for every numbered checkpoint of each run (EMA
weights), the RMS of the block's output tokens and the dispersive loss (InfoNCE-l2 and -cosine) of
them, on one fixed batch. Runs with and without the dispersive loss are measured on the same batch,
noise and times, so their columns compare; it answers whether an InfoNCE-l2 term is lowered by
growing the features.

    python tools/feature_scale.py runs/fashion_1h/meanflow runs/fashion_1h/meanflow_disp --block 1
    python tools/feature_scale.py RUN ... --csv scale.csv    # also write the rows
    python tools/feature_scale.py RUN ... --plot scale.png   # and draw them (needs matplotlib)

The batch: ``--batch`` training samples of the run's data (seed ``--seed``), noised at
t ~ logit-normal(0, 1) with h = 0 (the flow-matching slice every objective trains). Prints one row per
(run, step); the block defaults to the backbone's ``encoder_blocks[0]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onestep.formats import load_run  # noqa: E402
from onestep.objectives.common import interpolate  # noqa: E402
from onestep.objectives.time_sampling import logit_normal  # noqa: E402
from onestep.regularizers.dispersive import DispersiveLoss, feature_rms  # noqa: E402
from onestep.utils.rundir import RunDir  # noqa: E402


def fixed_batch(run, n: int, seed: int):
    """(z_t, t, y): n training samples of the run's data, noised with seeded noise at seeded times."""
    x, y = run.dataset.reference(n, seed=seed)
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    t = logit_normal(n, 0.0, 1.0, generator=g)
    e = torch.randn(x.shape, generator=g)
    return interpolate(x, e, t), t, (None if y is None or not run.dataset.num_classes else y)


@torch.no_grad()
def scale_rows(run_dir: str, block: int | None, n: int, seed: int, label: str | None = None) -> list[dict]:
    rows, batch = [], None
    l2 = DispersiveLoss(variant="infonce_l2", tau=0.5, gather=False)
    cosine = DispersiveLoss(variant="infonce_cosine", tau=0.5, gather=False)
    for ckpt in RunDir(run_dir).numbered_checkpoints():
        run = load_run(ckpt)
        if batch is None:
            batch = fixed_batch(run, n, seed)
        z, t, y = batch
        b = run.net.encoder_blocks[0] if block is None else block
        _, (feats,) = run.net.forward_features(z, t, torch.zeros_like(t), y, blocks=[b])
        rows.append(
            {
                "run": label or Path(run_dir).name,
                "step": run.step,
                "block": b,
                "feature_rms": float(feature_rms([feats], torch.float64)),
                "infonce_l2": float(l2(feats.double())),
                "infonce_cosine": float(cosine(feats.double())),
                "floor": -math.log(feats.shape[0]),
                "batch": feats.shape[0],
            }
        )
    return rows


def plot_rows(rows: list[dict], path: str) -> None:
    """Three panels against the training step, one line per run: the block's feature RMS, and the
    InfoNCE-l2 (with its floor -log B) and InfoNCE-cosine values of those features on the fixed batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("feature_rms", "feature RMS of the block's tokens"),
        ("infonce_l2", "InfoNCE-l2 (tau 0.5) on the batch"),
        ("infonce_cosine", "InfoNCE-cosine (tau 0.5) on the batch"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        for run in dict.fromkeys(r["run"] for r in rows):
            mine = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
            ax.plot([r["step"] for r in mine], [r[key] for r in mine], marker="o", markersize=3, label=run)
        if key == "infonce_l2":
            ax.axhline(rows[0]["floor"], linestyle="--", color="gray", linewidth=1)
            ax.text(
                0.01,
                rows[0]["floor"],
                " floor -log B",
                color="gray",
                fontsize=8,
                va="bottom",
                transform=ax.get_yaxis_transform(),
            )
        ax.set(xlabel="training step", title=title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    first = rows[0]
    title = f"block {first['block']}, EMA weights, one fixed batch of {first['batch']} training samples"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--block", type=int, help="block index (default: the backbone's encoder block)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--plot", help="also draw them to this PNG file (needs matplotlib)")
    args = p.parse_args(argv)
    names = [Path(run).name for run in args.runs]
    clash = len(set(names)) < len(names)  # runs/a/meanflow and runs/b/meanflow: label by path
    rows = [
        r
        for run in args.runs
        for r in scale_rows(run, args.block, args.batch, args.seed, label=str(run) if clash else None)
    ]
    if not rows:
        print("no numbered checkpoints in " + ", ".join(args.runs), file=sys.stderr)
        return 2
    cols = list(rows[0])
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14.5g}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot_rows(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
