"""The markdown report: ``render`` (the summary table and one section per part) and its helpers."""

from __future__ import annotations

import json

from .bench import TARGET_MEM_RATIO, TARGET_TIME_RATIO
from .procs import tail


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target_mark(r: dict) -> str:
    if r.get("time_target_met") is None:
        return ""
    t = "time ✓" if r["time_target_met"] else "time ✗"
    m = "" if r.get("mem_target_met") is None else (" mem ✓" if r["mem_target_met"] else " mem ✗")
    return t + m


def render_part(name: str, rec: dict) -> str:
    res = rec.get("result") or {}
    head = f"## {name}: {rec['status']}"
    if rec.get("wall_s") is not None:
        head += f" ({rec['wall_s']} s of {rec.get('timeout_s')} s allowed)"
    parts = [head]
    if rec.get("reason"):
        parts.append(rec["reason"])
    if name == "environment" and res.get("info"):
        info = res["info"]
        items = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in info.items() if k != "sdpa_runs"]
        parts.append(md_table(["key", "value"], items))
    elif name == "numerics" and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = []
        for r in res["rows"]:
            a, b = r.get("vs_float64", {}), r.get("vs_explicit", {})
            tol = r.get("tolerance") or {}
            table.append(
                [
                    "loss_given" if r["check"] == "meanflow loss_given" else "loss(), CPU RNG",
                    r["objective"],
                    r.get("precision"),
                    r.get("target_fp32"),
                    r.get("kernel"),
                    a.get("loss_abs"),
                    a.get("loss_rel"),
                    a.get("grad_abs"),
                    a.get("grad_rel"),
                    a.get("dudt_rel"),
                    b.get("loss_rel"),
                    b.get("grad_rel"),
                    b.get("dudt_rel"),
                    "/".join(fmt(tol.get(k)) for k in ("loss", "grad", "dudt")) if tol else None,
                    r.get("status")
                    or ("pass" if r.get("pass") else "FAIL") + (f": {tail(r['error'], 1)}" if r.get("error") else ""),
                ]
            )
        parts.append(
            md_table(
                [
                    "path",
                    "objective",
                    "precision",
                    "target_fp32",
                    "kernel",
                    "loss abs",
                    "loss rel",
                    "grad abs",
                    "grad rel",
                    "du/dt rel",
                    "vs explicit: loss rel",
                    "grad rel",
                    "du/dt rel",
                    "tol loss/grad/du/dt",
                    "result",
                ],
                table,
            )
        )
    elif name in ("bench", "bench_compile") and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = [
            [
                r.get("label", r["objective"]),
                r["objective"],
                r["batch"],
                r.get("compile"),
                r.get("tf32", False),
                r.get("ms_per_step"),
                r.get("images_per_s"),
                r.get("peak_mem_mb"),
                r.get("ratio_to_flow_matching"),
                r.get("mem_ratio_to_flow_matching"),
                r.get("error") or target_mark(r),
            ]
            for r in res["rows"]
        ]
        parts.append(
            md_table(
                [
                    "objective",
                    "spec",
                    "batch",
                    "compile",
                    "TF32",
                    "ms/step",
                    "images/s",
                    "peak MiB",
                    "time ratio",
                    "mem ratio",
                    f"target (≤{TARGET_TIME_RATIO}×, ≤{TARGET_MEM_RATIO}×)",
                ],
                table,
            )
        )
    elif name == "sampling" and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = [
            [
                r.get("label"),
                r["batch"],
                r.get("params_m"),
                r.get("ms_per_batch"),
                r.get("images_per_s"),
                r.get("peak_mem_mb"),
                r.get("peak_total_mb"),
                r.get("error") or ("finite" if r.get("finite") else "NaN"),
            ]
            for r in res["rows"]
        ]
        parts.append(
            md_table(
                [
                    "backbone",
                    "batch",
                    "params M",
                    "ms/batch",
                    "images/s",
                    "peak MiB (activations)",
                    "peak MiB (total)",
                    "note",
                ],
                table,
            )
        )
    elif name == "distributed" and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = []
        for r in res["rows"]:
            if r["run"] == "process group smoke":
                detail = {k: r.get(k) for k in ("backend", "world_size", "init_s", "all_reduce_64mib_ms", "nccl")}
            else:
                detail = {
                    "steps": r.get("final_step"),
                    "last line = run dir": r.get("last_line_is_run_dir"),
                    "checkpoint": r.get("checkpoint"),
                    **(r.get("final") or {}),
                }
                if "metrics_rows" in r:
                    detail.update(
                        {
                            "metrics rows": r["metrics_rows"],
                            "eval steps": r.get("eval_steps"),
                            **(r.get("final_metrics") or {}),
                        }
                    )
            table.append(
                [
                    r["run"],
                    r.get("nproc"),
                    r.get("wall_s"),
                    "ok" if r.get("ok") else "FAIL",
                    json.dumps(detail, ensure_ascii=False) + (f" — {tail(r['error'], 3)}" if r.get("error") else ""),
                ]
            )
        parts.append(md_table(["run", "nproc", "wall s", "result", "details"], table))
    if rec.get("error"):
        parts.append("Error:\n\n```\n" + rec["error"] + "\n```")
    return "\n\n".join(parts)


def render(report: dict) -> str:
    lines = [
        f"# onestep gpu_check — {report['device']}{' (tiny)' if report['tiny'] else ''}",
        "",
        f"Started {report['started']}, budget {report['budget_s']} s, elapsed {report.get('elapsed_s')} s"
        + ("" if report.get("finished") else " (in progress)")
        + ".",
        "",
    ]
    lines.append(
        md_table(
            ["part", "status", "wall s", "timeout s"],
            [[p, rec["status"], rec.get("wall_s"), rec.get("timeout_s")] for p, rec in report["parts"].items()],
        )
    )
    out = "\n".join(lines)
    for p, rec in report["parts"].items():
        if rec["status"] not in ("pending",):
            out += "\n\n" + render_part(p, rec)
    return out + "\n"
