"""Checkpoint specs: ``FORMAT:PATH`` with an optional ``#key=value[,key=value]`` suffix.

Examples: ``sit:/ckpt/SiT-XL-2-256x256.pt``, ``repa_sit:last.pt``, ``dit:weights.pt#heads=16``.

* ``FORMAT`` is a registered checkpoint format (``FORMATS``), at least two characters, so a
  Windows drive (``C:\\ckpt\\a.pt``) is never read as a format. A plain path (no ``NAME:``
  prefix) or a URL (``NAME://...``) is not a spec: ``parse_spec`` returns None and leaves it to
  the caller. A ``NAME:`` prefix that is not a registered format is a ConfigError listing them.
* The suffix after the last ``#`` holds options when it has the ``key=value`` form (otherwise the
  ``#`` is part of the path). Options: ``heads=N`` (attention heads, for widths that are not a
  standard DiT/SiT size).
"""

from __future__ import annotations

import re
from typing import Any

from ..registry import FORMATS, ConfigError

__all__ = ["CheckpointSpec", "parse_spec", "SPEC_OPTIONS"]

_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_]+):(.*)$", re.DOTALL)
_OPTIONS = re.compile(r"^\w+=[^,=#]*(,\w+=[^,=#]*)*$")
SPEC_OPTIONS = {"heads": "attention heads (an integer >= 1)"}


class CheckpointSpec(tuple):
    """``(format, path)``; ``options`` holds the parsed suffix (``{"heads": 16}``)."""

    def __new__(cls, format: str, path: str, options: dict[str, Any] | None = None):
        self = super().__new__(cls, (format, path))
        self.options = dict(options or {})
        return self

    @property
    def format(self) -> str:
        return self[0]

    @property
    def path(self) -> str:
        return self[1]

    def __repr__(self) -> str:
        return f"CheckpointSpec(format={self[0]!r}, path={self[1]!r}, options={self.options!r})"


def _parse_options(text: str, spec: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in text.split(","):
        key, value = item.split("=", 1)
        if key not in SPEC_OPTIONS:
            raise ConfigError(f"checkpoint spec '{spec}': unknown option '{key}'; allowed: {', '.join(SPEC_OPTIONS)}")
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            raise ConfigError(f"checkpoint spec '{spec}': option '{key}' must be {SPEC_OPTIONS[key]}, got '{value}'")
        options[key] = number
    return options


def parse_spec(spec: Any) -> CheckpointSpec | None:
    """``"sit:/p/f.pt#heads=16"`` -> CheckpointSpec("sit", "/p/f.pt", {"heads": 16}); None if not a spec.

    Raises ConfigError for an unknown format name, an empty path or a bad option.
    """
    if not isinstance(spec, str):
        return None
    match = _PREFIX.match(spec)
    if match is None:
        return None
    name, rest = match.groups()
    if rest.startswith("//"):
        return None
    if name not in FORMATS:
        raise ConfigError(f"unknown checkpoint format '{name}' in '{spec}'; known: {', '.join(FORMATS.names())}")
    path, options = rest, {}
    head, sep, tail = rest.rpartition("#")
    if sep and _OPTIONS.match(tail):
        path, options = head, _parse_options(tail, spec)
    if not path:
        raise ConfigError(f"checkpoint spec '{spec}' has no path; expected FORMAT:PATH")
    return CheckpointSpec(name, path, options)
