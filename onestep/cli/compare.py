"""``onestep compare``: one table over runs (and the published numbers)."""

from __future__ import annotations

import sys


def run(args) -> int:
    from onestep.report.compare import PUBLISHED, build_table, render, summarize_run

    runs = [summarize_run(r) for r in args.runs]
    published = None
    if args.published:
        datas = {r.info["data"] for r in runs}
        mapping = {"cifar10": "cifar10", "latents": "imagenet256", "imagenet_latents": "imagenet256"}
        wanted = {mapping[d] for d in datas if d in mapping}
        published = [p for p in PUBLISHED if args.published == "all" or p["data"] in wanted]
        if not published:
            print(
                f"note: no published numbers for data {', '.join(sorted(datas))} (there are some for "
                f"{', '.join(sorted({p['data'] for p in PUBLISHED}))}; --published all shows them anyway)",
                file=sys.stderr,
            )
    header, rows, notes = build_table(runs, published, env=args.env)
    print(render(header, rows, notes, fmt=args.format), end="")
    return 0
