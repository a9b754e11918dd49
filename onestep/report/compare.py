"""Comparison tables: one row per run, one column per (metric, nfe, implementation, reference).

Numbers from different metric implementations or references never share a column: such a metric
gets one column per variant, labelled [a], [b], ..., and a footnote says what each variant is.

Guidance-conditioned models evaluated at several guidance scales (``onestep eval RUN --guidance
1,2,4,8``: rows with ``guidance``) show, per column, the best value over the sweep and the ω that
gave it, as "value (ω=W)" (the interval too when it is not [0, 1]).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onestep.utils.environment import environment_summary
from onestep.utils.rundir import RunDir

# Published 1-NFE (and 2-NFE) FID. Source and evaluation suite per row.
PUBLISHED: list[dict[str, Any]] = [
    *[
        {
            "run": f"{m} (published)",
            "data": "imagenet256",
            "nfe": 1,
            "value": v,
            "source": s,
            "implementation": "FID-50K, ADM TF evaluation suite",
            "objective": o,
        }
        for m, v, s, o in [
            ("iCT-XL/2", 34.24, "MeanFlow paper, Tab. 2", "ict"),
            ("Shortcut-XL/2", 10.60, "MeanFlow paper, Tab. 2", "shortcut"),
            ("MeanFlow-B/2", 6.17, "Geng et al. 2025, Tab. 2", "meanflow"),
            ("MeanFlow-M/2", 5.01, "Geng et al. 2025, Tab. 2", "meanflow"),
            ("MeanFlow-L/2", 3.84, "Geng et al. 2025, Tab. 2", "meanflow"),
            ("MeanFlow-XL/2", 3.43, "Geng et al. 2025, Tab. 2", "meanflow"),
            ("MeanFlow+Disp XL/2", 3.21, "secondary source (docs/reference.md, dispersive loss)", "meanflow"),
            ("SoFlow-XL/2", 2.96, "SoFlow paper", "soflow"),
            ("iMF-XL/2", 1.72, "iMF paper", "meanflow"),
            ("iMF-B/2", 3.39, "iMF paper", "meanflow"),
        ]
    ],
    {
        "run": "MeanFlow-XL/2 (published)",
        "data": "imagenet256",
        "nfe": 2,
        "value": 2.93,
        "source": "Geng et al. 2025, Tab. 2",
        "implementation": "FID-50K, ADM TF evaluation suite",
        "objective": "meanflow",
    },
    {
        "run": "IMM-XL/2 (published)",
        "data": "imagenet256",
        "nfe": 2,
        "value": 7.77,
        "source": "IMM paper (1x2 NFE)",
        "implementation": "FID-50K, ADM TF evaluation suite",
        "objective": "imm",
    },
    *[
        {
            "run": f"{m} (published)",
            "data": "imagenet256",
            "nfe": n,
            "value": v,
            "source": src,
            "implementation": impl,
            "objective": o,
        }
        for m, n, v, src, impl, o in [
            (
                "DMF-XL/2",
                nfe,
                fid,
                "Lee et al. 2025 (DMF), abstract and README",
                "FID-50K, DMF's EDM2-style pipeline against its imgnet256.pkl",
                "dmf",
            )
            for nfe, fid in ((1, 2.16), (4, 1.51))
        ]
        + [
            (name, nfe, fid, "Zhang et al. 2025 (α-Flow), README", "FID-50K, α-Flow's own fid50k_full", "alphaflow")
            for name, nfe, fid in (
                ("AlphaFlow-XL/2+", 1, 2.58),
                ("AlphaFlow-XL/2+", 2, 2.15),
                ("AlphaFlow-XL/2", 1, 2.95),
                ("AlphaFlow-XL/2", 2, 2.34),
            )
        ]
    ],
    *[
        {
            "run": f"{m} (published)",
            "data": "cifar10",
            "nfe": 1,
            "value": v,
            "source": s,
            "implementation": "FID-50K, paper's own pipeline (EDM/ADM-style Inception)",
            "objective": o,
        }
        for m, v, s, o in [
            ("CD", 3.55, "Song et al. 2023", "consistency_distillation"),
            ("CT", 8.70, "Song et al. 2023", "ct"),
            ("iCT", 2.83, "Song & Dhariwal 2023", "ict"),
            ("iCT-deep", 2.51, "Song & Dhariwal 2023", "ict"),
            ("ECT", 3.60, "Geng et al. 2024", "ect"),
            ("sCT", 2.97, "Lu & Song 2024", "sct"),
            ("sCD", 3.66, "Lu & Song 2024", "scd"),
            ("IMM", 3.20, "Zhou et al. 2025", "imm"),
            ("MeanFlow", 2.92, "Geng et al. 2025", "meanflow"),
            ("TCM", 2.46, "TCM paper", "tcm"),
        ]
    ],
    *[
        {
            "run": f"{m} (published)",
            "data": "cifar10",
            "nfe": 2,
            "value": v,
            "source": s,
            "implementation": "FID-50K, paper's own pipeline (EDM/ADM-style Inception)",
            "objective": o,
        }
        for m, v, s, o in [("iCT", 2.46, "Song & Dhariwal 2023", "ict"), ("ECT", 2.11, "Geng et al. 2024", "ect")]
    ],
]


@dataclass
class RunSummary:
    name: str
    info: dict[str, Any]
    values: dict[tuple, float] = field(default_factory=dict)
    # key -> "ω=W" for values picked from guided rows (the best over a guidance sweep).
    guidance: dict[tuple, str] = field(default_factory=dict)


def guidance_label(omega: float | None, interval: list[float] | None) -> str:
    """ "ω=4", or "ω=4 on [0.4, 0.65]" for an interval other than [0, 1]; "no ω" for unguided rows."""
    if omega is None:
        return "no ω"
    lo, hi = interval or (0.0, 1.0)
    return f"ω={omega:g}" + ("" if (lo, hi) == (0.0, 1.0) else f" on [{lo:g}, {hi:g}]")


def best_over_guidance(points: dict[tuple, tuple[float, bool]]) -> tuple[float, tuple]:
    """(value, (ω, interval)) of the best point of a sweep {(ω, interval): (value, higher_is_better)}."""

    def score(item):
        value, higher = item[1]
        return value if higher else -value

    guidance, (value, _) = max(points.items(), key=score)
    return value, guidance


def summarize_run(run_dir: str | Path) -> RunSummary:
    run = RunDir(run_dir)
    cfg = run.read_config()
    stats = run.read_stats()
    metrics = run.read_metrics()
    regs = ",".join(f"{r['name']}(w={r.get('weight')})" for r in cfg.get("regularizers") or []) or "-"
    last_stats = stats[-1] if stats else {}
    rates = [s["images_per_s"] for s in stats if "images_per_s" in s]
    info = {
        "data": cfg.get("data", {}).get("name", "?"),
        "objective": cfg.get("objective", {}).get("name", "?"),
        "backbone": cfg.get("backbone", {}).get("name", "?"),
        "regularizers": regs,
        "steps": last_stats.get("step", 0),
        "params": (cfg.get("meta") or {}).get("parameters"),
        "train_img_s": round(sum(rates) / len(rates), 1) if rates else None,
        "environment": environment_summary(run.read_environments()),
    }
    summary = RunSummary(run.name, info)
    # Latest step wins; within a step the largest sample count (a learning curve's smaller scoring of
    # the same checkpoint does not replace the full one), then the last row written per guidance
    # setting, and over a guidance sweep the best value (noting its ω).
    latest: dict[tuple, tuple[int, int]] = {}
    points: dict[tuple, dict[tuple, tuple[float, bool]]] = {}
    for row in metrics:
        # A flow map sampled with the restart sampler is another column than its Euler steps.
        impl = row.get("implementation", "?") + ("; restart sampler" if row.get("sampler") == "restart" else "")
        key = (row["metric"], row["nfe"], impl, row.get("reference", "?"))
        rank = (row.get("step", 0), row.get("num_samples") or 0)
        if rank > latest.get(key, (-1, -1)):
            latest[key], points[key] = rank, {}
        if rank == latest[key]:
            interval = row.get("guidance_interval")
            guidance = (row.get("guidance"), None if interval is None else tuple(interval))
            points[key][guidance] = (row["value"], bool(row.get("higher_is_better", False)))
    for key, sweep in points.items():
        value, (omega, interval) = best_over_guidance(sweep)
        summary.values[key] = value
        if omega is not None or len(sweep) > 1:
            summary.guidance[key] = guidance_label(omega, interval)
    return summary


def build_table(runs: list[RunSummary], published: list[dict[str, Any]] | None = None, env: bool = False):
    """Returns (header, rows, footnotes); ``env`` adds where each run trained (onestep commit, torch,
    device: its ``environment.jsonl``)."""
    runs = list(runs)
    for p in published or []:
        runs.append(
            RunSummary(
                p["run"],
                {
                    "data": p["data"],
                    "objective": p["objective"],
                    "backbone": "-",
                    "regularizers": "-",
                    "steps": None,
                    "params": None,
                    "train_img_s": None,
                    "source": p["source"],
                },
                {("fid", p["nfe"], p["implementation"], p["data"]): p["value"]},
            )
        )
    keys = sorted({k for r in runs for k in r.values}, key=lambda k: (k[0], k[1], k[2], k[3]))
    variants: dict[tuple, list[tuple]] = {}
    for k in keys:
        variants.setdefault((k[0], k[1]), []).append(k)
    columns, footnotes = [], []
    for (metric, nfe), ks in variants.items():
        for i, k in enumerate(ks):
            label = f"{metric}@{nfe}"
            if len(ks) > 1:
                tag = chr(ord("a") + i)
                label += f" [{tag}]"
                footnotes.append(f"[{tag}] {metric}@{nfe}: {k[2]}; reference: {k[3]}")
            columns.append((label, k))
    if any(len(ks) > 1 for ks in variants.values()):
        footnotes.insert(
            0,
            "Columns marked [a], [b], ... hold the same metric computed with a different "
            "implementation or reference; their numbers are not comparable across columns.",
        )
    by_impl: dict[tuple, list] = {}
    for ks in variants.values():
        if len(ks) == 1:
            by_impl.setdefault((ks[0][0], ks[0][2], ks[0][3]), []).append(ks[0][1])
    impl_notes = sorted(
        f"{metric}@{','.join(str(n) for n in sorted(nfes))}: {impl}; reference: {ref}"
        for (metric, impl, ref), nfes in by_impl.items()
    )
    footnotes.extend(impl_notes)
    if any(r.guidance for r in runs):
        footnotes.append(
            "value (ω=W): a guidance-conditioned model's best value over the guidance scales it was "
            "evaluated at (onestep eval --guidance), and the ω that gave it."
        )
    sources = [f"{r.name}: {r.info['source']}" for r in runs if r.info.get("source")]
    if sources:
        footnotes.append("Published rows: " + "; ".join(sources))
    env_keys = ("onestep", "torch", "device") if env else ()
    header = ["run", "data", "objective", "backbone", "regularizers", "steps", "params", "train img/s"]
    header += [f"trained with {k}" for k in env_keys] + [c[0] for c in columns]
    rows = []
    for r in runs:
        params = r.info.get("params")
        row = [
            r.name,
            r.info["data"],
            r.info["objective"],
            r.info["backbone"],
            r.info["regularizers"],
            "" if r.info.get("steps") is None else str(r.info["steps"]),
            "" if not params else f"{params / 1e6:.2f}M",
            "" if r.info.get("train_img_s") is None else f"{r.info['train_img_s']:.0f}",
        ]
        row += [(r.info.get("environment") or {}).get(k, "") for k in env_keys]
        for _, k in columns:
            v = r.values.get(k)
            row.append("" if v is None else _fmt(v) + (f" ({r.guidance[k]})" if k in r.guidance else ""))
        rows.append(row)
    return header, rows, footnotes


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"


def render(header, rows, footnotes, fmt: str = "rich", console=None) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if footnotes:
            lines.append("")
            lines += [f"- {n}" for n in footnotes]
        return "\n".join(lines) + "\n"
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(highlight=False)
    width = max(console.width, 40)
    header, rows = _drop_empty_columns(header, rows)
    header, legend = _abbreviated(header, rows, width)
    with console.capture() as cap:
        for table in _by_metric(header, rows, width) if len(rows) <= 3 else _by_run(header, rows, width):
            console.print(table)
        for n in legend + footnotes:
            console.print(f"  {escape(n)}", highlight=False, soft_wrap=False)
    return cap.get()


INFO_COLUMNS = 8  # run, data, objective, backbone, regularizers, steps, params, train img/s
_SHORT = {
    "sliced_wasserstein": "SW",
    "energy_distance": "ED",
    "checkerboard_outside": "outside",
    "precision": "prec",
    "recall": "rec",
    "coverage": "cov",
    "train img/s": "img/s",
    "regularizers": "regs",
    "objective": "obj",
    "backbone": "net",
}


def _drop_empty_columns(header, rows):
    keep = [i for i in range(len(header)) if i == 0 or any(r[i] not in ("", "-") for r in rows)]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows]


def _abbreviated(header, rows, width):
    """Shorter column labels (with a legend line) when the table would not fit ``width`` otherwise."""
    if len(rows) <= 3:
        need = max(len(h) for h in header[1:]) + sum(max(len(r[0]), *(len(c) for c in r[1:])) + 3 for r in rows) + 4
    else:
        need = sum(max(len(h), *(len(r[i]) for r in rows)) + 3 for i, h in enumerate(header))
    if need <= width:
        return header, []
    out, used = [], {}
    for h in header:
        short = h
        for long, abbr in _SHORT.items():
            if long in short and len(short) > 8:
                short = short.replace(long, abbr)
                used[abbr] = long
        out.append(short)
    legend = ["Abbreviations: " + ", ".join(f"{a} = {b}" for a, b in used.items())] if used else []
    return out, legend


def _table(columns, title=None):
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=False, title=title, padding=(0, 1))
    for label, w, justify in columns:
        table.add_column(escape(label), no_wrap=True, min_width=w, justify=justify, overflow="ellipsis")
    return table


def _by_metric(header, rows, width):
    """One to three runs: one row per field (info, then metrics), one column per run, run names whole."""
    from rich.markup import escape

    label_w = max(len(h) for h in header[1:])
    run_ws = [max(len(r[0]), *(len(c) for c in r[1:])) for r in rows]
    table = _table([("", label_w, "left")] + [(r[0], w, "right") for r, w in zip(rows, run_ws)])
    for i, label in enumerate(header[1:], start=1):
        table.add_row(escape(label), *[escape(r[i]) for r in rows])
    return [table]


def _by_run(header, rows, width):
    """More runs: one row per run (names whole, never wrapped), columns in pages that fit ``width``,
    each page led by the run name."""
    from rich.markup import escape

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    tables = []
    for page in _column_pages([w + 3 for w in widths], width, first=sum(1 for h in header if "@" not in h)):
        table = _table([(header[i], widths[i], "left" if i == 0 else "right") for i in page])
        for r in rows:
            table.add_row(*[escape(r[i]) for i in page])
        tables.append(table)
    return tables


def _column_pages(widths: list[int], width: int, first: int) -> list[list[int]]:
    """Column indices grouped into pages whose widths sum to at most ``width``: the info columns
    first (one page, wrapping if they must), then the metric columns, each page led by column 0."""
    pages = [list(range(min(first, len(widths))))]
    current, used = [0], widths[0] + 1
    for i in range(first, len(widths)):
        if len(current) > 1 and used + widths[i] > width:
            pages.append(current)
            current, used = [0], widths[0] + 1
        current.append(i)
        used += widths[i]
    if len(current) > 1:
        pages.append(current)
    # The info page and the first metric page share a table when they fit together.
    if len(pages) > 1 and sum(widths[i] for i in pages[0]) + sum(widths[i] for i in pages[1][1:]) + 1 <= width:
        pages[:2] = [pages[0] + pages[1][1:]]
    return pages
