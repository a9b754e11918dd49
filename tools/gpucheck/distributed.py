"""Part 5, ``distributed``: the process-group smoke test (``dist_smoke``, run by torchrun through the
entry point) and the two ``torchrun -m onestep train`` runs."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .procs import TOOL, failure_tail, free_port, json_lines, read_text
from .worker import Worker, _sync


def dist_smoke(device_name: str) -> int:
    """Run by torchrun: a process group on NCCL (cuda) or gloo (cpu), a few collectives and onestep's
    own helpers; rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from onestep.utils import distributed

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    x = torch.full((1 << 20,), float(rank + 1), device=device)
    dist.all_reduce(x)
    _sync(device)
    init_s = time.perf_counter() - t0  # includes the first collective (NCCL connects lazily)
    all_reduce_ok = bool((x == world * (world + 1) / 2).all())
    rows = torch.full((2, 3), float(rank), device=device)
    gathered = torch.empty(2 * world, 3, device=device)
    dist.all_gather_into_tensor(gathered, rows)
    all_gather_ok = bool((gathered.view(world, 2, 3) == torch.arange(world, device=device).view(-1, 1, 1)).all())
    obj = distributed.broadcast_object({"from": rank})
    t1 = time.perf_counter()
    big = torch.ones(16 << 20, device=device)  # 64 MiB fp32
    for _ in range(5):
        dist.all_reduce(big)
    _sync(device)
    allreduce_ms = 1000 * (time.perf_counter() - t1) / 5
    distributed.shutdown()
    if rank == 0:
        print(
            json.dumps(
                {
                    "backend": "nccl" if cuda else "gloo",
                    "world_size": world,
                    "init_s": round(init_s, 3),
                    "all_reduce_ok": all_reduce_ok,
                    "all_gather_ok": all_gather_ok,
                    "broadcast_object_ok": obj == {"from": 0},
                    "all_reduce_64mib_ms": round(allreduce_ms, 2),
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                }
            ),
            flush=True,
        )
    return 0


def part_distributed(w: Worker) -> None:
    s = w.sizes["distributed"]
    env_info = (w.spec.get("context") or {}).get("environment") or {}
    nproc = w.spec.get("nproc") or (env_info.get("device_count") if w.device == "cuda" else 1) or 1
    keep = w.spec.get("keep_runs")
    runs_root = Path(tempfile.mkdtemp(prefix="onestep_gpu_check_runs_"))
    env = dict(os.environ)
    if w.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    rows = []
    w.result["setup"] = {
        "nproc_per_node": nproc,
        "backend": "nccl" if w.device == "cuda" else "gloo",
        "runs_root": str(runs_root) if keep else "(temporary, removed)",
    }
    w.result["rows"] = rows
    problems = []

    # Process group smoke test (torchrun with one process never builds a process group in the trainer).
    out = w.sub(
        launcher + ["--master_port", str(free_port()), str(TOOL), "--_dist-smoke", w.device],
        s["timeouts"]["smoke"] * w.spec.get("timeout_scale", 1.0),
        "dist_smoke",
        env,
    )
    info = (json_lines(out["stdout"]) or [{}])[-1]
    ok = out["rc"] == 0 and info.get("all_reduce_ok") and info.get("all_gather_ok") and info.get("broadcast_object_ok")
    rows.append(
        {
            "run": "process group smoke",
            "nproc": nproc,
            "wall_s": out["wall_s"],
            "ok": bool(ok),
            **info,
            **({} if ok else {"error": "timed out" if out["timed_out"] else failure_tail(out["stderr"])}),
        }
    )
    if not ok:
        problems.append("process group smoke")
    w.result.save()

    device_overrides = ["train.device=cpu"] if w.device == "cpu" else []
    for key, recipe in (("toy", "recipes/toy_meanflow.yaml"), ("digits", "recipes/digits_meanflow.yaml")):
        run_dir = runs_root / key
        overrides = list(s[key]) + device_overrides
        cmd = launcher + [
            "--master_port",
            str(free_port()),
            "-m",
            "onestep",
            "train",
            recipe,
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *overrides,
        ]
        out = w.sub(cmd, s["timeouts"][key] * w.spec.get("timeout_scale", 1.0), f"dist_{key}", env)
        row = {
            "run": f"{Path(recipe).stem} via torchrun",
            "nproc": nproc,
            "overrides": overrides,
            "wall_s": out["wall_s"],
            "rc": out["rc"],
            "timed_out": out["timed_out"],
        }
        lines = out["stdout"].strip().splitlines()
        row["last_line_is_run_dir"] = bool(lines) and lines[-1].strip() == str(run_dir)
        ckpt = run_dir / "checkpoints" / "last.pt"
        row["checkpoint"] = ckpt.is_file() and ckpt.stat().st_size > 0
        stats = json_lines(read_text(run_dir / "stats.jsonl"))
        if stats:
            last = stats[-1]
            row["final_step"] = last.get("step")
            row["final"] = {k: last[k] for k in ("loss", "mse", "steps_per_s", "images_per_s", "time_s") if k in last}
        steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.steps=")), None)
        row["steps"] = steps
        ok = out["rc"] == 0 and row["last_line_is_run_dir"] and row["checkpoint"] and row.get("final_step") == steps
        if key == "digits":
            metrics = json_lines(read_text(run_dir / "metrics.jsonl"))
            every = next(int(o.split("=")[1]) for o in overrides if o.startswith("eval.every="))
            eval_steps = sorted({m.get("step") for m in metrics})
            row["metrics_rows"] = len(metrics)
            row["eval_steps"] = eval_steps
            final_step = max(eval_steps) if eval_steps else None
            row["final_metrics"] = {
                f"{m['metric']}@{m['nfe']}": round(m["value"], 5) for m in metrics if m.get("step") == final_step
            }
            ok = ok and eval_steps == list(range(every, steps + 1, every))
        row["ok"] = bool(ok)
        if not ok:
            row["error"] = "timed out" if out["timed_out"] else failure_tail(out["stderr"]) or "checks failed"
            problems.append(key)
        rows.append(row)
        w.result.save()
    if keep:
        w.result["runs_root"] = str(runs_root)
    else:
        import shutil

        shutil.rmtree(runs_root, ignore_errors=True)
    if problems:
        w.result["error"] = "failed: " + ", ".join(problems)
    w.result["status"] = "ok" if not problems else ("partial" if len(problems) < len(rows) else "failed")
