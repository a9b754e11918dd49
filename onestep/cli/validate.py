"""``onestep validate``: check a recipe and its overrides without building anything big."""

from __future__ import annotations

from onestep.cli.common import checkpoint_notes, split_recipe_and_overrides
from onestep.registry import ConfigError


def run(args) -> int:
    from onestep.build import check_buildable
    from onestep.config import load_config

    recipe, overrides = split_recipe_and_overrides(args.items)
    if recipe is None:
        raise ConfigError("validate needs a RECIPE")
    cfg = load_config(recipe, overrides)
    check = check_buildable(cfg)
    notes = ([f"data not loaded: {check.data_note}"] if check.data_note else []) + checkpoint_notes(cfg)
    note = f" ({'; '.join(notes)})" if notes else ""
    print(
        f"OK {recipe}: data={cfg.data['name']} backbone={cfg.backbone['name']} ({check.parameters / 1e6:.2f}M) "
        f"objective={cfg.objective['name']} regularizers={[r['name'] for r in cfg.regularizers]} "
        f"steps={cfg.train.steps}{note}"
    )
    return 0
