"""Parts 3 and 6, ``bench`` and ``bench_compile``: ``tools/bench.py`` rows (eager, then compiled),
the batch halved for rows that run out of memory, and MeanFlow's time and memory targets."""

from __future__ import annotations

import sys

from .procs import BENCH, failure_tail, json_lines
from .worker import Worker

# MeanFlow's targets relative to flow matching (same backbone, batch, precision, compile setting).
TARGET_TIME_RATIO, TARGET_MEM_RATIO = 1.2, 1.3

BENCH_OBJECTIVES = (  # (objective spec for tools/bench.py, label); flow matching first
    ("flow_matching", "flow matching"),
    ("meanflow", "MeanFlow default (JVP on r≠t, fused attention rule, JVP in fp32)"),
    ("meanflow:jvp_pass=separate", "MeanFlow, graph-free JVP + one batched forward"),
    ("meanflow:target_fp32=false", "MeanFlow default, JVP under bf16 autocast"),
    ("meanflow:jvp_kernel=explicit", "MeanFlow JVP on r≠t only (explicit attention)"),
    ("meanflow:jvp_only_r_neq_t=false,jvp_kernel=explicit", "MeanFlow plain JVP (baseline)"),
    ("scm", "sCT default (under bf16 with the JVP in fp32: separate passes)"),
    ("scm:jvp_pass=joint", "sCT, one joint pass (the JVP's fp32 primal carries the gradient)"),
    ("scm:target_fp32=false", "sCT, joint pass under bf16 autocast"),
)
DEFAULT_MEANFLOW = ("meanflow", "meanflow:jvp_pass=separate", "meanflow:target_fp32=false")  # checked vs targets
# Rerun with TensorFloat-32 on (``tools/bench.py --tf32``, what the GPU recipes' ``train.tf32`` sets):
# flow matching for the ratios, then the rows whose fp32 target side TF32 speeds up.
TF32_OBJECTIVES = ("flow_matching", "meanflow", "meanflow:jvp_pass=separate")


def oom_halving(objectives: list[str], batch: int, min_batch: int, run) -> tuple[list[dict], str | None]:
    """Rows for ``objectives`` at ``batch``, halving the batch for those that ran out of memory.

    ``run(objectives, batch) -> (rows, error)``: one tools/bench.py call; rows carry ``objective``
    and, for an allocation failure, ``"error": "out of memory"``. Each rerun includes flow matching
    (first) so the ratios at the smaller batch have their reference. An objective with no row and no
    out-of-memory error ends the search (the call failed: ``error`` says how)."""
    rows: list[dict] = []
    todo = list(objectives)
    while todo:
        call = (["flow_matching"] if "flow_matching" in objectives and "flow_matching" not in todo else []) + todo
        got, error = run(call, batch)
        rows += got
        by_obj = {r["objective"]: r for r in got}
        oom = [
            o
            for o in todo
            if by_obj.get(o, {}).get("error") == "out of memory"
            or (o not in by_obj and error and "out of memory" in error)
        ]
        missing = [o for o in todo if o not in by_obj and o not in oom]
        if missing:
            return rows, error or f"no row for {', '.join(missing)}"
        todo = oom
        batch //= 2
        if todo and batch < min_batch:
            return rows, f"out of memory down to batch {batch * 2}: {', '.join(todo)}"
    return rows, None


def part_bench(w: Worker, compiled: bool = False) -> None:
    s = w.sizes["bench"]
    objectives = [o for o, _ in BENCH_OBJECTIVES]
    if compiled:  # by importance: the rows the targets check come first
        objectives = ["flow_matching", *DEFAULT_MEANFLOW] + [
            o for o in objectives if o not in ("flow_matching", *DEFAULT_MEANFLOW)
        ]
    calls = []
    w.result["calls"] = calls
    w.result["setup"] = {
        "backbone": s["backbone"],
        "input_shape": list(s["shape"]),
        "batch": s["batch"],
        "precision": s["precision"],
        "steps": s["steps"],
        "warmup": s["warmup"],
        "compile": compiled,
        "compile_backend": s["compile_backend"] if compiled else None,
    }
    rows: list[dict] = []
    w.result["rows"] = rows

    def run(objs: list[str], batch: int, tf32: bool = False):
        cmd = [
            sys.executable,
            str(BENCH),
            "--backbones",
            s["backbone"],
            "--input-shape",
            ",".join(map(str, s["shape"])),
            "--batch",
            str(batch),
            "--objectives",
            ";".join(objs),
            "--steps",
            str(s["steps"]),
            "--warmup",
            str(s["warmup"]),
            "--device",
            w.device,
            "--precision",
            s["precision"],
            "--json",
            "--skip-oom",
        ]
        if compiled:  # streamed, so a timeout keeps the rows that finished
            cmd += ["--compile", "on", "--compile-backend", s["compile_backend"], "--stream"]
        if tf32:
            cmd.append("--tf32")
        out = w.sub(cmd, w.left(), f"bench_{'compile_' if compiled else ''}{'tf32_' if tf32 else ''}{batch}")
        got = [r for r in json_lines(out["stdout"]) if "objective" in r]
        for r in got:
            r["label"] = dict(BENCH_OBJECTIVES).get(r["objective"], r["objective"]) + (", TF32" if tf32 else "")
            r["tf32"] = tf32
        rows.extend(got)
        error = None
        if out["timed_out"]:
            error = f"bench timed out after {out['wall_s']} s (batch {batch})"
        elif out["rc"] != 0:
            error = f"bench exit {out['rc']}: {failure_tail(out['stderr'])}"
        calls.append(
            {
                "batch": batch,
                "objectives": objs,
                "tf32": tf32,
                "rc": out["rc"],
                "timed_out": out["timed_out"],
                "wall_s": out["wall_s"],
                "error": error,
            }
        )
        w.result.save()
        return got, error

    _, error = oom_halving(objectives, s["batch"], s["min_batch"], run)
    if not compiled and not error:
        _, error = oom_halving(list(TF32_OBJECTIVES), s["batch"], s["min_batch"], lambda o, b: run(o, b, tf32=True))
        error = error and f"TF32 rows: {error}"
    for r in rows:
        if r["objective"] in DEFAULT_MEANFLOW and r.get("ratio_to_flow_matching") is not None:
            r["time_target_met"] = r["ratio_to_flow_matching"] <= TARGET_TIME_RATIO
            r["mem_target_met"] = (
                r["mem_ratio_to_flow_matching"] <= TARGET_MEM_RATIO
                if r.get("mem_ratio_to_flow_matching") is not None
                else None
            )
    measured = {r["objective"] for r in rows if r.get("ms_per_step")}
    w.result["targets"] = {
        "time_ratio_max": TARGET_TIME_RATIO,
        "mem_ratio_max": TARGET_MEM_RATIO,
        "rows": [
            {
                k: r.get(k)
                for k in (
                    "objective",
                    "batch",
                    "compile",
                    "tf32",
                    "ratio_to_flow_matching",
                    "mem_ratio_to_flow_matching",
                    "time_target_met",
                    "mem_target_met",
                )
            }
            for r in rows
            if r["objective"] in DEFAULT_MEANFLOW and r.get("ms_per_step")
        ],
    }
    if error:
        w.result["error"] = error
    w.result["status"] = "ok" if not error and measured >= set(objectives) else ("partial" if measured else "failed")
