"""Part 1, ``environment``: versions, GPUs and memory, TF32 flags, and which SDPA backends run."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from .procs import ROOT, read_text
from .worker import Worker, _sync, _torch_device


def part_environment(w: Worker) -> None:
    import importlib.metadata as md
    import platform

    import torch

    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "device_requested": w.device,
    }
    import onestep

    info["onestep"] = f"{onestep.__version__} ({Path(onestep.__file__).resolve().parent})"
    for pkg in ("torchvision", "timm", "triton", "numpy"):
        with contextlib.suppress(Exception):
            info[f"{pkg}_version"] = md.version(pkg)
    with contextlib.suppress(Exception):
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    info["cpu_count"] = os.cpu_count()
    with contextlib.suppress(Exception):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(Exception):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in read_text(Path("/proc/cpuinfo")).splitlines()
            if line.startswith("model name")
        )
    with contextlib.suppress(Exception):
        kb = next(
            int(line.split()[1])
            for line in read_text(Path("/proc/meminfo")).splitlines()
            if line.startswith("MemTotal")
        )
        info["host_memory_gib"] = round(kb / 2**20, 1)
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    with contextlib.suppress(Exception):
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    info["cuda_available"] = torch.cuda.is_available()
    from onestep.utils.device import tf32_settings

    # Read through the API the installed torch documents (fp32_precision; allow_tf32 before 2.9):
    # torch refuses a mix of the two, and get_float32_matmul_precision raises after the new one is used.
    info["tf32"] = tf32_settings()
    info["sdpa_enabled"] = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
        "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
    }
    w.result["info"] = info
    if w.device == "cuda" or torch.cuda.is_available():
        with contextlib.suppress(Exception):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
    if torch.cuda.is_available():
        info["device_count"] = torch.cuda.device_count()
        info["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count,
                }
            )
        free, _ = torch.cuda.mem_get_info(0)
        info["memory_free_gib"] = round(free / 2**30, 1)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            info["driver_cuda"] = torch._C._cuda_getDriverVersion()
    else:
        info["device_count"] = 0
    w.result["info"] = info
    device = _torch_device(w.device)
    info["sdpa_runs"] = sdpa_probe(device)
    info["sdpa_runs_summary"] = sdpa_summary(info["sdpa_runs"])
    w.result["info"] = info
    w.result["status"] = "ok"


def sdpa_probe(device) -> dict:
    """Which SDPA backends run one (2, 4, 256, 64) call on ``device``: {backend: {dtype: "ok" or why not}}."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    out = {name: {} for name in backends}
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(2, 4, 256, 64, device=device, dtype=dtype)
        for name, backend in backends.items():
            key = str(dtype).replace("torch.", "")
            try:
                with warnings.catch_warnings(), sdpa_kernel(backend):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, q, q)
                _sync(device)
                out[name][key] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means "does not run here"
                text = str(exc).strip()
                out[name][key] = "no: " + (text.splitlines()[0][:120] if text else type(exc).__name__)
    return out


def sdpa_summary(runs: dict) -> str:
    """'flash: bf16 ok, fp32 no; ...' from ``sdpa_probe``."""
    short = {"bfloat16": "bf16", "float32": "fp32"}
    return "; ".join(
        f"{name}: " + ", ".join(f"{short.get(k, k)} {'ok' if v == 'ok' else 'no'}" for k, v in d.items())
        for name, d in runs.items()
    )
