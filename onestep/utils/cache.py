"""The toolkit's cache directory (digits classifier, FID reference statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ONESTEP_CACHE`` or ``~/.cache/onestep``."""
    return Path(os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep").expanduser()
