"""Part 4, ``sampling``: 1-NFE images/s and peak memory of random-weight DiTs through
``onestep.sampling.sample``, the batch halved on out of memory."""

from __future__ import annotations

import time
import traceback

from .procs import tail
from .worker import Worker, _sync, _torch_device, is_oom


def part_sampling(w: Worker) -> None:
    import torch

    from onestep.registry import OBJECTIVES
    from onestep.sampling import sample

    device = _torch_device(w.device)
    s = w.sizes["sampling"]
    rows = []
    w.result["setup"] = {
        "input_shape": list(s["shape"]),
        "num_classes": s["num_classes"],
        "nfe": 1,
        "precision": "bf16 autocast",
        "objective": "meanflow",
        "warmup": s["warmup"],
        "iters": s["iters"],
        "weights": "random (speed only)",
    }
    w.result["rows"] = rows
    objective = OBJECTIVES.build("meanflow")
    for name, label, kwargs in s["models"]:
        batch = s["batch"]
        while True:
            row = {"backbone": name, "label": label, "batch": batch, "nfe": 1}
            try:
                row.update(sampling_speed(name, kwargs, s, batch, device, objective, sample))
                rows.append(row)
                break
            except Exception as exc:  # noqa: BLE001
                oom = is_oom(exc)
                row["error"] = "out of memory" if oom else tail(traceback.format_exc(), 8)
            rows.append(row)
            w.result.save()
            import gc

            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row["error"] != "out of memory" or batch // 2 < s["min_batch"]:
                break
            batch //= 2
        w.result.save()
    ok = {r["backbone"] for r in rows if r.get("images_per_s")}
    wanted = {m[0] for m in s["models"]}
    if ok != wanted:
        w.result["error"] = "; ".join(f"{r['backbone']} batch {r['batch']}: {r['error']}" for r in rows if "error" in r)
    w.result["status"] = "ok" if ok == wanted else ("partial" if ok else "failed")


def sampling_speed(name, kwargs, s, batch, device, objective, sample) -> dict:
    import torch

    from onestep.registry import BACKBONES

    torch.manual_seed(0)
    with torch.device(device):
        net = BACKBONES.build(name, input_shape=list(s["shape"]), num_classes=s["num_classes"], **kwargs)
    net = net.to(device).eval()
    noise = torch.randn(batch, *s["shape"], device=device)
    y = torch.randint(0, s["num_classes"], (batch,), device=device)
    ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    for _ in range(s["warmup"]):
        with ctx():
            sample(objective, net, noise, y, nfe=1)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(s["iters"]):
        with ctx():
            out = sample(objective, net, noise, y, nfe=1)
    _sync(device)
    elapsed = time.perf_counter() - t0
    row = {
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "ms_per_batch": round(1000 * elapsed / s["iters"], 2),
        "images_per_s": round(s["iters"] * batch / elapsed, 1),
        "finite": bool(torch.isfinite(out).all()),
        "peak_mem_mb": None,
        "peak_total_mb": None,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_mb"] = round((peak - base) / 2**20, 1)  # above the weights and inputs
        row["peak_total_mb"] = round(peak / 2**20, 1)
    del net, out
    return row
