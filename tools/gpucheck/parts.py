"""The parts: their order, default timeouts and least useful time, the function each worker runs
(``WORKERS``) and ``worker_main``, what ``--_worker PART --_spec FILE`` calls in the subprocess."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .bench import part_bench
from .distributed import part_distributed
from .environment import part_environment
from .numerics import part_numerics
from .sampling import part_sampling
from .worker import Result, Worker

PARTS = ("environment", "numerics", "bench", "sampling", "distributed", "bench_compile")
# Seconds per part (each also ends at the budget) and the least time worth starting it with.
DEFAULT_TIMEOUTS = {
    "environment": 60,
    "numerics": 150,
    "bench": 180,
    "sampling": 120,
    "distributed": 240,
    "bench_compile": 420,
}
MIN_SECONDS = {"environment": 5, "numerics": 15, "bench": 20, "sampling": 15, "distributed": 30, "bench_compile": 30}


WORKERS = {
    "environment": part_environment,
    "numerics": part_numerics,
    "bench": part_bench,
    "sampling": part_sampling,
    "distributed": part_distributed,
    "bench_compile": lambda w: part_bench(w, compiled=True),
}


def worker_main(part: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = Result(Path(spec["result_file"]))
    result.save()
    fail = spec.get("fail")
    if fail == "hang":
        time.sleep(10**6)
    if fail == "error":
        raise RuntimeError(f"injected failure in part '{part}' (--fail-part)")
    WORKERS[part](Worker(spec, result))
    return 0
