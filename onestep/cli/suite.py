"""``onestep suite``: train and score a list of recipes into one results table."""

from __future__ import annotations

import sys

from onestep.registry import ConfigError


def run(args) -> int:
    from onestep import suite

    args.overrides = [x for x in args.items if "=" in x]
    args.suite = [x for x in args.items if "=" not in x]
    if not args.suite:
        raise ConfigError("suite needs a suite file or recipes (KEY=VALUE items are overrides)")
    return suite.main(args, echo=lambda line: print(line, file=sys.stderr, flush=True))
