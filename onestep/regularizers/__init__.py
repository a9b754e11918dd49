"""Regularizers: callables ``reg(features) -> scalar`` registered in REGULARIZERS."""
