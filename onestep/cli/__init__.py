"""The ``onestep`` command line, git-style: ``onestep SUBCOMMAND ...``.

``parser.py`` holds the whole argument parser; each subcommand is a module here with a ``run(args)``
(train, sample, eval, export, compare, suite, plot, ls, validate, env), imported only when it runs.
Config -> kwargs conversion happens here and in ``onestep.build``; the library below never parses argv.
"""

from __future__ import annotations

import os
import sys

from onestep.cli.parser import build_parser
from onestep.registry import ConfigError

__all__ = ["build_parser", "main"]


# Idle OpenMP threads spin 300 000 iterations (libgomp's default) before sleeping, so two runs on one
# machine starve each other; 1000 keeps a solo run near full speed and two runs near half each
# (measured: docs/cli.md, "Several runs on one machine"). Set before torch loads libgomp; an explicit
# GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
OPENMP_SPIN = "1000"


def _tame_openmp_spinning() -> None:
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN


def main(argv: list[str] | None = None) -> int:
    _tame_openmp_spinning()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides given after an option land here
        if hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
            args.items += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from onestep.train.loop import TrainingError

    try:
        return args.fn(args) or 0
    except ConfigError as exc:
        print(f"onestep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        # A bad value or file that a component refused: one line, unless ONESTEP_DEBUG asks for the traceback.
        if os.environ.get("ONESTEP_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            f"onestep {args.command}: error: {type(exc).__name__}: {first} (ONESTEP_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2
    except TrainingError as exc:
        print(f"onestep {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"onestep {args.command}: interrupted", file=sys.stderr)
        return 130
