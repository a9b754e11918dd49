"""Regularizers: callables ``reg(features) -> scalar`` registered in REGULARIZERS."""

from onestep.regularizers import dispersive  # noqa: F401  (registers "dispersive")
