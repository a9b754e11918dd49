"""What a result or a bug report needs to say about where it ran: ``onestep env``, recorded in every
run directory (``environment.jsonl``, one line per training start or resume) and shown by
``onestep compare --env``.

``environment()`` returns plain JSON types only; ``format_environment`` prints it as ``- key: value``
lines in the style of ``python -m torch.utils.collect_env`` and ``diffusers-cli env``.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

from onestep.utils.version import __version__, package_version, source_commit

# Distribution names (as pip knows them) of what onestep runs on, then the optional extras.
PACKAGES = ("torch", "torchvision", "timm", "torch-fidelity", "numpy", "scikit-learn", "safetensors", "pyyaml", "rich")
OPTIONAL_PACKAGES = ("pillow", "scipy", "diffusers", "tensorboard", "wandb", "matplotlib", "triton")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")


def cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """onestep (version, commit), Python, torch and its CUDA / cuDNN / NCCL, the packages onestep
    uses, the CPU and GPUs, and the thread and TF32 settings of this process."""
    import torch

    from onestep.utils.device import tf32_settings

    env: dict[str, Any] = {
        "onestep": __version__,
        "onestep_commit": source_commit(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        # torch's own string keeps the build tag (2.14.1+cu130, 2.9.1+cpu) that the metadata drops.
        "packages": {name: str(torch.__version__) if name == "torch" else package_version(name) for name in PACKAGES},
        "optional_packages": {name: v for name in OPTIONAL_PACKAGES if (v := package_version(name))},
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "gpus": [],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_variables": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "tf32": tf32_settings(),
    }
    with contextlib.suppress(AttributeError, OSError):
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):  # NCCL may be absent from a CUDA build (Windows)
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append(
                {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
            )
    return env


def describe_device(env: dict[str, Any]) -> str:
    """One line: "2x NVIDIA H200" or "CPU: AMD EPYC 7B13 (2 cores)"."""
    gpus = env.get("gpus") or []
    if gpus:
        names = sorted({g["name"] for g in gpus})
        return f"{len(gpus)}x {' + '.join(names)}"
    cores = env.get("cpu_affinity") or env.get("cpu_count")
    return f"CPU: {env.get('cpu', '?')} ({cores} cores)"


def environment_summary(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{"onestep", "torch", "device"} of a run's ``environment.jsonl`` rows (one per training start or
    resume): the values of its stretches joined with " -> " where they differ; "?" for none recorded."""

    def values(fn) -> str:
        seen: list[str] = []
        for row in rows:
            with contextlib.suppress(KeyError, TypeError, AttributeError):
                v = fn(row)
                if not seen or seen[-1] != v:
                    seen.append(v)
        return " -> ".join(seen) or "?"

    return {
        "onestep": values(lambda r: r["onestep"] + (f" ({r['onestep_commit']})" if r.get("onestep_commit") else "")),
        "torch": values(lambda r: r["packages"]["torch"]),
        "device": values(describe_device),
    }


def format_environment(env: dict[str, Any]) -> str:
    """``- key: value`` lines (paste into a bug report)."""
    commit = env.get("onestep_commit")
    lines = [
        f"- onestep: {env['onestep']}" + (f" (commit {commit})" if commit else " (not a git checkout)"),
        f"- Python: {env['python']}",
        f"- Platform: {env['platform']}",
    ]
    for name, version in env["packages"].items():
        lines.append(f"- {name}: {version or 'not installed'}")
    cuda, available = env.get("torch_cuda_build"), "yes" if env["cuda_available"] else "no"
    lines.append(f"- torch built for CUDA: {cuda or 'no (CPU build)'}; CUDA available: {available}")
    if env["cuda_available"]:
        lines.append(f"- cuDNN: {env.get('cudnn')}; NCCL: {env.get('nccl')}")
        for i, g in enumerate(env["gpus"]):
            lines.append(f"- GPU {i}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}")
    else:
        lines.append("- GPUs: none")
    cores = f"{env['cpu_count']} cores" + (
        f", {env['cpu_affinity']} usable" if env.get("cpu_affinity") not in (None, env["cpu_count"]) else ""
    )
    lines.append(f"- CPU: {env['cpu']} ({cores})")
    variables = ", ".join(f"{k}={v}" for k, v in env["thread_variables"].items()) or "none set"
    lines.append(
        f"- torch threads: {env['torch_threads']} (inter-op {env['torch_interop_threads']}); environment: {variables}"
    )
    lines.append(f"- fp32 on CUDA: matmul {env['tf32']['matmul']}, cuDNN conv {env['tf32']['cudnn_conv']}")
    if env.get("optional_packages"):
        lines.append("- optional: " + ", ".join(f"{k} {v}" for k, v in env["optional_packages"].items()))
    return "\n".join(lines)
