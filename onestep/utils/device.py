"""Device choice and mixed-precision context."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from onestep.registry import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def _precision_api() -> bool:
    """True where torch has the per-backend ``fp32_precision`` settings (torch >= 2.9), which replace
    ``allow_tf32``; torch refuses a mix of the two, so onestep uses one or the other, never both."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def tf32_settings() -> dict[str, str]:
    """How fp32 matmuls (cuBLAS) and convolutions (cuDNN) run on CUDA: {"matmul": ..., "cudnn_conv": ...},
    each "tf32", "ieee" or (new API only) "none" (torch's default for that backend)."""
    if _precision_api():
        return {
            "matmul": str(torch.backends.cuda.matmul.fp32_precision),
            "cudnn_conv": str(torch.backends.cudnn.conv.fp32_precision),
        }
    return {
        "matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        "cudnn_conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
    }


def set_tf32_settings(settings: dict[str, str]) -> None:
    """Set what ``tf32_settings`` reads, through the API the installed torch documents."""
    if _precision_api():
        torch.backends.cuda.matmul.fp32_precision = settings["matmul"]
        torch.backends.cudnn.conv.fp32_precision = settings["cudnn_conv"]
    else:
        torch.backends.cuda.matmul.allow_tf32 = settings["matmul"] == "tf32"
        torch.backends.cudnn.allow_tf32 = settings["cudnn_conv"] == "tf32"


def allow_tf32(enabled: bool = True) -> None:
    """Let fp32 matmuls and convolutions on CUDA use TensorFloat-32 (``train.tf32``; no effect on the
    CPU); ``enabled=False`` makes them full fp32 ("ieee")."""
    mode = "tf32" if enabled else "ieee"
    set_tf32_settings({"matmul": mode, "cudnn_conv": mode})


def autocast_ctx(device: torch.device, precision: str, *, cache: bool = True):
    """torch.autocast for "bf16" / "fp16", nothing for "fp32".

    ``cache=False`` turns off autocast's cache of low-precision weight copies. Objectives that take a
    forward-mode JVP under autocast need it off: with the cache on, torch before 2.11 gives wrong
    gradients when the same weights serve a JVP and a backward in one autocast region (MeanFlow with
    ``target_fp32: false`` under bf16 on the CPU: 62 % relative gradient error against float64 on
    torch 2.4-2.10, 0.5 % with the cache off or on torch 2.11; tools/gpu_check.py's numerics part).
    """
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
