"""The command line: ``parse_args`` and ``main`` (the parent run, or a worker / the distributed smoke
test when re-invoked with the hidden flags)."""

from __future__ import annotations

import argparse
import signal

from . import __doc__ as TOOL_DOC
from .distributed import dist_smoke
from .parts import PARTS, worker_main
from .runner import Runner


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=TOOL_DOC.split("\n\n")[0], epilog="Parts: " + ", ".join(PARTS) + ". Details: docs/gpu_check.md."
    )
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="hard time budget for all parts together (default 420: a rerun fits in a 10-minute command)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on a CPU): same code paths")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--timeouts", default="", help="per-part timeouts in seconds, e.g. 'bench=120,bench_compile=300'")
    p.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply every default timeout by this (e.g. 10 on a machine 10x slower than a GPU host)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="torchrun processes for the distributed part (default: the GPU count on cuda, 1 on cpu)",
    )
    p.add_argument("--keep-runs", action="store_true", help="keep the distributed part's run directories")
    p.add_argument("--fail-part", action="append", default=[], help=argparse.SUPPRESS)  # PART[:hang] (testing)
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_dist-smoke", dest="dist_smoke", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker or args.dist_smoke:
        return args
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"--parts: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(PARTS)}")
    timeouts = {}
    for item in filter(None, (x.strip() for x in args.timeouts.split(","))):
        name, _, value = item.partition("=")
        try:
            timeouts[name] = float(value)
        except ValueError:
            p.error(f"--timeouts: '{item}' is not PART=SECONDS")
        if name not in PARTS or timeouts[name] <= 0:
            p.error(f"--timeouts: '{item}': PART must be one of {', '.join(PARTS)} and SECONDS > 0")
    args.timeouts = timeouts
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    if args.timeout_scale <= 0:
        p.error("--timeout-scale must be > 0")
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be >= 1")
    args.fail = {}
    for item in args.fail_part:
        name, _, mode = item.partition(":")
        if name not in PARTS or mode not in ("", "error", "hang"):
            p.error(f"--fail-part: '{item}' is not PART[:error|:hang]")
        args.fail[name] = mode or "error"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args._worker, args._spec)
    if args.dist_smoke:
        return dist_smoke(args.dist_smoke)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return Runner(args).run()
