"""Resumable evaluation: the batches of samples an eval has generated, kept on disk until its rows
are written, so that an eval killed at batch 9 of 10 resumes at batch 9.

``onestep eval RUN`` keeps them in ``RUN/eval_cache/<key>/START-END.pt`` (one file per batch,
written atomically as it is made, read with ``weights_only``). The key is a hash of everything the
samples depend on: the checkpoint file (resolved path, size, modification time), EMA or raw
weights, the objective, NFE and time grid, sampling seed, guidance, and the data's name, shape and
classes. Sample i never depends on its batch (``onestep.eval.generate``), so a resumed eval gives
the same rows as an uninterrupted one. A batch file that cannot be read is generated again (one
warning line); the folder of a pass is removed once the eval's rows are written. Only the in-memory
metrics' samples are kept: torch-fidelity's streaming metrics generate into the metric.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from onestep.utils.checkpoint import atomic_save
from onestep.utils.rundir import write_text_atomic

CACHE_DIR = "eval_cache"


def model_identity(path: str | Path, weights: str) -> dict[str, Any]:
    """What says that a checkpoint file is the same one: its resolved path, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return {"checkpoint": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "weights": weights}


class SampleCache:
    """The batches of one generation pass (one key) under ``root/<sha256(key)[:16]>``."""

    def __init__(self, root: str | Path, key: dict[str, Any]):
        self.key = key
        text = json.dumps(key, sort_keys=True, default=str)
        self.dir = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self._text = text

    def _path(self, start: int, end: int) -> Path:
        return self.dir / f"{start}-{end}.pt"

    def load(self, start: int, end: int) -> Tensor | None:
        """Samples start..end-1 if this pass holds them (a readable file of the right length)."""
        path = self._path(start, end)
        if not path.is_file():
            return None
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)["samples"]
            if not isinstance(x, Tensor) or x.shape[0] != end - start:
                raise ValueError(f"expected {end - start} samples")
            return x
        except Exception as exc:
            warnings.warn(f"unreadable cached samples {path} ({type(exc).__name__}); regenerating them", stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def save(self, start: int, end: int, samples: Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            write_text_atomic(key_file, self._text + "\n")
        atomic_save({"samples": samples.detach().cpu().contiguous()}, self._path(start, end))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class SampleCacheRoot:
    """The sample caches of one model's evals (``RUN/eval_cache``): ``pass_cache(**settings)`` gives
    the cache of one pass; ``clear_used()`` removes the passes handed out (once their rows are
    written), and the root folder when nothing else is left in it."""

    def __init__(self, root: str | Path, model: dict[str, Any]):
        self.root = Path(root)
        self.model = model
        self._used: list[SampleCache] = []

    def pass_cache(self, **settings: Any) -> SampleCache:
        cache = SampleCache(self.root, {**self.model, **settings})
        self._used.append(cache)
        return cache

    def clear_used(self) -> None:
        for cache in self._used:
            cache.clear()
        self._used.clear()
        try:
            self.root.rmdir()
        except OSError:
            pass
