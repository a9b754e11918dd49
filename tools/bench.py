#!/usr/bin/env python
"""Training-step speed and peak memory for objectives x backbones x batch sizes, back to back in one
process, with each objective's ratio to flow matching on the same backbone, batch and device.

    python tools/bench.py --backbones dit_s_2 --objectives flow_matching,meanflow --batch 32 \
        --input-shape 4,32,32 --steps 20 [--json] [--device cuda] [--precision bf16]
    python tools/bench.py --backbones mlp_toy --input-shape 2 --batch 1024 \
        --objectives "flow_matching;scm;scm:mode=scd,teacher=copy"   # a distillation row: teacher=copy

``--backbone-kwargs`` passes factory options per backbone, e.g. guidance conditions for
improved_meanflow: ``--backbone-kwargs '{"dit_s_2": {"guidance_conditions": true}}'`` (the same net
for every objective of the row group; imf_dit_* always has them).

A step is the training loop's own step (``onestep.train.step.TrainStep``: loss, regularizer,
backward, gradient all-reduce, clipping, Adam, EMA), minus data loading and logging. Peak memory of the timed
steps above what was allocated before them (model,
gradients, optimizer state, inputs): CUDA -> torch.cuda.max_memory_allocated; CPU (Linux) -> the
process's peak resident set (VmHWM), reset through /proc/self/clear_refs after the warmup steps, with
glibc's mmap threshold fixed at 64 KiB (mallopt) so every tensor buffer is mapped on allocation and
unmapped on free and the resident set follows the live tensors rather than what malloc keeps cached.
Where that is unavailable (other OSes) CPU rows report null. That fixed threshold slows allocation
(up to 2x step time on these models), so on the CPU the times come from a first pass with the
allocator untouched and the memory from a second pass (1 warm-up + 1 measured step per row);
``--no-cpu-memory`` skips the second pass.

For long GPU runs: ``--skip-oom`` turns a row that runs out of memory into a row with
``"error": "out of memory"`` (null figures) and goes on with the next; ``--stream`` prints each JSON
row as soon as it is measured (so a killed run keeps its finished rows), with ratios against a
flow-matching row measured earlier in the same group (list ``flow_matching`` first) and no CPU
memory pass; ``--compile-backend`` picks the ``torch.compile`` backend (``aot_eager`` for a quick
CPU check of the compiled path).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onestep.build import RegularizerTerm  # noqa: E402
from onestep.registry import BACKBONES, OBJECTIVES, REGULARIZERS  # noqa: E402
from onestep.train.step import TrainStep, make_optimizer  # noqa: E402
from onestep.utils.device import allow_tf32  # noqa: E402


def _status_kb(field: str) -> int | None:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def cpu_peak_tracking() -> bool:
    """Make the resident set track live tensors (fixed 64 KiB glibc mmap threshold); True when the
    peak resident set can be reset and read (Linux procfs and glibc)."""
    try:
        libc = _libc()
        M_MMAP_THRESHOLD = -3
        if libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
            return False
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        return False
    return _status_kb("VmHWM") is not None


class PeakMemory:
    """Peak bytes allocated between ``start()`` and ``stop()`` above the amount at ``start()``, in MiB."""

    def __init__(self, device: torch.device, cpu_ok: bool):
        self.device, self.cpu_ok = device, cpu_ok

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            gc.collect()
            _libc().malloc_trim(0)  # hand freed heap pages back, so reusing them counts again
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base = _status_kb("VmRSS") * 1024

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return round((torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20, 1)
        if self.cpu_ok:
            return round((_status_kb("VmHWM") * 1024 - self.base) / 2**20, 1)
        return None


def bench_one(
    backbone: str,
    objective: str,
    batch: int,
    shape: tuple[int, ...],
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    num_classes: int,
    objective_kwargs: dict,
    *,
    regularizer: str | None = None,
    compile: bool = False,
    cpu_peak: bool = False,
    compile_backend: str = "inductor",
    backbone_kwargs: dict | None = None,
) -> dict:
    torch.manual_seed(0)
    net = BACKBONES.build(
        backbone, input_shape=shape, num_classes=num_classes, **(backbone_kwargs or {}).get(backbone, {})
    ).to(device)
    name, _, spec = objective.partition(":")  # "meanflow:jvp_only_r_neq_t=false,ratio_r_neq_t=0.5"
    kwargs = dict(objective_kwargs.get(name, {}))
    for item in filter(None, re.split(r",(?![^\[]*\])", spec)):  # commas inside [...] stay (lists)
        key, _, value = item.partition("=")
        kwargs[key] = yaml.safe_load(value)
    if kwargs.get("teacher") == "copy":  # distillation timing: a frozen copy of the backbone as the teacher
        kwargs["teacher"] = copy.deepcopy(net).eval().requires_grad_(False)
    obj = OBJECTIVES.build(name, **kwargs)
    if obj.trainable is not None:
        obj.trainable.to(device)
    regs = (
        [RegularizerTerm(regularizer, 0.5, list(net.encoder_blocks), REGULARIZERS.build(regularizer), regularizer)]
        if regularizer
        else []
    )
    params = list(net.parameters()) + (list(obj.trainable.parameters()) if obj.trainable is not None else [])
    opt = make_optimizer(params, "adam", 1e-4, (0.9, 0.95), 0.0)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device) if num_classes else None
    # As train.compile: the JVP runs on the eager module.
    train_net = torch.compile(net, backend=compile_backend) if compile else net
    step_fn = TrainStep(net, obj, regs, opt, ema_decay=0.9999, precision=precision, train_net=train_net, device=device)

    def step():
        step_fn(x, y, step=0, lr=1e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    memory = PeakMemory(device, cpu_peak)
    memory.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    peak = memory.stop()
    ms = 1000 * elapsed / steps
    return {
        "backbone": backbone,
        "objective": objective + (f"+{regularizer}" if regularizer else ""),
        "batch": batch,
        "input_shape": list(shape),
        "device": str(device),
        "precision": precision,
        "compile": compile,
        "compile_backend": compile_backend if compile else None,
        "ms_per_step": round(ms, 2),
        "steps_per_s": round(1000 / ms, 3),
        "images_per_s": round(batch * 1000 / ms, 1),
        "peak_mem_mb": peak,
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
    }


def is_oom(exc: BaseException) -> bool:
    """An allocation failure on the device (also the cuBLAS/cuDNN ones that surface as RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def bench_or_oom(config: dict, **kwargs) -> dict:
    """``bench_one``, or a row with ``"error": "out of memory"`` and null figures when it runs out."""
    try:
        return bench_one(**config, **kwargs)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
    # Out of memory. Freed here, outside the except block: its traceback (and the tensors its frames
    # hold) is gone by now.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    c = config
    return {
        "backbone": c["backbone"],
        "objective": c["objective"] + (f"+{c['regularizer']}" if c["regularizer"] else ""),
        "batch": c["batch"],
        "input_shape": list(c["shape"]),
        "device": str(c["device"]),
        "precision": c["precision"],
        "compile": c["compile"],
        "compile_backend": kwargs.get("compile_backend", "inductor") if c["compile"] else None,
        "ms_per_step": None,
        "steps_per_s": None,
        "images_per_s": None,
        "peak_mem_mb": None,
        "params_m": None,
        "error": "out of memory",
    }


def add_ratios(row: dict, group: list[dict]) -> dict:
    """Time and memory ratios of ``row`` to the flow-matching row of ``group`` with the same compile setting."""
    ref = next(
        (q for q in group if q["objective"] == "flow_matching" and q["compile"] == row["compile"] and q["ms_per_step"]),
        None,
    )
    row["ratio_to_flow_matching"] = (
        round(row["ms_per_step"] / ref["ms_per_step"], 3) if ref and row["ms_per_step"] else None
    )
    row["mem_ratio_to_flow_matching"] = (
        round(row["peak_mem_mb"] / ref["peak_mem_mb"], 3)
        if ref and ref["peak_mem_mb"] and row["peak_mem_mb"] is not None
        else None
    )
    return row


def _over_rounds(rows: list[dict], groups: list[list[dict]], index: int) -> dict:
    """One row from the same row's results over rounds: median ms/step and, per round, the ratio to
    that round's flow-matching row; spreads as [min, max]."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    times = [r["ms_per_step"] for r in rows if r.get("ms_per_step")]
    if not times:
        return out
    ratios = [add_ratios(dict(r), g)["ratio_to_flow_matching"] for r, g in zip(rows, groups)]
    ratios = [q for q in ratios if q is not None]
    ms = statistics.median(times)
    out.update(
        {
            "rounds": len(rows),
            "ms_per_step": round(ms, 2),
            "ms_per_step_rounds": times,
            "ms_range": [min(times), max(times)],
            "steps_per_s": round(1000 / ms, 3),
            "images_per_s": round(out["batch"] * 1000 / ms, 1),
        }
    )
    if ratios:
        out.update(
            {
                "ratio_to_flow_matching": round(statistics.median(ratios), 3),
                "ratio_rounds": ratios,
                "ratio_range": [min(ratios), max(ratios)],
                "mem_ratio_to_flow_matching": None,
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="dit_s_2")
    p.add_argument(
        "--objectives",
        default="flow_matching,meanflow",
        help="comma-separated; kwargs after a colon, e.g. 'meanflow:jvp_only_r_neq_t=false' "
        "(use ';' between objectives when kwargs contain commas); 'teacher=copy' gives a "
        "distillation objective a frozen copy of the backbone as its teacher (timing only)",
    )
    p.add_argument("--batch", default="32", help="comma-separated batch sizes")
    p.add_argument("--input-shape", default="4,32,32")
    p.add_argument("--num-classes", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument(
        "--objective-kwargs", default="{}", help='JSON per objective, e.g. \'{"meanflow": {"ratio_r_neq_t": 0.25}}\''
    )
    p.add_argument(
        "--backbone-kwargs", default="{}", help='JSON per backbone, e.g. \'{"dit_s_2": {"guidance_conditions": true}}\''
    )
    p.add_argument(
        "--regularizer",
        default=None,
        help="also time each objective with this regularizer (weight 0.5) on the encoder blocks",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile the network (inductor; warmup steps absorb compilation); 'both' times "
        "each row eager and compiled. Ratios compare rows with the same setting.",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tf32", action="store_true", help="TensorFloat-32 for fp32 matmuls on CUDA (train.tf32)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every row this many times, the rows interleaved round by round; rows report the "
        "median ms/step and ratio with their spread (min, max over rounds), so one lucky round "
        "cannot stand as the figure",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument(
        "--no-cpu-memory", action="store_true", help="CPU: skip the peak-memory pass (peak_mem_mb is then null)"
    )
    p.add_argument(
        "--skip-oom",
        action="store_true",
        help="a row that runs out of memory becomes a row with error 'out of memory'; go on",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="print each JSON row as soon as it is measured (implies --json and --no-cpu-memory; "
        "ratios against an earlier flow_matching row of the same group)",
    )
    args = p.parse_args(argv)
    if args.stream:
        args.json, args.no_cpu_memory = True, True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        allow_tf32()
    device = torch.device(args.device)
    cpu_memory = device.type == "cpu" and not args.no_cpu_memory
    shape = tuple(int(s) for s in args.input_shape.split(","))
    sep = ";" if ";" in args.objectives else ","
    objectives = [o.strip() for o in args.objectives.split(sep) if o.strip()]
    rows, groups = [], []
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        for batch in [int(b) for b in args.batch.split(",")]:
            group = []
            for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                for objective in objectives:
                    for reg in [None] + ([args.regularizer] if args.regularizer else []):
                        group.append(
                            dict(
                                backbone=backbone,
                                objective=objective,
                                batch=batch,
                                shape=shape,
                                device=device,
                                precision=args.precision,
                                num_classes=args.num_classes,
                                objective_kwargs=json.loads(args.objective_kwargs),
                                regularizer=reg,
                                compile=compiled,
                                backbone_kwargs=json.loads(args.backbone_kwargs),
                            )
                        )
            groups.append(group)
    run = (lambda c, **kw: bench_or_oom(c, **kw)) if args.skip_oom else (lambda c, **kw: bench_one(**c, **kw))
    extra = dict(compile_backend=args.compile_backend)
    if args.stream:
        for group in groups:
            done = []
            for c in group:
                done.append(run(c, steps=args.steps, warmup=args.warmup, **extra))
                print(json.dumps(add_ratios(done[-1], done)), flush=True)
        return 0
    # Timing first, with the allocator as it is; then, on the CPU, a separate memory pass (1 warm-up,
    # 1 measured step per row): the resident-set tracking fixes glibc's mmap threshold at 64 KiB for the
    # rest of the process, which slows allocation (up to 2x on these models) and must not enter the times.
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    rounds = [
        [[run(c, steps=args.steps, warmup=args.warmup, **extra) for c in group] for group in groups]
        for _ in range(args.rounds)
    ]
    timed = [
        [_over_rounds([rnd[g][i] for rnd in rounds], [rnd[g] for rnd in rounds], i) for i in range(len(group))]
        for g, group in enumerate(groups)
    ]
    if cpu_memory and cpu_peak_tracking():
        for group, rows_ in zip(groups, timed):
            for c, r in zip(group, rows_):
                if r.get("error") is None:
                    r["peak_mem_mb"] = run(c, steps=1, warmup=1, cpu_peak=True, **extra)["peak_mem_mb"]
    for group in timed:
        for r in group:
            if "ratio_rounds" in r:  # keep the per-round time ratios; memory is measured once
                r["mem_ratio_to_flow_matching"] = add_ratios(dict(r), group)["mem_ratio_to_flow_matching"]
            else:
                add_ratios(r, group)
        rows += group
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"onestep bench — {device}, {args.precision}, {args.steps} timed steps")
    cols = [
        "backbone",
        "objective",
        "batch",
        "compile",
        "ms_per_step",
        "images_per_s",
        "peak_mem_mb",
        "ratio_to_flow_matching",
        "mem_ratio_to_flow_matching",
    ]
    if args.rounds > 1:
        cols[5:5] = ["ms_range"]
        cols.insert(cols.index("ratio_to_flow_matching") + 1, "ratio_range")
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r[c]) for c in cols])
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
