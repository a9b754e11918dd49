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


def allow_tf32() -> None:
    """Let fp32 matmuls and convolutions on CUDA use TensorFloat-32 (``train.tf32``; no effect on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_ctx(device: torch.device, precision: str):
    """torch.autocast for "bf16" / "fp16", nothing for "fp32"."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
