"""Reading ``.npz`` files without pickles, every failure one ``ConfigError`` line naming the file."""

from __future__ import annotations

import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from onestep.registry import ConfigError

NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@contextmanager
def open_npz(path: str | Path, what: str = "file") -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load(path, allow_pickle=False)`` as a context; a missing, truncated, garbled or foreign file
    (here or while its arrays are read inside the block) is one line: '<what> PATH: not a readable
    .npz (...)'."""
    try:
        with np.load(path, allow_pickle=False) as f:
            yield f
    except ConfigError:
        raise
    except NPZ_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"{what} {path}: not a readable .npz (numpy arrays; {type(exc).__name__}: {detail})"
        ) from None
