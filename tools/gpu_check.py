#!/usr/bin/env python
"""Every GPU figure of the toolkit from one command, within a hard time budget.

    python tools/gpu_check.py --out gpu_check_out [--budget-s 420] [--parts a,b] [--device cuda]
    python tools/gpu_check.py --device cpu --tiny --out /tmp/gc      # the same code paths, tiny sizes

The entry point (the workers and torchrun re-invoke this file). The code is the ``gpucheck`` package
next to it (its docstring describes the parts; docs/gpu_check.md is the guide); the names below are
re-exported for the tests.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, where the gpucheck package lives

from gpucheck.bench import oom_halving
from gpucheck.cli import main, parse_args
from gpucheck.numerics import TOLERANCES, cpu_random, generic_objective_rows, numerics_inputs, randomized_net
from gpucheck.parts import PARTS
from gpucheck.sizes import SIZES

__all__ = [
    "PARTS",
    "SIZES",
    "TOLERANCES",
    "cpu_random",
    "generic_objective_rows",
    "main",
    "numerics_inputs",
    "oom_halving",
    "parse_args",
    "randomized_net",
]

if __name__ == "__main__":
    raise SystemExit(main())
