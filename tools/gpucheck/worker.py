"""The worker side's plumbing: ``Result`` (a part's result file, rewritten on every save), ``Worker``
(what a part function gets: spec, sizes, deadline, subprocesses) and the torch device helpers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .procs import run_process, write_atomic
from .sizes import SIZES


class Result:
    """A part's result dict, saved atomically to its file on every ``save()`` (the parent reads it
    even when it had to kill the worker)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"status": "running"}

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, default=str))

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        self.save()

    def __getitem__(self, key):
        return self.data[key]


class Worker:
    def __init__(self, spec: dict, result: Result):
        self.spec, self.result = spec, result
        self.device = spec["device"]
        self.tiny = spec["tiny"]
        self.sizes = SIZES["tiny" if self.tiny else "full"]
        self.deadline = spec["deadline"]  # time.time() by which this part must be done
        self.work = Path(spec["work_dir"])
        self.children = Path(spec["children_file"])

    def left(self, margin: float = 3.0) -> float:
        return self.deadline - time.time() - margin

    def sub(self, cmd: list[str], timeout: float, name: str, env: dict | None = None) -> dict:
        return run_process(
            cmd, min(timeout, self.left()), env=env, log_dir=self.work, name=name, children_file=self.children
        )


def _torch_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda: CUDA is not available on this machine (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    return torch.device("cuda", 0) if name == "cuda" else torch.device(name)


def is_oom(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
