"""Helpers the subcommands share: the console, RECIPE/KEY=VALUE splitting, checkpoint notes, guidance options."""

from __future__ import annotations

from onestep.registry import ConfigError


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def split_recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    recipe, overrides = None, []
    for item in items:
        if "=" in item or recipe is not None:
            overrides.append(item)
        else:
            recipe = item
    return recipe, overrides


def checkpoint_notes(cfg) -> list[str]:
    """Notes on the checkpoints a recipe names (objective.teacher, train.init_from) whose files are
    not here; a bad spec (unknown format, a format that cannot initialise) is a ConfigError."""
    from onestep.formats import spec_note

    specs = [("objective.teacher", cfg.objective.get("teacher"), False), ("train.init_from", cfg.train.init_from, True)]
    notes = [spec_note(spec, where=where, init=init) for where, spec, init in specs if isinstance(spec, str)]
    return [n for n in notes if n]


def model_step(run) -> str:
    return f"step {run.step}" if run.step is not None else f"{run.format} checkpoint"


def floats(text: str | None, option: str) -> list[float] | None:
    """'1,2.5' -> [1.0, 2.5] (None stays None); a ConfigError naming ``option`` otherwise."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option} takes comma-separated numbers, got '{text}'")
    return values


def resolve_guidance(run, omegas: list[float] | None, interval: str | None) -> tuple[list[float | None], list | None]:
    """(guidance values, interval): --guidance / --guidance-interval, else the run's eval.guidance /
    eval.guidance_interval ([None]: the model as it is). ``sampling.with_guidance`` decides what a value
    means for the model (a network input ω, or a classifier-free guidance scale) and refuses others."""
    window = floats(interval, "--guidance-interval")
    if window is not None and len(window) != 2:
        raise ConfigError(f"--guidance-interval takes two numbers T_MIN,T_MAX, got '{interval}'")
    if omegas is None:
        if window is not None:
            raise ConfigError("--guidance-interval needs --guidance (the guidance scale)")
        ev = run.cfg.eval if run.cfg is not None else None
        if ev is None or ev.guidance is None:
            return [None], None
        return (list(ev.guidance) if isinstance(ev.guidance, list) else [ev.guidance]), ev.guidance_interval
    return omegas, window


def guidance_label(row: dict) -> str:
    if row.get("guidance") is None:
        return "-"
    if row.get("guidance_interval") is None:
        return f"{row['guidance']:g}"
    lo, hi = row["guidance_interval"]
    return f"{row['guidance']:g} on [{lo:g}, {hi:g}]"
